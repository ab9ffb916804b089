"""The prediction trajectory of a decoder (paper Sec. 1.1, Eq. 1-4) and its transition point.

For tokens ``t`` (N of them) and the hidden state ``X_l`` after decoder layer ``l``::

    P   = softmax(norm(X_{L-1}) W^T)            (Eq. 1; norm = the model's final RMSNorm, W = output layer)
    p   = P[:-1, t[1:]]                          (Eq. 2; probability of the true next token, N-1 positions)
    q_l = softmax(norm(X_l) W^T)[:-1, t[1:]]     (Eq. 3)
    D_KL(q_l || p) = 1^T (q_l log(q_l / p))      (Eq. 4)

Eq. 4 compares *vectors over positions*, not distributions over the vocabulary. As in the authors' reference
implementation, ``q_l`` and ``p`` are first normalised over positions (each sums to 1) and clamped at 1e-6. The
last layer's KL is 0 by construction. ``metric="vocab-kl"`` gives the usual logit-lens view instead: the KL over
the full vocabulary between layer ``l``'s and the final next-token distributions, averaged over positions.

Vocabulary rows past the true vocabulary (TP padding) are excluded from every softmax. :func:`trajectory_kl` computes
on one rank with the whole model; :func:`parallel_trajectory_kl` runs under TP and PP (a 70B model is analysed on
8+ GPUs): every stage evaluates its own layers with the final norm and output layer broadcast from the last stage,
and softmax statistics are reduced over the tensor-parallel group, so full-vocabulary logits are never gathered.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

EPS = 1e-6
METRICS = ("position-kl", "vocab-kl")


def position_kl(q: torch.Tensor, p: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Eq. 4 over the last dimension (positions): ``q``/``p`` normalised over positions, clamped at ``eps``."""
    q = (q / q.sum(-1, keepdim=True)).clamp(min=eps)
    p = (p / p.sum(-1, keepdim=True)).clamp(min=eps)
    return (q * (q / p).log()).sum(-1)


def _layer_outputs(model, tokens: torch.Tensor) -> list[torch.Tensor]:
    """Hidden state after every decoder layer, ``[s, b, h]`` each (forward hooks on this rank's layers)."""
    outs: list[torch.Tensor] = []
    hooks = [layer.register_forward_hook(lambda _m, _i, o: outs.append(o[0] if isinstance(o, tuple) else o))
             for layer in model.decoder.layers]
    try:
        pos = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)
        model(tokens, pos, None)
    finally:
        for h in hooks:
            h.remove()
    return outs


def _log_probs(model, hidden: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """``log softmax(norm(X) W^T)`` ``[b, s, V]`` over the true vocabulary (padding rows excluded)."""
    x = model.decoder.final_layernorm(hidden)
    weight = model.shared_embedding_or_output_weight() if model.share_embeddings_and_output_weights else None
    logits, _ = model.output_layer(x, weight=weight)
    return torch.log_softmax(logits.float()[..., :vocab_size], dim=-1).transpose(0, 1)


@torch.no_grad()
def trajectory_kl(model, tokens: torch.Tensor, vocab_size: int, metric: str = "position-kl") -> torch.Tensor:
    """``[samples, layers]``: each layer's divergence from the final prediction, for each row of ``tokens``."""
    if metric not in METRICS:
        raise ValueError(f"--metric must be one of {METRICS}, got {metric!r}")
    model.eval()
    hidden = _layer_outputs(model, tokens)
    targets = tokens[:, 1:]
    final = _log_probs(model, hidden[-1], vocab_size)[:, :-1]  # [b, s-1, V]
    p = final.gather(-1, targets.unsqueeze(-1)).squeeze(-1).exp()
    out = []
    for h in hidden:
        lp = _log_probs(model, h, vocab_size)[:, :-1]
        if metric == "position-kl":
            q = lp.gather(-1, targets.unsqueeze(-1)).squeeze(-1).exp()
            out.append(position_kl(q, p))
        else:
            out.append((lp.exp() * (lp - final)).sum(-1).mean(-1))
    return torch.stack(out, dim=1)


def detect_transition(median: Sequence[float] | torch.Tensor, fraction: float = 0.1) -> int:
    """The transition layer of a (median) trajectory: the first layer from which the curve stays at or below
    ``fraction`` of its maximum for the rest of the network — where the curves have coalesced and only converge.

    Example: the toy target's median 0.99, 0.52, 0.27, 0.14, 0.056, 0.013, 0.003, 0 gives layer 4.
    """
    m = torch.as_tensor(median, dtype=torch.float64)
    if m.dim() != 1 or len(m) < 2:
        raise ValueError("detect_transition needs a 1-D curve over at least 2 layers")
    threshold = fraction * float(m.max())
    tail_max = torch.flip(torch.cummax(torch.flip(m, [0]), 0).values, [0])  # max of m[l:]
    below = torch.nonzero(tail_max <= threshold).flatten()
    return int(below[0]) if len(below) else len(m) - 1


@torch.no_grad()
def greedy_continue(model, ids: Sequence[int], vocab_size: int, max_new_tokens: int,
                    stop_token_ids: Sequence[int] = ()) -> list[int]:
    """Greedy continuation of ``ids`` by a text-only decoder (A.7's generated mode; full re-forward per token,
    which is fine for analysis-sized batches)."""
    out = list(ids)
    new: list[int] = []
    for _ in range(max_new_tokens):
        x = torch.tensor([out])
        pos = torch.arange(len(out)).unsqueeze(0)
        nxt = int(model(x, pos, None)[0, -1, :vocab_size].argmax())
        out.append(nxt)
        new.append(nxt)
        if nxt in stop_token_ids:
            break
    return new


# ---------------------------------------------------------------------------------------------------------
# Tensor + pipeline parallel
# ---------------------------------------------------------------------------------------------------------
def _vocab_parallel_target_logprob(logits: torch.Tensor, targets: torch.Tensor, vocab_size: int, tp_group,
                                   tp_rank: int) -> torch.Tensor:
    """log softmax(logits)[target] for this rank's vocabulary shard ``logits`` ``[..., V/tp]`` (padding excluded),
    with max / sum-exp / target-logit all-reduced over ``tp_group``."""
    import torch.distributed as dist

    shard = logits.shape[-1]
    start = tp_rank * shard
    valid = torch.arange(start, start + shard, device=logits.device) < vocab_size
    logits = logits.float().masked_fill(~valid, float("-inf"))
    m = logits.max(-1).values
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=tp_group)
    sumexp = (logits - m.unsqueeze(-1)).exp().sum(-1)
    dist.all_reduce(sumexp, group=tp_group)
    local = (targets >= start) & (targets < start + shard)
    picked = logits.gather(-1, (targets - start).clamp(0, shard - 1).unsqueeze(-1)).squeeze(-1)
    picked = torch.where(local, picked, torch.zeros_like(picked))
    dist.all_reduce(picked, group=tp_group)
    return picked - m - sumexp.log()


