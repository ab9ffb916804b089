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

Vocabulary rows past the true vocabulary (TP padding) are excluded from every softmax. This module computes on one
rank (TP=1, PP=1) with the whole model; a layer's logits are computed one layer at a time.
"""
from __future__ import annotations

from typing import Sequence

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
