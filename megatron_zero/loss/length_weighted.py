"""Per-token loss weights: token mean, and the dynamic length-weighted loss of the paper's appendix (A.11).

A *response* is the set of loss-carrying tokens of one assistant turn: the tokens with ``loss_mask`` true that
share a row and a ``segment_ids`` value (the data pipeline numbers the assistant turns of each packed row). Its
length ``L_i`` is its number of loss-carrying tokens (the response tokens plus the turn-closing ``<|eot_id|>``, and
the header tokens in encoder-only stages). ``--loss-weighting`` picks the weight ``w_i`` given to every token of
response ``i``:

``token-mean``
    ``w_i = 1``.

``length-weighted`` (the paper, A.11), over all ``N`` responses of the *global* batch (all data-parallel ranks,
all micro-batches)::

    w_i = (max_j L_j / log max(L_i, 2)) ** ord,     w_i <- w_i / (sum_j w_j / sum_j L_j),     ord = 0.5

    Guard: ``log 1 = 0`` would make a one-token response's weight infinite, so lengths enter the logarithm as
    ``max(L_i, 2)``: a one-token response (an empty answer closed by ``<|eot_id|>``) is weighted like a two-token
    one (``"Yes<|eot_id|>"``), the largest finite weight of the formula. ``max_j L_j`` and ``sum_j L_j`` use the
    true lengths.

    How ``w_i`` is applied (our reading, since A.11 does not spell it out): ``w_i`` multiplies response ``i``'s
    *mean* token loss, i.e. each of its tokens gets weight ``w_i / L_i``. The normalisation ``sum_i w_i = sum_i L_i``
    then makes the token weights average exactly 1 over the global batch, so the loss stays on the token mean's
    scale (equal lengths give exactly the token mean) and gradient clipping at 1.0 means the same as without
    weighting. Multiplying every *token* of response ``i`` by ``w_i`` instead would put the loss at about
    ``mean(L)`` times the token mean's scale.

``length-weighted-released`` (the authors' released code, ``engine_ar_instruction_llama.py::
_calc_loss_weights_with_batchmean``, which differs from the paper) -- see :func:`released_token_weights`; it
works on *segments*, not on the loss-carrying runs above.

In the first two schemes the loss is ``sum_t w_t * CE_t / T`` with ``T = sum_j L_j`` the number of loss-carrying tokens of
the global batch, so that all-ones weights give exactly the token mean. Because ``T`` and the paper's
``max_j L_j`` and ``sum_j w_j`` are global, each micro-batch's ``sum_t w_t * CE_t / T`` is its exact share: summed
over micro-batches and data-parallel ranks it equals the whole-batch loss. So the data-parallel gradient reduction
must *sum* (not average) the ranks' gradients, and the micro-batch losses must not be divided by the number of
micro-batches.

Usage in the training loop (before the micro-batch loop)::

    local = [response_lengths(mb.loss_mask, mb.segment_ids)[0] for mb in micro_batches]   # this DP rank's
    stats = global_length_stats(local, scheme, ord=0.5, group=dp_group)                   # all-reduces
    for mb in micro_batches:
        w = token_weights(mb.loss_mask, mb.segment_ids, stats)
        loss = (w * ce_per_token).sum() / stats.num_tokens      # or the fused kernel with normaliser=num_tokens
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from megatron_zero.parallel.collectives import comm_device

__all__ = [
    "DEFAULT_ORD",
    "DEFAULT_RELEASED_ORD",
    "LOSS_WEIGHTINGS",
    "released_segments",
    "released_token_weights",
    "LengthStats",
    "gather_response_lengths",
    "global_length_stats",
    "response_lengths",
    "response_weights",
    "token_weights",
    "weighted_loss",
]

LOSS_WEIGHTINGS = ("token-mean", "length-weighted", "length-weighted-released")
DEFAULT_ORD = 0.5
DEFAULT_RELEASED_ORD = 1.0  # their balance_loss_exp_ord default (config_base.py)
_MIN_LOG_LENGTH = 2  # the paper formula's guard: log(max(L, 2))


def _check_scheme(scheme: str) -> None:
    if scheme not in LOSS_WEIGHTINGS:
        raise ValueError(f"--loss-weighting must be one of {', '.join(LOSS_WEIGHTINGS)}, got {scheme!r}")


@dataclass(frozen=True)
class LengthStats:
    """What the weights of one global batch depend on, identical on every data-parallel rank.

    Attributes:
        scheme: one of :data:`LOSS_WEIGHTINGS`.
        ord: the exponent of the length-weighted schemes.
        num_tokens: ``T = sum_j L_j``, the loss normaliser (loss-carrying tokens of the global batch).
        max_length: ``max_j L_j`` over the global batch.
        weight_scale: the paper's ``sum_j w_j / sum_j L_j`` (1 for the other schemes).
    """

    scheme: str
    ord: float
    num_tokens: float
    max_length: float
    weight_scale: float = 1.0


def response_lengths(loss_mask: torch.Tensor, segment_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The responses of a micro-batch: their lengths, and which response each token belongs to.

    Args:
        loss_mask: ``[batch, seq]`` bool (or 0/1), the tokens that carry loss.
        segment_ids: ``[batch, seq]`` integer turn ids, ``>= 0`` on loss-carrying tokens; tokens of one row with the
            same id form one response.

    Returns:
        ``lengths`` (int64 ``[num_responses]``, ordered by row then segment id) and ``response_index``
        (int64 ``[batch, seq]``, the response of each token, -1 where the token carries no loss).
    """
    if loss_mask.shape != segment_ids.shape or loss_mask.dim() != 2:
        raise ValueError(
            f"response_lengths: loss_mask and segment_ids must both be [batch, seq], "
            f"got {tuple(loss_mask.shape)} and {tuple(segment_ids.shape)}"
        )
    mask = loss_mask.bool()
    seg = segment_ids.long()
    if bool((seg[mask] < 0).any()):
        raise ValueError("response_lengths: segment_ids must be >= 0 on every loss-carrying token")
    rows = torch.arange(mask.shape[0], device=mask.device)[:, None].expand_as(seg)
    keys = rows * (int(seg.max()) + 1 if seg.numel() else 1) + seg  # unique per (row, segment id)
    _, inverse, lengths = torch.unique(keys[mask], return_inverse=True, return_counts=True)
    response_index = torch.full_like(seg, -1)
    response_index[mask] = inverse
    return lengths, response_index


