"""HuggingFace Llama / Qwen3 / Qwen2.5 <-> canonical (megatron-core) tensor names and layouts, one tensor at a time.

The three families share HF's ``model.layers.N.{self_attn,mlp}`` names; what differs is which tensors exist
(the decoder config says): Qwen3's ``self_attn.{q,k}_norm.weight`` (canonical
``self_attention.{q,k}_layernorm.weight``, one ``head_dim`` vector shared by all heads) and Qwen2.5's
``self_attn.{q,k,v}_proj.bias`` (fused into ``self_attention.linear_qkv.bias`` in the same grouped layout as the
weights).

Layouts handled here:

* GQA QKV: megatron fuses q/k/v into ``linear_qkv`` grouped per query group —
  ``[q heads of group 0, k_0, v_0, q heads of group 1, k_1, v_1, ...]`` (each ``head_dim`` rows);
* SwiGLU: ``linear_fc1 = cat([gate_proj, up_proj])``;
* RoPE: both HF and megatron rotate halves (no interleaving), so q/k need no permutation;
* tied embeddings: HF has no ``lm_head.weight``; the canonical dict has no ``output_layer.weight``.
"""
from __future__ import annotations

import re
from typing import Callable, Iterator

import torch

from megatron_zero.models.llama_config import LlamaConfig

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")

# canonical per-layer suffix -> HF per-layer suffix, for the one-to-one tensors
_SIMPLE = {
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attention.q_layernorm.weight": "self_attn.q_norm.weight",
    "self_attention.k_layernorm.weight": "self_attn.k_norm.weight",
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
}
_GLOBAL = {
    "embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "decoder.final_layernorm.weight": "model.norm.weight",
    "output_layer.weight": "lm_head.weight",
}


def canonical_keys(cfg: LlamaConfig, layers: range | None = None) -> list[str]:
    """Every canonical key of a Llama model (optionally only some decoder layers), in a stable order."""
    keys = ["embedding.word_embeddings.weight"]
    for i in layers if layers is not None else range(cfg.num_layers):
        p = f"decoder.layers.{i}."
        keys += [p + "input_layernorm.weight", p + "self_attention.linear_qkv.weight"]
        if cfg.add_qkv_bias:
            keys.append(p + "self_attention.linear_qkv.bias")
        if cfg.qk_layernorm:
            keys += [p + "self_attention.q_layernorm.weight", p + "self_attention.k_layernorm.weight"]
        keys += [p + "self_attention.linear_proj.weight", p + "pre_mlp_layernorm.weight",
                 p + "mlp.linear_fc1.weight", p + "mlp.linear_fc2.weight"]
        if cfg.lora:  # adapters (no HF name: merged into the base weights on export)
            from megatron_zero.models.lora import lora_keys

            keys += lora_keys(cfg, i)
    keys.append("decoder.final_layernorm.weight")
    if not cfg.tie_word_embeddings:
        keys.append("output_layer.weight")
    return keys


def hf_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """The shape of every HF tensor of a Llama with config ``cfg`` (to check a checkpoint against its config)."""
    d, f = cfg.hidden_size, cfg.ffn_hidden_size
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_query_groups * cfg.head_dim
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, d), "model.norm.weight": (d,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, d)
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
            p + "self_attn.q_proj.weight": (q, d), p + "self_attn.k_proj.weight": (kv, d),
            p + "self_attn.v_proj.weight": (kv, d), p + "self_attn.o_proj.weight": (d, q),
            p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d), p + "mlp.down_proj.weight": (d, f),
        })
        if cfg.add_qkv_bias:
            shapes.update({p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                           p + "self_attn.v_proj.bias": (kv,)})
        if cfg.qk_layernorm:
            shapes.update({p + "self_attn.q_norm.weight": (cfg.head_dim,), p + "self_attn.k_norm.weight": (cfg.head_dim,)})
    return shapes


def hf_sources(ckey: str) -> list[str]:
    """The HF tensor names that canonical ``ckey`` is built from."""
    if ckey in _GLOBAL:
        return [_GLOBAL[ckey]]
    m = _LAYER.match(ckey)
    if m is None:
        raise KeyError(f"not a Llama canonical key: {ckey!r}")
    i, suffix = m.groups()
    p = f"model.layers.{i}."
    if suffix in _SIMPLE:
        return [p + _SIMPLE[suffix]]
    if suffix in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"):
        kind = suffix.rsplit(".", 1)[1]
        return [p + f"self_attn.{x}_proj.{kind}" for x in "qkv"]
    if suffix == "mlp.linear_fc1.weight":
        return [p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"]
    raise KeyError(f"not a Llama canonical key: {ckey!r}")


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: LlamaConfig) -> torch.Tensor:
    """Weights ``[out, in]`` or biases ``[out]``: grouped per query group as megatron's ``linear_qkv``."""
    g, hd = cfg.num_query_groups, cfg.head_dim
    per = cfg.num_attention_heads // g
    rest = q.shape[1:]
    q = q.reshape(g, per * hd, *rest)
    k = k.reshape(g, hd, *rest)
    v = v.reshape(g, hd, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)


def split_qkv(qkv: torch.Tensor, cfg: LlamaConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g, hd = cfg.num_query_groups, cfg.head_dim
    per = cfg.num_attention_heads // g
    rest = qkv.shape[1:]
    grouped = qkv.reshape(g, (per + 2) * hd, *rest)
    q, k, v = torch.split(grouped, [per * hd, hd, hd], dim=1)
    return q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)


def to_canonical(ckey: str, tensors: list[torch.Tensor], cfg: LlamaConfig) -> torch.Tensor:
    """Canonical tensor ``ckey`` from its HF sources (as listed by :func:`hf_sources`)."""
    if ckey.endswith(("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias")):
        return fuse_qkv(*tensors, cfg)
    if ckey.endswith("mlp.linear_fc1.weight"):
        return torch.cat(tensors, dim=0)
    (t,) = tensors
    return t


def from_canonical(ckey: str, tensor: torch.Tensor, cfg: LlamaConfig) -> dict[str, torch.Tensor]:
    """HF tensors for canonical tensor ``ckey`` (inverse of :func:`to_canonical`)."""
    names = hf_sources(ckey)
    if ckey.endswith(("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias")):
        parts = split_qkv(tensor, cfg)
    elif ckey.endswith("mlp.linear_fc1.weight"):
        parts = tensor.chunk(2, dim=0)
    else:
        parts = (tensor,)
    return {n: p.contiguous() for n, p in zip(names, parts)}


def canonical_getter(get_hf: Callable[[str], torch.Tensor], cfg: LlamaConfig) -> Callable[[str], torch.Tensor]:
    """Wrap an HF tensor reader into a canonical-key reader (for ``sharding.load_canonical``)."""

    def get(ckey: str) -> torch.Tensor:
        return to_canonical(ckey, [get_hf(n) for n in hf_sources(ckey)], cfg)

    return get


def iter_hf(canonical: Iterator[tuple[str, torch.Tensor]], cfg: LlamaConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """HF (name, tensor) pairs from a stream of canonical ones."""
    for ckey, t in canonical:
        yield from from_canonical(ckey, t, cfg).items()
