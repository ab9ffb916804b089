"""Dynamic length-weighted loss (A.11): hand-computed weights, the L = 1 guard, and the
global normaliser (micro-batched + data-parallel shards sum to the whole-batch loss, in one process and over gloo)."""
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from megatron_zero.loss.length_weighted import (
    LengthStats,
    gather_response_lengths,
    global_length_stats,
    response_lengths,
    response_weights,
    token_weights,
    weighted_loss,
)


def test_response_lengths_from_mask_and_segments():
    loss_mask = torch.tensor([[0, 1, 1, 0, 1, 1, 1], [1, 0, 0, 1, 1, 0, 0]])
    segment_ids = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [0, 0, 1, 1, 1, 2, 2]])
    lengths, index = response_lengths(loss_mask, segment_ids)
    assert lengths.tolist() == [2, 3, 1, 2]  # row 0: turns 0, 1; row 1: turns 0, 1
    assert index.tolist() == [[-1, 0, 0, -1, 1, 1, 1], [2, -1, -1, 3, 3, -1, -1]]
    with pytest.raises(ValueError, match="segment_ids must be >= 0"):
        response_lengths(loss_mask, -torch.ones_like(segment_ids))


def test_paper_weights_hand_computed():
    lengths = torch.tensor([2, 8, 4])
    stats = global_length_stats(lengths, "length-weighted", ord=0.5)
    raw = [math.sqrt(8 / math.log(2)), math.sqrt(8 / math.log(8)), math.sqrt(8 / math.log(4))]
    scale = sum(raw) / 14
    assert stats.max_length == 8 and stats.num_tokens == 14 and stats.weight_scale == pytest.approx(scale)
    expected = [r / scale for r in raw]
    assert response_weights(lengths, stats).tolist() == pytest.approx(expected, rel=1e-6)
    # the paper's normalisation: sum_i w_i = sum_i L_i, and shorter responses weigh more
    assert sum(expected) == pytest.approx(14)
    assert expected[0] > expected[2] > expected[1]


def test_paper_weights_ord_and_equal_lengths():
    lengths = torch.tensor([5, 5, 5])
    for ord_ in (0.5, 1.0, 2.0):
        stats = global_length_stats(lengths, "length-weighted", ord=ord_)
        # equal lengths: every w_i = (sum L / N) = L, whatever ord
        assert response_weights(lengths, stats).tolist() == pytest.approx([5.0, 5.0, 5.0])
    stats = global_length_stats(torch.tensor([3, 9]), "length-weighted", ord=2.0)
    raw = [(9 / math.log(3)) ** 2, (9 / math.log(9)) ** 2]
    assert response_weights(torch.tensor([3, 9]), stats).tolist() == pytest.approx([r * 12 / sum(raw) for r in raw])


def test_paper_guard_for_one_token_responses():
    """log 1 = 0: a one-token response is weighted like a two-token one (log max(L, 2)), never infinite."""
    lengths = torch.tensor([1, 2, 6])
    stats = global_length_stats(lengths, "length-weighted")
    w = response_weights(lengths, stats)
    assert torch.isfinite(w).all()
    assert w[0] == w[1]
    raw = [math.sqrt(6 / math.log(2))] * 2 + [math.sqrt(6 / math.log(6))]
    assert w.tolist() == pytest.approx([r * 9 / sum(raw) for r in raw], rel=1e-6)
    # all-one-token batch: max L = 1, weights stay finite and sum to sum L
    ones = torch.ones(3, dtype=torch.long)
    assert response_weights(ones, global_length_stats(ones, "length-weighted")).tolist() == pytest.approx([1.0] * 3)


def test_unknown_scheme_is_rejected():
    with pytest.raises(ValueError, match="--loss-weighting must be one of"):
        global_length_stats(torch.tensor([3]), "sequence-mean")


def _random_batch(generator, batch=8, seq=24, vocab=11):
    loss_mask = torch.rand(batch, seq, generator=generator) < 0.6
    segment_ids = torch.sort(torch.randint(0, 3, (batch, seq), generator=generator), dim=1).values
    logits = torch.randn(batch, seq, vocab, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, vocab, (batch, seq), generator=generator)
    return loss_mask, segment_ids, logits, labels


def _reference_loss(loss_mask, segment_ids, ce, scheme, ord_=0.5, micro_batches=None):
    """Whole-batch loss written out response by response, from the formulas (no library code)."""
    responses = {}  # (row, segment) -> list of token CEs
    for b in range(loss_mask.shape[0]):
        for s in range(loss_mask.shape[1]):
            if loss_mask[b, s]:
                responses.setdefault((b, int(segment_ids[b, s])), []).append(float(ce[b, s]))
    lengths = {k: len(v) for k, v in responses.items()}
    total = sum(lengths.values())
    if scheme == "token-mean":
        weights = {k: 1.0 for k in responses}
    elif scheme == "length-weighted":
        top = max(lengths.values())
        raw = {k: (top / math.log(max(n, 2))) ** ord_ for k, n in lengths.items()}
        scale = sum(raw.values()) / total
        weights = {k: r / scale for k, r in raw.items()}
    if scheme == "length-weighted":  # the paper's w_i weighs response i's *mean* token loss
        return sum(weights[k] * sum(v) / lengths[k] for k, v in responses.items()) / total
    return sum(weights[k] * sum(v) for k, v in responses.items()) / total


def _per_token_ce(logits, labels):
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view(labels.shape)


