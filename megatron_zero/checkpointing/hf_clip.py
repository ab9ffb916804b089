"""HuggingFace ``CLIPVisionModel`` <-> canonical encoder tensors (names of :class:`ClipVisionTransformer` at TP=1).

Layouts handled here:

* QKV: HF has separate ``q_proj``/``k_proj``/``v_proj`` with biases; megatron fuses them into ``linear_qkv``
  grouped per query group (``SelfAttention.get_query_key_value_tensors``). CLIP is multi-head attention, so
  ``num_query_groups == num_heads`` and the fused rows are per head: ``[q_0, k_0, v_0, q_1, k_1, v_1, ...]``
  (``head_dim`` rows each); biases are fused the same way;
* the rest is one-to-one (HF spells the pre-transformer norm ``pre_layrnorm``).

In the "llava" feature convention the last layer and ``post_layernorm`` are not built; :func:`unused_hf_keys`
lists the HF tensors that are then skipped on import (and absent on export).
"""
from __future__ import annotations

import re
from typing import Callable, Iterator, Mapping

import torch

from megatron_zero.models.clip_vit import ClipVisionConfig

HF_PREFIX = "vision_model."
_LAYER = re.compile(r"^transformer\.layers\.(\d+)\.(.+)$")
_GLOBAL = {
    "class_embedding": "embeddings.class_embedding",
    "patch_embedding.weight": "embeddings.patch_embedding.weight",
    "position_embedding.weight": "embeddings.position_embedding.weight",
    "pre_layernorm.weight": "pre_layrnorm.weight",
    "pre_layernorm.bias": "pre_layrnorm.bias",
    "post_layernorm.weight": "post_layernorm.weight",
    "post_layernorm.bias": "post_layernorm.bias",
}
_LAYER_SIMPLE = {
    "input_layernorm": "layer_norm1",
    "self_attention.linear_proj": "self_attn.out_proj",
    "pre_mlp_layernorm": "layer_norm2",
    "mlp.linear_fc1": "mlp.fc1",
    "mlp.linear_fc2": "mlp.fc2",
}


def canonical_keys(cfg: ClipVisionConfig) -> list[str]:
    """Every canonical tensor name of the encoder as built for ``cfg`` (stable order)."""
    keys = ["class_embedding", "patch_embedding.weight", "position_embedding.weight",
            "pre_layernorm.weight", "pre_layernorm.bias"]
    for i in range(cfg.num_built_layers):
        p = f"transformer.layers.{i}."
        for mod in ("input_layernorm", "self_attention.linear_qkv", "self_attention.linear_proj",
                    "pre_mlp_layernorm", "mlp.linear_fc1", "mlp.linear_fc2"):
            keys += [f"{p}{mod}.weight", f"{p}{mod}.bias"]
    if cfg.has_post_layernorm:
        keys += ["post_layernorm.weight", "post_layernorm.bias"]
    return keys


def hf_sources(ckey: str, prefix: str = HF_PREFIX) -> list[str]:
    """The HF tensor names canonical ``ckey`` is built from."""
    if ckey in _GLOBAL:
        return [prefix + _GLOBAL[ckey]]
    m = _LAYER.match(ckey)
    if m is None:
        raise KeyError(f"not a CLIP encoder canonical key: {ckey!r}")
    i, suffix = m.groups()
    mod, _, kind = suffix.rpartition(".")
    p = f"{prefix}encoder.layers.{i}."
    if mod in _LAYER_SIMPLE:
        return [f"{p}{_LAYER_SIMPLE[mod]}.{kind}"]
    if mod == "self_attention.linear_qkv":
        return [f"{p}self_attn.{x}_proj.{kind}" for x in "qkv"]
    raise KeyError(f"not a CLIP encoder canonical key: {ckey!r}")


def unused_hf_keys(cfg: ClipVisionConfig, prefix: str = HF_PREFIX) -> list[str]:
    """HF tensors the encoder does not use for ``cfg``'s features (the "llava" convention skips the last layer
    and ``post_layernorm``)."""
    if cfg.has_post_layernorm:
        return []
    last = f"{prefix}encoder.layers.{cfg.num_layers - 1}."
    keys = [prefix + "post_layernorm.weight", prefix + "post_layernorm.bias"]
    for mod in ("layer_norm1", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                "layer_norm2", "mlp.fc1", "mlp.fc2"):
        keys += [f"{last}{mod}.weight", f"{last}{mod}.bias"]
    return keys


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Separate q/k/v weights [h, d] (or biases [h]) -> megatron's per-head fused layout [3h, d] (or [3h])."""
    parts = [t.reshape(num_heads, -1, *t.shape[1:]) for t in (q, k, v)]
    return torch.cat(parts, dim=1).reshape(-1, *q.shape[1:])