def _paper_raw_weights(lengths: torch.Tensor, max_length: float, ord: float) -> torch.Tensor:
    """``(max_j L_j / log max(L_i, 2)) ** ord`` in float64."""
    log_len = lengths.double().clamp(min=_MIN_LOG_LENGTH).log()
    return (max_length / log_len) ** ord


def _reduction_device(group: dist.ProcessGroup | None, fallback: torch.device) -> torch.device:
    """Where ``group``'s backend reduces (:func:`megatron_zero.parallel.collectives.comm_device`), else ``fallback``."""
    device = comm_device(group) if group is not None else fallback
    return fallback if device.type == "cpu" else device


def global_length_stats(
    local_lengths: Sequence[torch.Tensor] | torch.Tensor,
    scheme: str,
    ord: float = DEFAULT_ORD,
    group: dist.ProcessGroup | None = None,
) -> LengthStats:
    """The global batch's :class:`LengthStats` from this rank's response lengths (all its micro-batches).

    With a data-parallel ``group`` of several ranks, ``max_j L_j`` is all-reduced with MAX, then ``sum_j L_j`` and
    the paper's ``sum_j w_j`` with SUM (two small all-reduces, float64). Without one, the lengths are the whole
    global batch.
    """
    _check_scheme(scheme)
    if not ord > 0:
        raise ValueError(f"global_length_stats: ord must be > 0, got {ord}")
    if isinstance(local_lengths, torch.Tensor):
        local_lengths = [local_lengths]
    lengths = torch.cat([torch.as_tensor(x).reshape(-1) for x in local_lengths]) if local_lengths else None
    if lengths is None or lengths.numel() == 0:
        lengths = torch.zeros(0, dtype=torch.float64)
    if bool((lengths < 1).any()):
        raise ValueError("global_length_stats: response lengths must be >= 1")
    distributed = group is not None and dist.get_world_size(group) > 1
    device = _reduction_device(group, lengths.device) if distributed else lengths.device
    lengths = lengths.to(device=device, dtype=torch.float64)

    max_length = lengths.max() if lengths.numel() else torch.zeros((), dtype=torch.float64, device=device)
    if distributed:
        dist.all_reduce(max_length, op=dist.ReduceOp.MAX, group=group)
    raw_sum = _paper_raw_weights(lengths, float(max_length), ord).sum() if scheme == "length-weighted" else 0.0
    sums = torch.stack([lengths.sum(), torch.as_tensor(raw_sum, dtype=torch.float64, device=device)])
    if distributed:
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
    num_tokens, raw_sum = float(sums[0]), float(sums[1])
    if num_tokens == 0:
        raise ValueError("global_length_stats: the global batch has no loss-carrying tokens")
    weight_scale = raw_sum / num_tokens if scheme == "length-weighted" else 1.0
    return LengthStats(scheme, float(ord), num_tokens, float(max_length), weight_scale)