def test_token_mean_equals_masked_cross_entropy_mean():
    loss_mask, segment_ids, logits, labels = _random_batch(torch.Generator().manual_seed(0))
    stats = global_length_stats(response_lengths(loss_mask, segment_ids)[0], "token-mean")
    loss = weighted_loss(_per_token_ce(logits, labels), token_weights(loss_mask, segment_ids, stats), stats)
    expected = F.cross_entropy(logits[loss_mask], labels[loss_mask])
    torch.testing.assert_close(loss, expected)


# 8 rows = 2 fake data-parallel ranks x 2 micro-batches x 2 rows
DP_SHARDS = [[[0, 1], [2, 3]], [[4, 5], [6, 7]]]


@pytest.mark.parametrize("scheme", ["token-mean", "length-weighted"])  # released: tests/test_released_loss.py
def test_micro_batches_and_dp_shards_sum_to_the_whole_batch_loss(scheme):
    loss_mask, segment_ids, logits, labels = _random_batch(torch.Generator().manual_seed(1))
    ce = _per_token_ce(logits, labels)
    micro_batches = [rows for rank in DP_SHARDS for rows in rank]
    expected = _reference_loss(loss_mask, segment_ids, ce, scheme, micro_batches=micro_batches)

    # each rank collects its lengths before its micro-batch loop; the all-reduce is a sum/max over ranks, which
    # global_length_stats over all ranks' lengths reproduces in one process (the gloo test below runs it for real)
    per_rank_lengths = [[response_lengths(loss_mask[r], segment_ids[r])[0] for r in rank] for rank in DP_SHARDS]
    stats = global_length_stats([x for rank in per_rank_lengths for x in rank], scheme)
    total = 0.0
    for rank in DP_SHARDS:
        for rows in rank:
            w = token_weights(loss_mask[rows], segment_ids[rows], stats)
            total += float(weighted_loss(ce[rows], w, stats))
    assert total == pytest.approx(expected, rel=1e-6)  # float32 weights
    if scheme == "token-mean":
        assert expected == pytest.approx(float(F.cross_entropy(logits[loss_mask], labels[loss_mask])))


def _dp_worker(rank, world_size, init_file, scheme, results):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        loss_mask, segment_ids, logits, labels = _random_batch(torch.Generator().manual_seed(1))
        ce = _per_token_ce(logits, labels)
        my_rows = DP_SHARDS[rank]
        local = [response_lengths(loss_mask[r], segment_ids[r])[0] for r in my_rows]
        stats = global_length_stats(local, scheme, group=dist.group.WORLD)
        gathered = gather_response_lengths(torch.cat(local), group=dist.group.WORLD)
        loss = torch.zeros((), dtype=torch.float64)
        for rows in my_rows:
            loss += weighted_loss(ce[rows], token_weights(loss_mask[rows], segment_ids[rows], stats), stats)
        dist.all_reduce(loss)  # the DP reduction must sum the ranks' shares
        results[rank] = (stats, gathered.tolist(), float(loss))
    finally:
        dist.destroy_process_group()


def test_gloo_data_parallel_stats_gather_and_loss(tmp_path):
    loss_mask, segment_ids, logits, labels = _random_batch(torch.Generator().manual_seed(1))
    ce = _per_token_ce(logits, labels)
    all_lengths = [response_lengths(loss_mask[rows], segment_ids[rows])[0] for rank in DP_SHARDS for rows in rank]
    results = mp.Manager().dict()
    mp.spawn(_dp_worker, args=(2, str(tmp_path / "init"), "length-weighted", results), nprocs=2)
    single = global_length_stats(all_lengths, "length-weighted")
    expected = _reference_loss(loss_mask, segment_ids, ce, "length-weighted")
    for rank in range(2):
        stats, gathered, loss = results[rank]
        assert isinstance(stats, LengthStats) and stats.num_tokens == single.num_tokens
        assert stats.max_length == single.max_length
        assert stats.weight_scale == pytest.approx(single.weight_scale, rel=1e-12)
        assert gathered == torch.cat(all_lengths).tolist()
        assert loss == pytest.approx(expected, rel=1e-6)  # float32 weights


def test_paper_weighting_keeps_token_mean_scale():
    """Equal response lengths give exactly the token mean; unequal ones keep the token weights' mean at 1
    while a short response's mean loss counts more than under the token mean."""
    g = torch.Generator().manual_seed(5)
    loss_mask = torch.ones(4, 6, dtype=torch.bool)
    segment_ids = torch.zeros(4, 6, dtype=torch.long)  # four responses of length 6
    ce = torch.rand(4, 6, generator=g, dtype=torch.float64)
    stats = global_length_stats(response_lengths(loss_mask, segment_ids)[0], "length-weighted")
    w = token_weights(loss_mask, segment_ids, stats)
    assert weighted_loss(ce, w, stats).item() == pytest.approx(ce.mean().item(), rel=1e-6)
    loss_mask = torch.tensor([[1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    segment_ids = torch.zeros(2, 6, dtype=torch.long)
    stats = global_length_stats(response_lengths(loss_mask, segment_ids)[0], "length-weighted")
    w = token_weights(loss_mask, segment_ids, stats)
    assert w[loss_mask].double().mean().item() == pytest.approx(1.0, rel=1e-6)
    short_share, long_share = w[0].sum().item(), w[1].sum().item()  # each response's total weight
    assert short_share / long_share > 2 / 6  # token mean would give 2:6
