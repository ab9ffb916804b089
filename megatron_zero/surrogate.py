"""Surrogates T(a, b) of a target decoder (paper Sec. 1.2, Fig. 4).

T(a, b) keeps target layers ``0..a-1``, one *translator* initialised as a copy of layer ``a``, drops ``a+1..b``
and keeps ``b+1..L-1``: ``L - (b - a)`` layers (T(40,78) of Llama-3.1-70B keeps 42, T(16,26) of Llama-3.2-3B 18,
T(17,30) of Llama-3.1-8B 19). The translator sits at surrogate index ``a``. Embeddings, final norm and output
layer are the target's.

The surrogate's ``LlamaConfig.surrogate`` records its provenance — target, a, b, the translator index, the
surrogate-layer -> target-layer map and which layers stage 1 trains — so training knows the translator and
grafting can check that an encoder was trained on a surrogate of this very target.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Callable, Iterator, Mapping, Optional

import torch

from megatron_zero.models.llama_config import LlamaConfig

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


def layer_map(num_layers: int, a: int, b: int) -> list[int]:
    """Target layer of each surrogate layer of T(a, b)."""
    if not 0 <= a < b < num_layers:
        raise ValueError(f"T({a},{b}) needs 0 <= a < b < L = {num_layers} (--translator-start/--translator-end)")
    return list(range(a)) + [a] + list(range(b + 1, num_layers))


def surrogate_config(cfg: LlamaConfig, a: int, b: int, target_name: Optional[str] = None,
                     control_unfreeze_early: bool = False, extra: Optional[dict] = None) -> LlamaConfig:
    mapping = layer_map(cfg.num_layers, a, b)
    stage1 = [a] + (list(range(0, a, 2)) if control_unfreeze_early else [])
    provenance = {
        "target": target_name or cfg.name, "target_num_layers": cfg.num_layers, "translator_start": a,
        "translator_end": b, "translator_index": a, "layer_map": mapping, "stage1_trainable_layers": sorted(stage1),
        "control_unfreeze_early": control_unfreeze_early, **(extra or {}),
    }
    return dataclasses.replace(cfg, num_layers=len(mapping), name=f"{cfg.name}-T({a},{b})", surrogate=provenance)


def surrogate_key(ckey: str, mapping: list[int]) -> Optional[str]:
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
    """Surrogate / target decoder training FLOPs per token (Megatron's convention)."""
    from megatron_zero.training.flops import decoder_flops_per_step

    return decoder_flops_per_step(scfg, 1, seq_length) / decoder_flops_per_step(cfg, 1, seq_length)