def gather_response_lengths(local_lengths: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """All response lengths of the global batch, rank by rank (``all_gather`` over the data-parallel ``group``).

    For logging and for reproducing a run's weights offline; :func:`global_length_stats` needs only all-reduces.
    """
    local = local_lengths.reshape(-1).long()
    if group is None or dist.get_world_size(group) == 1:
        return local.clone()
    device = _reduction_device(group, local.device)
    local = local.to(device)
    world = dist.get_world_size(group)
    counts = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(world)]
    dist.all_gather(counts, torch.tensor([local.numel()], device=device), group=group)
    longest = max(int(c) for c in counts)
    padded = torch.zeros(longest, dtype=torch.long, device=device)
    padded[: local.numel()] = local
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded, group=group)
    return torch.cat([g[: int(c)] for g, c in zip(gathered, counts)]).to(local_lengths.device)


def response_weights(lengths: torch.Tensor, stats: LengthStats) -> torch.Tensor:
    """``w_i`` (float32) for the responses of one micro-batch, given the global batch's ``stats``."""
    _check_scheme(stats.scheme)
    if stats.scheme == "token-mean" or lengths.numel() == 0:
        return torch.ones(lengths.shape, dtype=torch.float32, device=lengths.device)
    if stats.scheme == "length-weighted":
        return (_paper_raw_weights(lengths, stats.max_length, stats.ord) / stats.weight_scale).float()
    raise ValueError("length-weighted-released weighs eot-delimited segments: use released_token_weights")


def token_weights(loss_mask: torch.Tensor, segment_ids: torch.Tensor, stats: LengthStats) -> torch.Tensor:
    """Per-token weights ``[batch, seq]`` (float32) of one micro-batch, 0 off the mask: the response's ``w_i``,
    divided by its length ``L_i`` for the paper's scheme (see the module docstring)."""
    lengths, response_index = response_lengths(loss_mask, segment_ids)
    weights = response_weights(lengths, stats)
    if stats.scheme == "length-weighted" and lengths.numel():
        weights = weights / lengths.to(weights.dtype)
    out = torch.zeros(response_index.shape, dtype=torch.float32, device=response_index.device)
    on = response_index >= 0
    out[on] = weights[response_index[on]]
    return out


