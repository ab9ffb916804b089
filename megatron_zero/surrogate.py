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
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from typing import Callable, Iterator, Mapping, Optional

import torch

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
    fields = {k: v for k, v in cfg.to_dict().items() if k not in ("name", "surrogate")}
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
