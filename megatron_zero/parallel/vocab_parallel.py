"""Log-probabilities from vocabulary-parallel logits, without gathering the vocabulary (the one home of these
reductions: evaluation's token log-probabilities, the trajectory analysis' log-softmax, pick and KL).

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


def valid_ids(shard: int, first: int, vocab_size: int, device) -> torch.Tensor:
    """``[shard]`` bools: which of ids ``[first, first + shard)`` are tokens (not vocabulary padding)."""
    return torch.arange(first, first + shard, device=device) < vocab_size


def mask_vocab_padding(logits: torch.Tensor, vocab_size: int, first_id: int) -> torch.Tensor:
    """``logits[..., j]`` (the logit of id ``first_id + j``) set to ``-inf`` where that id is padding."""
    return logits.masked_fill(~valid_ids(logits.shape[-1], first_id, vocab_size, logits.device), float("-inf"))


def _all_reduce(t: torch.Tensor, group, op=dist.ReduceOp.SUM) -> None:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(t, op=op, group=group)


def _max_and_sum_exp(logits: torch.Tensor, group) -> tuple[torch.Tensor, torch.Tensor]:
    """The max and the sum of ``exp(logit - max)`` over the whole vocabulary (last dim, kept), from every TP rank's
    masked ``float`` shard: the two reductions every log-softmax here is made of."""
    top = logits.max(-1, keepdim=True).values
    _all_reduce(top, group, dist.ReduceOp.MAX)
    sum_exp = (logits - top).exp().sum(-1, keepdim=True)
    _all_reduce(sum_exp, group)
    return top, sum_exp


def log_softmax(logits: torch.Tensor, valid: torch.Tensor, group) -> torch.Tensor:
    """``log softmax`` over the whole (unpadded) vocabulary of this rank's shard ``[..., V/tp]``: padding ids get
    ``-inf``; the max and the sum of exponentials are all-reduced over ``group``."""
    logits = logits.float().masked_fill(~valid, float("-inf"))
    top, sum_exp = _max_and_sum_exp(logits, group)
    return logits - top - sum_exp.log()


def pick(log_probs: torch.Tensor, targets: torch.Tensor, first: int, group) -> torch.Tensor:
    """``log_probs[..., targets]`` for global ids ``targets``: taken on the TP rank whose shard owns each id."""
    shard = log_probs.shape[-1]
    local = (targets >= first) & (targets < first + shard)
    picked = log_probs.gather(-1, (targets - first).clamp(0, shard - 1).unsqueeze(-1)).squeeze(-1)
    picked = torch.where(local, picked, torch.zeros_like(picked))
    _all_reduce(picked, group)
    return picked


def kl(log_q: torch.Tensor, log_p: torch.Tensor, valid: torch.Tensor, group) -> torch.Tensor:
    """``sum_v q_v (log q_v - log p_v)`` over the whole vocabulary from both distributions' shards."""
    terms = torch.where(valid, log_q.exp() * (log_q - log_p), torch.zeros_like(log_q))
    out = terms.sum(-1)
    _all_reduce(out, group)
    return out


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, vocab_size: int,
                   group=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``log p(target)`` and "target is the argmax" for each row of this rank's vocab slice ``logits [N, V_local]``.

    ``targets [N]`` are global token ids (< ``vocab_size``). Collective over the TP group (``group``; default
    megatron-core's), so every TP rank must call it with the same ``targets``. The ``[N, V_local]`` log-probabilities
    are never formed: only the targets' logits are picked.
    """
    group, rank, _ = _tp_group_rank_size(group)
    v_local = logits.shape[-1]
    first = rank * v_local
    logits = mask_vocab_padding(logits.float(), vocab_size, first)
    top, sum_exp = _max_and_sum_exp(logits, group)
    top, sum_exp = top.squeeze(-1), sum_exp.squeeze(-1)
    target_logit = pick(logits, targets, first, group)
    return target_logit - top - torch.log(sum_exp), target_logit >= top


def gather_vocab(logits: torch.Tensor, vocab_size: int, group=None) -> torch.Tensor:
    """The full ``[N, vocab_size]`` logits from every TP rank's ``[N, V_local]`` slice (padding dropped)."""
    group, _, size = _tp_group_rank_size(group)
    if size > 1:
        pieces = [torch.empty_like(logits) for _ in range(size)]
        dist.all_gather(pieces, logits.contiguous(), group=group)
        logits = torch.cat(pieces, dim=-1)
    return logits[..., :vocab_size]
