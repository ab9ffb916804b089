"""Tensor-parallel sharding between a *canonical* state dict and this rank's model chunk.

The canonical form is what a TP=PP=1 megatron-core model holds, with two differences that make it
independent of the parallel layout:

* decoder layers carry their *global* index (``decoder.layers.{global}.``), whatever stage holds them;
* vocabulary-sized tensors have the true (unpadded) vocabulary; padding rows are zero-filled on load.

Checkpoint conversion, surrogate building and the tests all go through these two functions, so there is one
place that knows how megatron-core splits a tensor: along the parameter's ``partition_dim``, except
SwiGLU's fused ``linear_fc1`` whose gate and up halves are split separately. (GQA's fused QKV is grouped
per query group, so a contiguous split is already correct.)
"""
from __future__ import annotations

import re
from typing import Callable, Iterator, Mapping, Optional

import torch
import torch.distributed as dist

_LAYER_RE = re.compile(r"^(.*?layers\.)(\d+)(\..*)$")
VOCAB_KEYS = ("embedding.word_embeddings.weight", "output_layer.weight")
# Transformer Engine fuses the pre-attention/pre-MLP norms into the following linear layer; canonical keys
# use the local spec's separate norm names so that a checkpoint does not depend on the layer spec.
TE_NORM_ALIASES = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "self_attention.linear_qkv.layer_norm_bias": "input_layernorm.bias",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
    "mlp.linear_fc1.layer_norm_bias": "pre_mlp_layernorm.bias",
}


def layer_index_map(model: torch.nn.Module) -> dict[int, int]:
    """Local decoder-layer index -> global index, from megatron's 1-based ``layer_number``."""
    decoder = getattr(model, "decoder", None)
    if decoder is None:
        return {}
    return {i: layer.layer_number - 1 for i, layer in enumerate(decoder.layers)}


def canonical_key(key: str, mapping: Mapping[int, int]) -> str:
    """The canonical name of local state-dict key ``key`` (global layer index, spec-independent norm names)."""
    for te_name, local_name in TE_NORM_ALIASES.items():
        if key.endswith(te_name):
            key = key[: -len(te_name)] + local_name
            break
    m = _LAYER_RE.match(key)
    if m is None or not m.group(1).startswith("decoder."):
        return key
    return f"{m.group(1)}{mapping[int(m.group(2))]}{m.group(3)}"


def _is_gated_fc1(key: str, model: torch.nn.Module) -> bool:
    return key.endswith("mlp.linear_fc1.weight") and getattr(model.config, "gated_linear_unit", False)


def shard(full: torch.Tensor, param: torch.Tensor, key: str, model, tp_rank: int, tp_size: int) -> torch.Tensor:
    """This TP rank's slice of canonical tensor ``full`` for local parameter ``param``."""
    if any(key.endswith(k) for k in VOCAB_KEYS):
        padded_rows = param.shape[0] * tp_size
        if full.shape[0] > padded_rows:
            raise ValueError(f"{key}: {full.shape[0]} vocabulary rows do not fit the model's {padded_rows}")
        if full.shape[0] < padded_rows:
            full = torch.cat([full, full.new_zeros(padded_rows - full.shape[0], *full.shape[1:])])
    if not getattr(param, "tensor_model_parallel", False) or tp_size == 1:
        return full
    dim = param.partition_dim
    if _is_gated_fc1(key, model):
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp_size, dim)[tp_rank], up.chunk(tp_size, dim)[tp_rank]], dim=0)
    return full.chunk(tp_size, dim)[tp_rank]


def unshard(pieces: list[torch.Tensor], param: torch.Tensor, key: str, model, vocab_size: Optional[int]) -> torch.Tensor:
    """Inverse of :func:`shard`: the canonical tensor from every TP rank's piece (in rank order)."""
    if not getattr(param, "tensor_model_parallel", False) or len(pieces) == 1:
        full = pieces[0]
    elif _is_gated_fc1(key, model):
        halves = [p.chunk(2, dim=0) for p in pieces]
        full = torch.cat([torch.cat([h[0] for h in halves]), torch.cat([h[1] for h in halves])])
    else:
        full = torch.cat(pieces, dim=param.partition_dim)
    if vocab_size is not None and any(key.endswith(k) for k in VOCAB_KEYS):
        full = full[:vocab_size]
    return full