def split_qkv(qkv: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`fuse_qkv`."""
    grouped = qkv.reshape(num_heads, 3, -1, *qkv.shape[1:])
    return tuple(grouped[:, j].reshape(-1, *qkv.shape[1:]).contiguous() for j in range(3))


def to_canonical(ckey: str, tensors: list[torch.Tensor], cfg: ClipVisionConfig) -> torch.Tensor:
    """Canonical tensor ``ckey`` from its HF sources (as listed by :func:`hf_sources`)."""
    if ".linear_qkv." in ckey:
        return fuse_qkv(*tensors, cfg.num_attention_heads)
    (t,) = tensors
    return t


def from_canonical(ckey: str, tensor: torch.Tensor, cfg: ClipVisionConfig,
                   prefix: str = HF_PREFIX) -> dict[str, torch.Tensor]:
    """HF tensors for canonical tensor ``ckey`` (inverse of :func:`to_canonical`)."""
    names = hf_sources(ckey, prefix)
    parts = split_qkv(tensor, cfg.num_attention_heads) if ".linear_qkv." in ckey else (tensor,)
    return {n: p.contiguous() for n, p in zip(names, parts)}


def canonical_getter(get_hf: Callable[[str], torch.Tensor] | Mapping[str, torch.Tensor], cfg: ClipVisionConfig,
                     prefix: str = HF_PREFIX) -> Callable[[str], torch.Tensor]:
    """Wrap an HF tensor reader into a canonical-key reader (for ``sharding.load_canonical``)."""
    lookup = get_hf.__getitem__ if isinstance(get_hf, Mapping) else get_hf

    def get(ckey: str) -> torch.Tensor:
        return to_canonical(ckey, [lookup(n) for n in hf_sources(ckey, prefix)], cfg)

    return get


def iter_hf(canonical: Iterator[tuple[str, torch.Tensor]], cfg: ClipVisionConfig,
            prefix: str = HF_PREFIX) -> Iterator[tuple[str, torch.Tensor]]:
    """HF (name, tensor) pairs from a stream of canonical encoder ones."""
    for ckey, t in canonical:
        yield from from_canonical(ckey, t, cfg, prefix).items()


def detect_prefix(hf_keys) -> str:
    """The prefix of the vision tower's tensors: ``vision_model.`` in HF checkpoint files (``CLIPModel`` and
    ``CLIPVisionModel``), none in the in-memory state dict of a transformers>=5 ``CLIPVisionModel``."""
    keys = list(hf_keys)
    for prefix in (HF_PREFIX, ""):
        if prefix + "embeddings.class_embedding" in keys:
            return prefix
    raise KeyError("no CLIP vision tower in these tensors (expected 'vision_model.embeddings.class_embedding' "
                   "or 'embeddings.class_embedding')")


def from_hf_model(hf_state: Mapping[str, torch.Tensor], cfg: ClipVisionConfig,
                  prefix: str | None = None) -> dict[str, torch.Tensor]:
    """The whole canonical encoder dict from an HF ``CLIPVisionModel``/``CLIPModel`` state dict (prefix detected
    unless given); refuses unexpected vision-tower tensors."""
    prefix = detect_prefix(hf_state) if prefix is None else prefix
    get = canonical_getter(hf_state, cfg, prefix)
    out = {k: get(k) for k in canonical_keys(cfg)}
    used = {n for k in out for n in hf_sources(k, prefix)} | set(unused_hf_keys(cfg, prefix))
    tower = [k for k in hf_state if k.startswith(prefix) and not k.startswith("text_model.")]
    extra = [k for k in tower if k not in used and not k.endswith("position_ids")
             and not k.startswith(("logit_scale", "visual_projection", "text_projection"))]
    if extra:
        raise ValueError(f"HF CLIP state dict has tensors this encoder config does not expect: {extra[:5]} "
                         f"(does {cfg.name!r} match the checkpoint's config?)")
    return out