def weighted_loss(per_token_ce: torch.Tensor, weights: torch.Tensor, stats: LengthStats) -> torch.Tensor:
    """This micro-batch's share of the global loss: ``sum_t w_t * CE_t / T``."""
    return (weights * per_token_ce).sum() / stats.num_tokens


# ---------------------------------------------------------------------------------------------------------
# length-weighted-released: the authors' _calc_loss_weights_with_batchmean
# ---------------------------------------------------------------------------------------------------------
@dataclass
class ReleasedSegments:
    """The ``<|eot_id|>``-delimited segments of one micro-batch, as their code counts them.

    Attributes:
        lengths: float64 ``[n]``, ``L`` of each segment.
        text_only: bool ``[n]``, the segment's sample has no image positions.
        index: long ``[batch, seq]``, the segment of each (shifted) label position, -1 outside samples.
        num_tokens: loss-carrying tokens of the micro-batch.
    """

    lengths: torch.Tensor
    text_only: torch.Tensor
    index: torch.Tensor
    num_tokens: int


def released_segments(labels: torch.Tensor, loss_mask: torch.Tensor, segment_ids: torch.Tensor,
                      image_mask: Optional[torch.Tensor], eot_id: int) -> ReleasedSegments:
    """Segments of a (packed or unpacked) micro-batch in *their* counting.

    Their code works on the unshifted target of one sample (``t[p]`` = token ``p`` where it carries loss, else
    ignore) and splits it after every ``<|eot_id|>`` target: segment ``k`` is target positions
    ``e_{k-1}+1 .. e_k`` and ``L_k = e_k - e_{k-1}`` counts *every* position (``<|begin_of_text|>``, prompt, image
    positions, response), since nothing in a target equals their pad id. Which ``<|eot_id|>`` are targets depends on
    the loss mask: the assistant's always, the user's only with special-token loss -- so without it a segment runs
    from one response's end through the next prompt to the next response's end. The segment's weight goes to the
    loss of every target position in it; target ``p`` is our label position ``p - 1`` (labels are shifted), so the
    first segment of a sample has one position (the ``<|begin_of_text|>`` target, never predicted) more than label
    positions.

    Here every sample (``segment_ids`` value of a row, -1 = padding) is one of their rows. A trailing segment with
    no closing ``<|eot_id|>`` counts only if it carries loss (a sample truncated mid-response: theirs forces an
    ``<|eot_id|>`` target at ``max_seq_len``; here the response's tokens keep their own targets). Not reproduced:
    for rows shorter than their batch's longest, their ``t[-1] = eot_id`` also turns the padding tail into a
    segment and adds a spurious ``<|eot_id|>`` target at the last padded position -- it depends on their padding
    to the batch's longest row, which static ``--seq-length`` rows do not have.
    """
    if not (labels.shape == loss_mask.shape == segment_ids.shape) or labels.dim() != 2:
        raise ValueError(f"released_segments: labels, loss_mask and segment_ids must be [batch, seq], got "
                         f"{tuple(labels.shape)}, {tuple(loss_mask.shape)}, {tuple(segment_ids.shape)}")
    mask = loss_mask.bool()
    index = torch.full(labels.shape, -1, dtype=torch.long)
    lengths: list[int] = []
    text_only: list[bool] = []
    for r in range(labels.shape[0]):
        seg_row = segment_ids[r]
        for sample in torch.unique(seg_row[seg_row >= 0]).tolist():
            pos = torch.nonzero(seg_row == sample).squeeze(1)
            n = pos.numel()
            flags = (mask[r, pos] & (labels[r, pos] == eot_id)).long()
            has_image = image_mask is not None and bool(image_mask[r, pos].any())
            before = torch.cumsum(flags, 0) - flags  # eot targets strictly before each label position
            ends = [x + 1 for x in torch.nonzero(flags).squeeze(1).tolist()]  # their e_k (label j <-> target j+1)
            seg_len = [ends[0] + 1] + [b - a for a, b in zip(ends, ends[1:])] if ends else []
            tail = before == len(ends)  # label positions after the last eot target
            if bool((mask[r, pos] & tail).any()):  # truncated mid-response: the tail is a segment
                seg_len.append(n - 1 - ends[-1] if ends else n)
            else:
                before = torch.where(tail, torch.full_like(before, -1), before)
            index[r, pos] = torch.where(before >= 0, before + len(lengths), before)
            lengths += seg_len
            text_only += [not has_image] * len(seg_len)
    return ReleasedSegments(torch.tensor(lengths, dtype=torch.float64), torch.tensor(text_only, dtype=torch.bool),
                            index, int(mask.sum()))


