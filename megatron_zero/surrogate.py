"""Surrogates T(a, b) of a target decoder (paper Sec. 1.2, Fig. 4).

T(a, b) keeps target layers ``0..a-1``, one *translator* initialised as a copy of layer ``a``, drops ``a+1..b``
and keeps ``b+1..L-1``: ``L - (b - a)`` layers (T(40,78) of Llama-3.1-70B keeps 42, T(16,26) of Llama-3.2-3B 18,
T(17,30) of Llama-3.1-8B 19). The translator sits at surrogate index ``a``. Embeddings, final norm and output
layer are the target's.

The surrogate's ``LlamaConfig.surrogate`` records its provenance -- target, ``a``, ``b``, the translator index, the
surrogate-layer -> target-layer map, a hash of the target's architecture and tokenizer, and which layers stage 1
trains (the translator; with the T* control of Sec. 1.2 also every other layer before it, ``0, 2, 4, ...``) -- so
training knows the translator and grafting can check that an encoder was trained on a surrogate of this target.

Several ranges, several translators (the authors' ``build_surrogate_model``, ``cfg.translators_range`` and
``cfg.num_translators``): ``ranges=[(s_1, e_1), (s_2, e_2), ...]`` (inclusive, ascending, disjoint; their
``range(s, e + 1)``) and ``k = num_translators`` per range. Exactly these target layers survive:

* every layer outside the ranges;
* in range ``[s, e]`` the translators, target layers ``s, s+2, ..., s+2(k-1)`` -- not ``s..s+k-1``: their loop
  takes ``trans_range[i]`` and then ``pop(i)``s it, so each pop shifts the list and the i-th translator is the
  original ``s + 2i``; the range needs ``e - s + 1 >= 2k - 1`` layers (their code fails with an IndexError
  below that). All other layers of the range are dropped.

Survivors keep their order, so range ``r``'s translators are the consecutive surrogate layers
``s_r - D_r, ..., s_r - D_r + k - 1`` with ``D_r = sum_{q<r} (len_q - k)`` the layers dropped before it; e.g.
Llama-3.1-70B with ranges 16..26 and 40..78, k = 1: ``layer_map = 0..16, 27..40, 79`` (32 layers), translators
at surrogate layers 16 and 30 -- the layer names in their checkpoints. Their *optimizer filter*
(``train_llama.py::func_optim_filter``) computes these indices with offset ``sum_{q<r} len_q - 1``, which is right
only for one range, or two ranges with ``k = 1``; stage 1 here trains every translator (``translator_indices``).

Building a surrogate checkpoint (``tools/build_surrogate.py``): :func:`build_surrogate_checkpoint` takes an HF
target to an HF surrogate (:func:`build_hf_surrogate`, streamed tensor by tensor, one process) and a ``torch_dist``
target to a ``torch_dist`` surrogate over fewer pipeline stages (:func:`build_sharded_surrogate`, the pipeline-stage
pruner: each rank reads only the kept layers it holds); ``a`` comes from ``--translator-start`` or a
``trajectory.json`` (:func:`resolve_span`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from typing import Callable, Iterator, Mapping, Optional

import torch

from megatron_zero.errors import UserError
from megatron_zero.models.llama_config import LlamaConfig, translator_indices  # noqa: F401  (re-exported)

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


def layer_map(num_layers: int, a: int, b: int) -> list[int]:
    """Target layer of each surrogate layer of T(a, b)."""
    if not 0 <= a < b < num_layers - 1:
        raise ValueError(f"T({a},{b}) needs 0 <= a < b < L-1 = {num_layers - 1} (--translator-start a, "
                         f"--translator-end b; the last layer is always kept)")
    return list(range(a)) + [a] + list(range(b + 1, num_layers))


def surviving_layers(num_layers: int, ranges, num_translators: int = 1) -> tuple[list[int], list[int]]:
    """``(layer_map, translator_indices)`` of the surrogate that replaces each inclusive ``(s, e)`` of ``ranges``
    by ``num_translators`` translators (see the module docstring for exactly which layers survive)."""
    ranges = [(int(s), int(e)) for s, e in ranges]
    if not ranges:
        raise ValueError("give at least one translator range")
    if num_translators < 1:
        raise ValueError(f"--num-translators must be >= 1, got {num_translators}")
    prev_end = -1
    for s, e in ranges:
        if not 0 <= s < e < num_layers - 1:
            raise ValueError(f"translator range {s}:{e} needs 0 <= start < end < L-1 = {num_layers - 1} (the last "
                             f"layer is always kept)")
        if s <= prev_end:
            raise ValueError(f"translator ranges must be ascending and disjoint; {s}:{e} starts at or before the "
                             f"previous range's end {prev_end}")
        if e - s + 1 < 2 * num_translators - 1:
            raise ValueError(f"translator range {s}:{e} has {e - s + 1} layers; {num_translators} translators need "
                             f">= {2 * num_translators - 1} (translators are layers s, s+2, ..., as in the authors' "
                             f"build_surrogate_model)")
        prev_end = e
    translators = {s + 2 * i for s, _ in ranges for i in range(num_translators)}
    dropped = {l for s, e in ranges for l in range(s, e + 1)} - translators
    mapping = [l for l in range(num_layers) if l not in dropped]
    return mapping, [j for j, l in enumerate(mapping) if l in translators]


def architecture_sha256(cfg: LlamaConfig) -> str:
    """SHA-256 of the architecture (every config field but the name and surrogate provenance): the same for a
    model's HF and sharded checkpoints."""
    # fields at None (optional features off) are left out, so adding such a field does not change every hash
    fields = {k: v for k, v in cfg.to_dict().items() if k not in ("name", "surrogate", "lora") and v is not None}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def surrogate_config(cfg: LlamaConfig, a: Optional[int] = None, b: Optional[int] = None,
                     target_name: Optional[str] = None, control_unfreeze_early: bool = False,
                     extra: Optional[dict] = None, *, ranges=None, num_translators: int = 1) -> LlamaConfig:
    """The LlamaConfig of T(a, b) of ``cfg`` -- or, with ``ranges=[(s, e), ...]`` and ``num_translators``, of the
    multi-range surrogate -- with its provenance in ``surrogate``.

    Provenance keys: ``translator_ranges`` ``[[s, e], ...]``, ``num_translators``, ``translator_indices`` (surrogate
    layers; stage 1 trains them all), ``layer_map``; ``translator_start``/``translator_end``/``translator_index``
    describe the first range and its first translator (all there is for T(a, b))."""
    if cfg.surrogate:
        raise ValueError(f"{cfg.name} is itself a surrogate (of {cfg.surrogate.get('target')}); build surrogates "
                         f"from the full target")
    if ranges is None:
        if a is None or b is None:
            raise ValueError("give a and b (T(a, b)) or ranges")
        mapping = layer_map(cfg.num_layers, a, b)
        ranges = [(a, b)]
    elif a is not None or b is not None:
        raise ValueError("give either a, b or ranges, not both")
    ranges = [(int(s), int(e)) for s, e in ranges]
    mapping, translators = surviving_layers(cfg.num_layers, ranges, num_translators)
    first = translators[0]
    stage1 = translators + (list(range(0, first, 2)) if control_unfreeze_early else [])
    provenance = {
        "target": target_name or cfg.name, "target_num_layers": cfg.num_layers,
        "target_config_sha256": architecture_sha256(cfg), "translator_start": ranges[0][0],
        "translator_end": ranges[0][1], "translator_index": first, "layer_map": mapping,
        "translator_ranges": [list(r) for r in ranges], "num_translators": num_translators,
        "translator_indices": translators, "stage1_trainable_layers": sorted(set(stage1)),
        "control_unfreeze_early": control_unfreeze_early, **(extra or {}),
    }
    suffix = "+".join(f"T({s},{e})" for s, e in ranges) + (f"x{num_translators}" if num_translators > 1 else "")
    return dataclasses.replace(cfg, num_layers=len(mapping), name=f"{cfg.name}-{suffix}", surrogate=provenance)


