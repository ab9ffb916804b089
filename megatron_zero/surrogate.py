"""Surrogates T(a, b) of a target decoder (paper Sec. 1.2, Fig. 4).

T(a, b) keeps target layers ``0..a-1``, one *translator* initialised as a copy of layer ``a``, drops ``a+1..b``
and keeps ``b+1..L-1``: ``L - (b - a)`` layers (T(40,78) of Llama-3.1-70B keeps 42, T(16,26) of Llama-3.2-3B 18,
T(17,30) of Llama-3.1-8B 19). The translator sits at surrogate index ``a``. Embeddings, final norm and output
layer are the target's.

The surrogate's ``LlamaConfig.surrogate`` records its provenance -- target, ``a``, ``b``, the translator index, the
surrogate-layer -> target-layer map, a hash of the target's architecture and tokenizer, and which layers stage 1
trains (the translator; with the T* control of Sec. 1.2 also every other layer before it, ``0, 2, 4, ...``) -- so
training knows the translator and grafting can check that an encoder was trained on a surrogate of this target.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from typing import Callable, Iterator, Mapping, Optional

import torch

from megatron_zero.models.llama_config import LlamaConfig

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


def layer_map(num_layers: int, a: int, b: int) -> list[int]:
    """Target layer of each surrogate layer of T(a, b)."""
    if not 0 <= a < b < num_layers - 1:
        raise ValueError(f"T({a},{b}) needs 0 <= a < b < L-1 = {num_layers - 1} (--translator-start a, "
                         f"--translator-end b; the last layer is always kept)")
    return list(range(a)) + [a] + list(range(b + 1, num_layers))


def architecture_sha256(cfg: LlamaConfig) -> str:
    """SHA-256 of the architecture (every config field but the name and surrogate provenance): the same for a
    model's HF and sharded checkpoints."""
    fields = {k: v for k, v in cfg.to_dict().items() if k not in ("name", "surrogate")}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def surrogate_config(cfg: LlamaConfig, a: int, b: int, target_name: Optional[str] = None,
                     control_unfreeze_early: bool = False, extra: Optional[dict] = None) -> LlamaConfig:
    """The LlamaConfig of T(a, b) of ``cfg``, with its provenance in ``surrogate``."""
    if cfg.surrogate:
        raise ValueError(f"{cfg.name} is itself a surrogate (of {cfg.surrogate.get('target')}); build surrogates "
                         f"from the full target")
    mapping = layer_map(cfg.num_layers, a, b)
    stage1 = [a] + (list(range(0, a, 2)) if control_unfreeze_early else [])
    provenance = {
        "target": target_name or cfg.name, "target_num_layers": cfg.num_layers,
        "target_config_sha256": architecture_sha256(cfg), "translator_start": a, "translator_end": b,
        "translator_index": a, "layer_map": mapping, "stage1_trainable_layers": sorted(stage1),
        "control_unfreeze_early": control_unfreeze_early, **(extra or {}),
    }
    return dataclasses.replace(cfg, num_layers=len(mapping), name=f"{cfg.name}-T({a},{b})", surrogate=provenance)


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


def surrogate_canonical(cfg: LlamaConfig, canonical: Mapping[str, torch.Tensor], a: int, b: int,
                        target_name: Optional[str] = None, **kw) -> tuple[LlamaConfig, dict[str, torch.Tensor]]:
    """In-memory T(a, b) of a canonical state dict (small models, tests, the demo)."""
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