def _params_and_buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state-dict tensors of ``model`` that hold weights (TE's ``_extra_state`` entries are skipped)."""
    out = {}
    for key, value in model.state_dict(keep_vars=True).items():
        if key.endswith("_extra_state") or not isinstance(value, torch.Tensor):
            continue
        out[key] = value
    return out


def load_canonical(
    model: torch.nn.Module,
    get: Callable[[str], torch.Tensor] | Mapping[str, torch.Tensor],
    tp_rank: int = 0,
    tp_size: int = 1,
    source: str = "checkpoint",
    skip: Optional[Callable[[str], bool]] = None,
) -> None:
    """Copy canonical tensors into this rank's model chunk. ``get`` maps a canonical key to its tensor;
    canonical keys for which ``skip(key)`` is true are left as built (e.g. fresh LoRA adapters).

    ``get`` may be a dict or a function (so conversion can stream from safetensors, reading only the
    tensors this rank needs). Tied output weights on the last stage are taken from the embedding.
    Raises ``KeyError`` naming the missing canonical key and ``ValueError`` on a shape mismatch.
    """
    lookup = get.__getitem__ if isinstance(get, Mapping) else get
    mapping = layer_index_map(model)
    tied = getattr(model, "share_embeddings_and_output_weights", False)
    with torch.no_grad():
        for key, param in _params_and_buffers(model).items():
            ckey = canonical_key(key, mapping)
            if tied and ckey == "output_layer.weight":
                ckey = "embedding.word_embeddings.weight"
            if skip is not None and skip(ckey):
                continue
            try:
                full = lookup(ckey)
            except KeyError:
                raise KeyError(f"{source} has no tensor {ckey!r} (needed for model parameter {key!r})") from None
            local = shard(full, param, key, model, tp_rank, tp_size)
            if tuple(local.shape) != tuple(param.shape):
                raise ValueError(
                    f"{source}: tensor {ckey!r} has shape {tuple(full.shape)}, which gives {tuple(local.shape)} on "
                    f"tensor-parallel rank {tp_rank}/{tp_size}, but the model expects {tuple(param.shape)} "
                    f"(does the model config match the weights?)"
                )
            param.copy_(local.to(param.dtype))


def iter_canonical(
    model: torch.nn.Module,
    tp_group: Optional[dist.ProcessGroup] = None,
    vocab_size: Optional[int] = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield this pipeline stage's canonical tensors, gathering TP pieces over ``tp_group`` (one at a time).

    Every TP rank must iterate (the gathers are collective); all receive the full tensors.
    """
    mapping = layer_index_map(model)
    tp_size = dist.get_world_size(tp_group) if tp_group is not None and dist.is_initialized() else 1
    tied = getattr(model, "share_embeddings_and_output_weights", False)
    has_embedding = getattr(model, "pre_process", True)
    for key, param in _params_and_buffers(model).items():
        ckey = canonical_key(key, mapping)
        if tied and ckey == "output_layer.weight" and has_embedding:
            continue  # the same tensor as the embedding
        if tied and ckey == "output_layer.weight":
            ckey = "embedding.word_embeddings.weight"
        t = param.detach()
        if tp_size > 1 and getattr(param, "tensor_model_parallel", False):
            pieces = [torch.empty_like(t) for _ in range(tp_size)]
            dist.all_gather(pieces, t.contiguous(), group=tp_group)
        else:
            pieces = [t]
        yield ckey, unshard(pieces, param, key, model, vocab_size)


def gather_canonical(models: list[torch.nn.Module], vocab_size: Optional[int] = None) -> dict[str, torch.Tensor]:
    """The whole canonical state dict on every rank (TP all-gather, then PP all-gather of objects).

    Meant for tests and small models; conversion streams with :func:`iter_canonical` instead.
    """
    from megatron.core import parallel_state as ps

    tp_group = ps.get_tensor_model_parallel_group()
    local: dict[str, torch.Tensor] = {}
    for m in models:
        for k, v in iter_canonical(m, tp_group, vocab_size):
            local[k] = v.cpu().clone()
    pp_size = ps.get_pipeline_model_parallel_world_size()
    if pp_size == 1:
        return local
    parts: list = [None] * pp_size
    dist.all_gather_object(parts, local, group=ps.get_pipeline_model_parallel_group())
    merged: dict[str, torch.Tensor] = {}
    for p in parts:
        for k, v in p.items():
            merged.setdefault(k, v)  # a tied embedding may appear on two stages; both hold the same value
    return merged