def surrogate_key(ckey: str, mapping: list[int]) -> str:
    """The target canonical key a surrogate canonical key is copied from (identity off the decoder layers)."""
    m = _LAYER.match(ckey)
    if m is None:
        return ckey
    return f"decoder.layers.{mapping[int(m.group(1))]}.{m.group(2)}"


def iter_surrogate(target_get: Callable[[str], torch.Tensor], scfg: LlamaConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """Canonical surrogate tensors, read one at a time from the target (stream for any checkpoint size)."""
    from megatron_zero.checkpointing import hf_llama

    mapping = scfg.surrogate["layer_map"]
    for ckey in hf_llama.canonical_keys(scfg):
        yield ckey, target_get(surrogate_key(ckey, mapping))


def surrogate_canonical(cfg: LlamaConfig, canonical: Mapping[str, torch.Tensor], a: Optional[int] = None,
                        b: Optional[int] = None, target_name: Optional[str] = None,
                        **kw) -> tuple[LlamaConfig, dict[str, torch.Tensor]]:
    """In-memory T(a, b) (or ``ranges=``/``num_translators=``) of a canonical state dict (small models, tests,
    the demo)."""
    scfg = surrogate_config(cfg, a, b, target_name, **kw)
    return scfg, {k: v.clone() for k, v in iter_surrogate(canonical.__getitem__, scfg)}


def compute_ratio(cfg: LlamaConfig, scfg: LlamaConfig, seq_length: int = 4096) -> float:
    """Surrogate / target decoder training FLOPs per token (Megatron's convention, logits included)."""
    from megatron_zero.training.flops import decoder_flops_per_step

    return decoder_flops_per_step(scfg, 1, seq_length) / decoder_flops_per_step(cfg, 1, seq_length)


# ---------------------------------------------------------------------------------------------------------
# Sharded (megatron-core torch_dist) targets: the pipeline-stage pruner
# ---------------------------------------------------------------------------------------------------------
def target_sharded_state_dict(model, mapping: list[int], target_num_layers: int) -> dict:
    """This rank's surrogate chunk ``model`` as a sharded state dict whose layer tensors point at the *target's*
    global layers (``mapping``): loading it from the target's checkpoint reads only what this rank keeps.

    Layer entries are rebuilt the way megatron-core's ``TransformerBlock.sharded_state_dict`` builds them, with
    the target layer index and layer count on the stacked-layer axis; everything else is the model's own."""
    from megatron.core.dist_checkpointing.utils import replace_prefix_for_sharding

    from megatron_zero.checkpointing.mcore_checkpoint import model_sharded_state_dict
    from megatron_zero.parallel.sharding import layer_index_map

    full = model_sharded_state_dict([model])["model"]
    out = {k: v for k, v in full.items() if not k.startswith("decoder.layers.")}
    local_to_global = layer_index_map(model)
    for i, layer in enumerate(model.decoder.layers):
        prefix = f"decoder.layers.{i}."
        sd = layer.sharded_state_dict(prefix, [(0, mapping[local_to_global[i]], target_num_layers)], None)
        replace_prefix_for_sharding(sd, prefix, "decoder.layers.")
        out.update({k: v for k, v in sd.items() if not k.endswith("_extra_state")})  # weights only, as saved
    if set(out) != set(full):
        raise RuntimeError(f"sharded state dict keys differ from the model's: {sorted(set(out) ^ set(full))[:4]}")
    return {"model": out}


def load_surrogate_from_sharded(model, load_dir: str, target_cfg: LlamaConfig, mapping: list[int]) -> None:
    """Fill this rank's surrogate chunk from a target ``torch_dist`` checkpoint (collective), reading only the
    kept layers' pieces this rank holds.

    In a world of one, megatron-core's torch_dist reader cannot take a partial layer grid (it attributes the
    pieces nobody requests to the only rank), so the kept layers are streamed one at a time instead -- a single
    process holds the whole surrogate anyway."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    from megatron_zero.checkpointing import mcore_checkpoint
    from megatron_zero.parallel import sharding

    if dist.get_world_size() == 1:
        kept = dict(mcore_checkpoint.iter_llama_canonical(load_dir, target_cfg, layers=sorted(set(mapping))))
        sharding.load_canonical(model, lambda k: kept[surrogate_key(k, mapping)], source=load_dir)
        return
    request = target_sharded_state_dict(model, mapping, target_cfg.num_layers)
    # the dropped layers are never requested, so the "every piece is read by someone" check does not apply
    loaded = dist_checkpointing.load(request, load_dir, validate_access_integrity=False)
    missing, unexpected = model.load_state_dict(loaded["model"], strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise mcore_checkpoint.CheckpointError(
            f"{load_dir}: the target checkpoint does not fit the surrogate (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]})")


# ---------------------------------------------------------------------------------------------------------
# Building surrogate checkpoints
# ---------------------------------------------------------------------------------------------------------
class SurrogateError(UserError, ValueError):
    """Bad surrogate-building input (span, trajectory, layout)."""


def read_transition(path: str, num_layers: int) -> int:
    """The transition layer of a ``trajectory.json`` written by ``tools/analyze_trajectory.py`` for this target."""
    try:
        with open(path) as f:
            traj = json.load(f)
        a = int(traj["transition_layer"])
    except FileNotFoundError:
        raise SurrogateError(f"--from-trajectory {path}: no such file") from None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise SurrogateError(f"--from-trajectory {path}: not a trajectory.json with a transition_layer "
                             f"({type(e).__name__}: {e})") from None
    analysed = traj.get("num_layers")
    if analysed is not None and analysed != num_layers:
        raise SurrogateError(f"--from-trajectory {path} analysed a {analysed}-layer model, but the "
                             f"target --load-dir has {num_layers} layers")
    return a


def resolve_span(num_layers: int, translator_start: Optional[int] = None, translator_end: Optional[int] = None,
                 from_trajectory: Optional[str] = None) -> tuple[int, int]:
    """(a, b): ``--translator-start`` or the trajectory's transition layer; ``--translator-end`` or L-2."""
    a = translator_start
    if from_trajectory:
        a_traj = read_transition(from_trajectory, num_layers)
        if a is not None and a != a_traj:
            raise SurrogateError(f"--translator-start {a} contradicts --from-trajectory's transition layer "
                                 f"{a_traj}; give one of them")
        a = a_traj
    if a is None:
        raise SurrogateError("give --translator-start or --from-trajectory")
    b = translator_end if translator_end is not None else num_layers - 2
    if not 0 <= a < b < num_layers - 1:
        a_src = (f"--from-trajectory {from_trajectory} detected transition layer {a}" if from_trajectory
                 else f"--translator-start {a}")
        b_src = f"--translator-end {b}" if translator_end is not None else f"the default end L-2 = {b}"
        hint_a = min(max(a, 0), max(num_layers - 3, 0))
        hint = (f"; e.g. --translator-start {hint_a} --translator-end {num_layers - 2}" if num_layers >= 3
                else "; the target has too few layers for a surrogate")
        raise SurrogateError(f"{a_src} and {b_src} leave no layer to drop: T(a,b) drops layers a+1..b and needs "
                             f"0 <= a < b < L-1 = {num_layers - 1} (the target has {num_layers} layers; its last "
                             f"one is kept){hint}")
    return a, b


def parse_range(text: str, flag: str = "--translator-range") -> tuple[int, int]:
    """``"40:78"`` -> ``(40, 78)``: first and last replaced layer, inclusive (the authors' ``range(40, 79)``)."""
    try:
        s, e = (int(x) for x in str(text).split(":"))
    except ValueError:
        raise SurrogateError(f"{flag} {text!r}: expected S:E, the first and last replaced layer (e.g. 40:78 for "
                             f"the authors' range(40, 79))") from None
    return s, e


def resolve_ranges(num_layers: int, translator_start: Optional[int] = None, translator_end: Optional[int] = None,
                   from_trajectory: Optional[str] = None, translator_ranges=None,
                   num_translators: int = 1) -> list[tuple[int, int]]:
    """The replaced ranges: ``--translator-range S:E`` (repeatable) or the single span of :func:`resolve_span`;
    checked with :func:`surviving_layers`."""
    if translator_ranges:
        if translator_start is not None or translator_end is not None or from_trajectory:
            raise SurrogateError("give --translator-range, or --translator-start/--translator-end/--from-trajectory, "
                                 "not both")
        ranges = [parse_range(r) if isinstance(r, str) else (int(r[0]), int(r[1])) for r in translator_ranges]
    else:
        ranges = [resolve_span(num_layers, translator_start, translator_end, from_trajectory)]
    try:
        surviving_layers(num_layers, ranges, num_translators)
    except ValueError as e:
        raise SurrogateError(f"--translator-range/--num-translators: {e} (the target has {num_layers} layers)") from None
    return ranges


def compact(layers: list[int]) -> str:
    """[0, 1, 2, 5, 6] -> '0-2, 5-6'."""
    runs, start = [], layers[0]
    for prev, cur in zip(layers, layers[1:] + [None]):
        if cur != prev + 1:
            runs.append(f"{start}-{prev}" if prev != start else str(start))
            start = cur
    return ", ".join(runs)


def describe(cfg: LlamaConfig, scfg: LlamaConfig) -> list[str]:
    """Target and surrogate sizes, kept layers, compute ratio and what stage 1 trains, as report lines."""
    n_t, n_s = cfg.num_parameters(), scfg.num_parameters()
    return [f"target {cfg.name}: {cfg.num_layers} layers, {n_t:,} parameters ({n_t / 1e9:.2f}B)",
            f"surrogate {scfg.name}: {scfg.num_layers} layers (target layers {compact(scfg.surrogate['layer_map'])}), "
            f"{n_s:,} parameters ({n_s / 1e9:.2f}B, {100 * n_s / n_t:.1f}% of the target); decoder compute per "
            f"token: {100 * compute_ratio(cfg, scfg):.1f}% of the target's",
            f"stage 1 trains layers {scfg.surrogate['stage1_trainable_layers']} (translator(s) at "
            f"{translator_indices(scfg.surrogate)})"]


def _provenance_extra(load_dir: str) -> dict:
    from megatron_zero.checkpointing.vlm_checkpoint import tokenizer_hash

    return {"tokenizer_sha256": tokenizer_hash(load_dir)}


def build_hf_surrogate(load_dir: str, save_dir: str, translator_start: Optional[int] = None,
                       translator_end: Optional[int] = None, from_trajectory: Optional[str] = None,
                       control_unfreeze_early: bool = False, max_shard_size: str = "5GB", overwrite: bool = False,
                       log: Callable[[str], None] = print, translator_ranges=None,
                       num_translators: int = 1) -> LlamaConfig:
    """HF -> HF in one process, streamed tensor by tensor (layer indices renamed), tokenizer files carried, the
    target's dtype kept. Returns the surrogate's config."""
    import os
    import sys

    from tqdm import tqdm

    from megatron_zero.checkpointing import hf_llama
    from megatron_zero.checkpointing.hf_reader import HFCheckpoint
    from megatron_zero.checkpointing.hf_writer import (
        ShardedSafetensorsWriter, atomic_directory, check_save_dir, copy_tokenizer_files, parse_size, write_config,
    )

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise SurrogateError("an HF surrogate is built by one process; do not launch it with torchrun")
    max_shard = parse_size(max_shard_size)
    check_save_dir(save_dir, overwrite)
    reader = HFCheckpoint(load_dir)
    cfg = LlamaConfig.from_hf_config(reader.config, name=os.path.basename(os.path.normpath(load_dir)))
    ranges = resolve_ranges(cfg.num_layers, translator_start, translator_end, from_trajectory, translator_ranges,
                            num_translators)
    scfg = surrogate_config(cfg, target_name=os.path.abspath(load_dir), control_unfreeze_early=control_unfreeze_early,
                            extra=_provenance_extra(load_dir), ranges=ranges, num_translators=num_translators)
    keys = hf_llama.canonical_keys(scfg)
    mapping = scfg.surrogate["layer_map"]
    reader.validate([n for k in keys for n in hf_llama.hf_sources(surrogate_key(k, mapping))])  # before writing
    for line in describe(cfg, scfg):
        log(line)
    getter = hf_llama.canonical_getter(reader.get, cfg)
    with atomic_directory(save_dir, overwrite) as tmp:
        writer = ShardedSafetensorsWriter(tmp, max_shard, log=log)
        for ckey, tensor in tqdm(iter_surrogate(getter, scfg), total=len(keys), desc="surrogate tensors",
                                 unit="tensor", file=sys.stdout):
            for name, t in hf_llama.from_canonical(ckey, tensor, scfg).items():
                writer.add(name, t)
        writer.close()
        copy_tokenizer_files(load_dir, tmp)
        hf = scfg.to_hf_config()
        for key in ("torch_dtype", "dtype"):  # the tensors are copied unchanged: keep the target's dtype
            if key in reader.config:
                hf[key] = reader.config[key]
        write_config(tmp, hf)
    log(f"wrote {save_dir}")
    return scfg


def build_sharded_surrogate(load_dir: str, save_dir: str, translator_start: Optional[int] = None,
                            translator_end: Optional[int] = None, from_trajectory: Optional[str] = None,
                            control_unfreeze_early: bool = False, tp: int = 1, pp: int = 1,
                            stage_layers=None, overwrite: bool = False,
                            log: Callable[[str], None] = print, translator_ranges=None,
                            num_translators: int = 1) -> LlamaConfig:
    """Sharded -> sharded, the pipeline-stage pruner: the surrogate is built over ``pp`` stages (x ``tp``), and each
    rank reads from the target checkpoint only the pieces of the kept layers it holds (its stage's layers, its TP
    slice); dropped layers are never read. Tensors keep the target's dtype, so kept layers are bit-identical.
    Collective: run under torchrun with ``tp * pp`` processes."""
    import os

    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    from megatron_zero.checkpointing import mcore_checkpoint
    from megatron_zero.models.llama import RuntimeOptions, build_llama_model, validate
    from megatron_zero.parallel.initialize import initialize_parallel

    cfg = mcore_checkpoint.load_model_config(load_dir)
    ranges = resolve_ranges(cfg.num_layers, translator_start, translator_end, from_trajectory, translator_ranges,
                            num_translators)
    scfg = surrogate_config(cfg, target_name=os.path.abspath(load_dir), control_unfreeze_early=control_unfreeze_early,
                            extra=_provenance_extra(load_dir), ranges=ranges, num_translators=num_translators)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != tp * pp:
        raise SurrogateError(f"run under torchrun with --nproc-per-node {tp * pp} (= --tensor-model-parallel-size "
                             f"{tp} x --target-pipeline-parallel-size {pp}); this launch has {world} process(es)")
    stored = dist_checkpointing.load_tensors_metadata(load_dir)
    dtype = stored["embedding.word_embeddings.weight"].dtype
    opts = RuntimeOptions(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                          pipeline_stage_layers=stage_layers, params_dtype=dtype, initialize_weights=False)
    stage_split = validate(scfg, opts)
    initialize_parallel(tp, pp)
    if dist.get_rank() == 0:
        for line in describe(cfg, scfg):
            log(line)
        log(f"surrogate layers per pipeline stage: {stage_split}")
    model = build_llama_model(scfg, opts)
    load_surrogate_from_sharded(model, load_dir, cfg, scfg.surrogate["layer_map"])
    mcore_checkpoint.save_model([model], save_dir, scfg, overwrite=overwrite, copy_files_from=load_dir,
                                extra_meta={"pipeline_stage_layers": stage_split})
    if dist.get_rank() == 0:
        log(f"wrote {save_dir} (PP={pp}, stages {stage_split})")
    return scfg


def build_surrogate_checkpoint(load_dir: str, save_dir: str, *, sharded_layout: Optional[dict] = None,
                               log: Callable[[str], None] = print, **span) -> LlamaConfig:
    """T(a, b) of the target ``load_dir`` (anything the checkpoint resolver reads as an HF Llama directory or a
    torch_dist decoder checkpoint) written to ``save_dir`` in the target's format. ``span``: ``translator_start``,
    ``translator_end``, ``from_trajectory``, ``control_unfreeze_early``, ``overwrite`` (and ``max_shard_size`` for
    HF); ``sharded_layout``: ``tp``, ``pp``, ``stage_layers`` (torch_dist only; None: not given)."""
    import os

    from megatron_zero.checkpointing.resolve import resolve_checkpoint

    if os.path.isfile(os.path.join(load_dir, "config.json")) and os.path.isfile(
            os.path.join(load_dir, "checkpoint_meta.json")):
        raise SurrogateError(f"--load-dir {load_dir} holds both an HF config.json and a megatron_zero "
                             f"checkpoint_meta.json; point it at one checkpoint")
    ckpt = resolve_checkpoint(load_dir, "--load-dir", accept=("hf-llama", "mcore-llama"))
    layout = {k: v for k, v in (sharded_layout or {}).items() if v is not None}
    if ckpt.kind == "hf-llama":
        flags = {"pp": "--target-pipeline-parallel-size", "stage_layers": "--target-pipeline-stage-layers",
                 "tp": "--tensor-model-parallel-size"}
        if layout:
            raise SurrogateError(f"{flags[next(iter(layout))]} is for sharded (torch_dist) targets; --load-dir "
                                 f"{load_dir} is an HF checkpoint, which gives an HF surrogate")
        return build_hf_surrogate(load_dir, save_dir, log=log, **span)
    span.pop("max_shard_size", None)
    return build_sharded_surrogate(ckpt.root, save_dir, tp=layout.get("tp", 1), pp=layout.get("pp", 1),
                                   stage_layers=layout.get("stage_layers"), log=log, **span)
