"""Log-probabilities from vocabulary-parallel logits, without gathering the vocabulary.

Under tensor parallelism the output layer leaves each TP rank with the logits of a contiguous slice of the
(padded) vocabulary: rank ``r`` holds ids ``[r * V_local, (r + 1) * V_local)``. The log-softmax needs only three
reductions over the TP group -- the max, the sum of exponentials, and the target's logit -- so ``[N, V]`` logits
are never assembled. Padding rows (ids >= the true vocabulary size) are masked to ``-inf``: they are not tokens.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist


def _tp_group_rank_size(group) -> tuple[Optional[object], int, int]:
    if group is None:
        from megatron.core import parallel_state as ps

        if not ps.model_parallel_is_initialized():
            return None, 0, 1
        group = ps.get_tensor_model_parallel_group()
    return group, dist.get_rank(group), dist.get_world_size(group)


def mask_vocab_padding(logits: torch.Tensor, vocab_size: int, first_id: int) -> torch.Tensor:
    """``logits[..., j]`` (the logit of id ``first_id + j``) set to ``-inf`` where that id is padding."""
    ids = torch.arange(first_id, first_id + logits.shape[-1], device=logits.device)
    return logits.masked_fill(ids >= vocab_size, float("-inf"))


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, vocab_size: int,
                   group=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``log p(target)`` and "target is the argmax" for each row of this rank's vocab slice ``logits [N, V_local]``.

    ``targets [N]`` are global token ids (< ``vocab_size``). Collective over the TP group (``group``; default
    megatron-core's), so every TP rank must call it with the same ``targets``.
    """
    group, rank, size = _tp_group_rank_size(group)
    v_local = logits.shape[-1]
    first = rank * v_local
    logits = mask_vocab_padding(logits.float(), vocab_size, first)
    top = logits.max(dim=-1).values
    if size > 1:
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
    sum_exp = torch.exp(logits - top[:, None]).sum(dim=-1)
    in_slice = (targets >= first) & (targets < first + v_local)
    local_index = (targets - first).clamp(0, v_local - 1)
    target_logit = torch.where(in_slice, logits.gather(-1, local_index[:, None]).squeeze(-1),
                               torch.zeros_like(top))
    if size > 1:
        dist.all_reduce(sum_exp, group=group)
        dist.all_reduce(target_logit, group=group)
    return target_logit - top - torch.log(sum_exp), target_logit >= top


def gather_vocab(logits: torch.Tensor, vocab_size: int, group=None) -> torch.Tensor:
    """The full ``[N, vocab_size]`` logits from every TP rank's ``[N, V_local]`` slice (padding dropped)."""
    group, _, size = _tp_group_rank_size(group)
    if size > 1:
        pieces = [torch.empty_like(logits) for _ in range(size)]
        dist.all_gather(pieces, logits.contiguous(), group=group)
        logits = torch.cat(pieces, dim=-1)
    return logits[..., :vocab_size]