@torch.no_grad()
def parallel_trajectory_kl(model, tokens: torch.Tensor, vocab_size: int) -> Optional[torch.Tensor]:
    """Eq. 4 (position-KL) under TP/PP: ``[samples, layers]`` on global rank 0 (None elsewhere).

    Every rank passes the same ``tokens``; ``model`` is this rank's megatron-core chunk (no virtual stages).
    """
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_zero.parallel.sharding import layer_index_map

    model.eval()
    tp_group, pp_group = ps.get_tensor_model_parallel_group(), ps.get_pipeline_model_parallel_group()
    tp_rank = ps.get_tensor_model_parallel_rank()
    last = ps.get_pipeline_model_parallel_last_rank()
    # the final norm and this TP rank's output-layer shard, on every stage
    h = model.config.hidden_size
    if model.post_process:
        norm_w = model.decoder.final_layernorm.weight.detach().clone()
        out_w = (model.shared_embedding_or_output_weight() if model.share_embeddings_and_output_weights
                 else model.output_layer.weight).detach().clone()
    else:
        norm_w = torch.empty(h)
        out_w = None
    dist.broadcast(norm_w, src=last, group=pp_group)
    rows = torch.tensor([out_w.shape[0] if out_w is not None else 0])
    dist.broadcast(rows, src=last, group=pp_group)
    if out_w is None:
        out_w = torch.empty(int(rows), h)
    dist.broadcast(out_w, src=last, group=pp_group)
    eps = model.config.layernorm_epsilon

    outs: list[torch.Tensor] = []
    hooks = [layer.register_forward_hook(lambda _m, _i, o: outs.append(o[0] if isinstance(o, tuple) else o))
             for layer in model.decoder.layers]
    b, s = tokens.shape

    def step(_it, m):
        pos = torch.arange(s).unsqueeze(0).expand(b, -1)
        return m(tokens, pos, None), lambda out: (out.sum() * 0, torch.tensor(1, dtype=torch.int), {})

    try:
        get_forward_backward_func()(forward_step_func=step, data_iterator=iter([None]), model=[model],
                                    num_microbatches=1, seq_length=s, micro_batch_size=b, forward_only=True)
    finally:
        for hk in hooks:
            hk.remove()
    if model.config.sequence_parallel:
        from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

        outs = [gather_from_sequence_parallel_region(o, tensor_parallel_output_grad=False) for o in outs]
    targets = tokens[:, 1:]
    q = []
    for o in outs:
        x = torch.nn.functional.rms_norm(o.float(), (h,), norm_w.float(), eps)
        logits = (x @ out_w.float().t()).transpose(0, 1)[:, :-1]  # [b, s-1, V/tp]
        q.append(_vocab_parallel_target_logprob(logits, targets, vocab_size, tp_group, tp_rank).exp())
    p = q[-1] if model.post_process else torch.empty(b, s - 1)
    dist.broadcast(p, src=last, group=pp_group)
    mine = {layer_index_map(model)[i]: position_kl(qi, p) for i, qi in enumerate(q)}
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    if dist.get_rank() != 0:
        return None
    merged: dict[int, torch.Tensor] = {}
    for part in gathered:
        merged.update(part)
    return torch.stack([merged[i] for i in sorted(merged)], dim=1)