def released_token_weights(micro_batches: Sequence[ReleasedSegments], ord: float = DEFAULT_RELEASED_ORD,
                           avg_norm: bool = False, group: Optional[dist.ProcessGroup] = None,
                           match_normaliser: bool = True) -> list[torch.Tensor]:
    """Per-token weights ``[batch, seq]`` of each micro-batch of this rank, exactly their formula::

        s_i = log(L_i + 1) / max_j log(L_j + 1)      max over micro-step k's segments on *all* DP ranks
        w_i = s_i ** -ord                             ord = 1 (their balance_loss_exp_ord default)
        w_i <- w_i / mean_j w_j                       only with avg_norm (their balance_loss_exp_avg_norm, off);
                                                      mean over micro-step k's segments on all DP ranks
        w_i <- max(w_i, 1)

    Segments of text-only samples enter the maximum and the mean with ``L = 1`` and get weight 1. Micro-batch
    ``k`` of every data-parallel rank is their micro-step ``k`` (one all-reduce MAX and one SUM cover all of them).

    ``match_normaliser``: their loss is ``(1/K) sum_k [sum_{DP} sum_t w_t CE_t] / T_k`` (``T_k`` = loss tokens of
    micro-step ``k`` on all ranks, ``K`` micro-steps); with the per-token convention here (divide by the global
    token count ``T``), the weights are multiplied by ``T / (K T_k)`` so the loss is theirs exactly. (Their FSDP
    additionally averages gradients over ranks after the summed loss, a constant ``1/world`` gradient factor that is
    not reproduced.)
    """
    if not ord > 0:
        raise ValueError(f"--loss-weighting-ord must be > 0, got {ord}")
    K = len(micro_batches)
    if K == 0:
        return []
    distributed = group is not None and dist.get_world_size(group) > 1
    device = _reduction_device(group, torch.device("cpu")) if distributed else torch.device("cpu")
    logs = [torch.log(torch.where(m.text_only, torch.ones_like(m.lengths), m.lengths) + 1) for m in micro_batches]
    top = torch.stack([x.max() if x.numel() else torch.zeros((), dtype=torch.float64) for x in logs]).to(device)
    if distributed:
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
    top = top.cpu()
    raw = [(x / top[k]).pow(-ord) if x.numel() else x for k, x in enumerate(logs)]
    sums = torch.tensor([[float(r.sum()), float(r.numel()), float(m.num_tokens)] for r, m in zip(raw, micro_batches)],
                        dtype=torch.float64, device=device)
    if distributed:
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
    sums = sums.cpu()
    total_tokens = float(sums[:, 2].sum())
    out = []
    for k, (m, r) in enumerate(zip(micro_batches, raw)):
        w = r / (sums[k, 0] / sums[k, 1]) if avg_norm and r.numel() else r
        w = torch.where(m.text_only, torch.ones_like(w), w.clamp(min=1.0))
        scale = total_tokens / (K * float(sums[k, 2])) if match_normaliser and float(sums[k, 2]) > 0 else 1.0
        tok = torch.zeros(m.index.shape, dtype=torch.float64)
        on = m.index >= 0
        if w.numel():
            tok[on] = w[m.index[on]]
        out.append((tok * scale).float())
    return out
