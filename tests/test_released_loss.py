"""``--loss-weighting length-weighted-released`` against an independent re-computation of the authors' code.

The reference follows ``engine_ar_instruction_llama.py`` step by step on *their* data layout: one unshifted target
per sample (``IGNORE`` except where the loss mask is on, the image placeholder widened to ``E`` ignored
positions), ``tensor_split`` after every ``<|eot_id|>`` target, segment counts ``(seg != pad_id).sum()``, text rows'
counts set to 1, ``log(c + 1)``, the max over all ranks' rows of the micro-step, ``1 / ws ** ord``, the optional
mean-normalisation, ``clamp(min=1)``, the fill, then ``sum(w[:, 1:] * CE) / num_tokens`` per micro-step and the
mean over micro-steps (their ``loss / grad_accum_steps``). Ours runs on the shifted, expanded batches the
training loop builds -- unpacked (one sample per row, padded) and packed (several samples per row).
"""
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron_zero.data.chat_template import Message, chat_template_for
from megatron_zero.data.datasets import Sample
from megatron_zero.data.tokenizers import load_tokenizer
from megatron_zero.loss.length_weighted import released_segments, released_token_weights

IGNORE, E = -100, 5

CONVERSATIONS = [
    [Message("user", "<image>\nWhat is shown?"), Message("assistant", "A red bus on a wet street at night.")],
    [Message("user", "Name a colour."), Message("assistant", "Blue.")],  # text-only
    [Message("user", "<image>\nCount the cats."), Message("assistant", "Two."),
     Message("user", "And the dogs? Explain where they are."),
     Message("assistant", "There is one dog, lying under the table near the window, mostly hidden by a chair.")],
    [Message("user", "Describe the weather today in one long sentence please."),
     Message("assistant", "It is sunny with a light breeze and a few clouds drifting over the hills.")],
    [Message("user", "Where is it?\n<image>"), Message("assistant", "In a kitchen.")],
    [Message("user", "<image>\nWhat colour is the car?"), Message("assistant", "Green.")],
    [Message("user", "Say hi."), Message("assistant", "Hi!")],
    [Message("user", "<image>\nIs it raining?"), Message("assistant", "No, the sky is clear and the road is dry.")],
]
# 2 data-parallel ranks x 2 micro-steps x 2 samples
RANKS = [[[0, 1], [2, 3]], [[4, 5], [6, 7]]]


@pytest.fixture(scope="module")
def tokenizer():
    import llama_models

    with pytest.MonkeyPatch.context() as mp_:
        mp_.setenv("TIKTOKEN_CACHE_DIR", "")
        yield load_tokenizer(Path(llama_models.__file__).parent / "llama3" / "tokenizer.model")


def _samples(tokenizer, special):
    template = chat_template_for(tokenizer, prompt_format="zero")
    out = []
    for i, conv in enumerate(CONVERSATIONS):
        enc = template.encode(conv, loss_on_special_tokens=special, rng=random.Random(i))
        out.append(Sample(np.asarray(enc.input_ids), np.asarray(enc.loss_mask),
                          ["img.png"] * enc.num_images, "t", str(i)))
    return out, template.image_placeholder_id, tokenizer.special_token_id("<|eot_id|>")


def _ce(sample_index, n):
    """A fixed pseudo cross-entropy for predicting position p + 1 of (expanded) sample ``i`` from position p."""
    g = torch.Generator().manual_seed(100 + sample_index)
    return torch.rand(n, generator=g, dtype=torch.float64) * 3


def _their_target(sample, img_id):
    """forward_hf's target for one sample: loss tokens kept, the rest IGNORE, the image as E IGNOREs."""
    target = []
    for t, m in zip(sample.input_ids.tolist(), sample.loss_mask.tolist()):
        target += [IGNORE] * E if t == img_id else [t if m else IGNORE]
    return torch.tensor(target)


def _reference_loss(samples, img_id, eot, pad_id, ord_, avg_norm):
    """Their weights and loss, re-computed from their source (rows unpadded: see released_segments' note)."""
    micro_steps = [[i for rank in RANKS for i in rank[k]] for k in range(2)]  # all ranks' rows of step k
    total = 0.0
    for rows in micro_steps:
        targets = [_their_target(samples[i], img_id) for i in rows]
        tags = ["img" if samples[i].num_images else "txt" for i in rows]
        eot_idxss, cntss, actual = [], [], []
        for t, tag in zip(targets, tags):
            eot_mask = t.eq(eot).nonzero().squeeze(1) + 1
            segs = torch.tensor_split(t, eot_mask.tolist())
            counts = torch.tensor([(seg != pad_id).sum() for seg in segs[:-1]])
            eot_idxss.append(eot_mask.tolist())
            actual.append(counts)
            cntss.append(torch.ones_like(counts) if tag == "txt" else counts)
        ws_all = [torch.log(c.double() + 1) for c in cntss]
        ws_max = max(float(w.max()) for w in ws_all)  # all_reduce MAX over the ranks
        ws_all = [1 / torch.pow(w / ws_max, ord_) for w in ws_all]
        if avg_norm:
            mean = sum(float(w.sum()) for w in ws_all) / sum(w.numel() for w in ws_all)
            ws_all = [w / mean for w in ws_all]
        ws_all = [torch.clamp(w, min=1.0) for w in ws_all]
        loss_sum, num_tokens = 0.0, 0
        for i, t, eot_idxs, counts, ws, tag in zip(rows, targets, eot_idxss, actual, ws_all, tags):
            w = torch.zeros(len(t), dtype=torch.float64)
            for j, idx in enumerate(eot_idxs):
                w[idx - counts[j]: idx] = 1.0 if tag == "txt" else ws[j]
            tgt = t[1:]
            on = tgt != IGNORE
            loss_sum += float((w[1:] * _ce(i, len(t))[:-1] * on).sum())
            num_tokens += int(on.sum())
        total += loss_sum / num_tokens
    return total / len(micro_steps)


def _our_batches(samples, img_id, pad_id, packed):
    """This rank's expanded micro-batches as training builds them, with the matching CE per position."""
    from megatron_zero.data.packing import collate_packed
    from megatron_zero.data.packing import expand_image_placeholders as expand_packed

    out = []
    for rank in RANKS:
        mbs = []
        for rows in rank:
            group = [samples[i] for i in rows]
            layout = [[0, 1]] if packed else [[0], [1]]
            ex = expand_packed(collate_packed(group, layout, pad_id), img_id, E, pad_id, pad_to_multiple_of=64)
            ce = torch.zeros(ex.labels.shape, dtype=torch.float64)
            for r, row in enumerate(layout):
                for seg, j in enumerate(row):
                    pos = torch.nonzero(ex.segment_ids[r] == seg).squeeze(1)
                    ce[r, pos] = _ce(rows[j], pos.numel())
            mbs.append((ex, ce))
        out.append(mbs)
    return out


def _our_loss(rank_batches, eot, ord_, avg_norm, group=None):
    segs = [released_segments(ex.labels, ex.loss_mask, ex.segment_ids, ex.image_mask, eot) for ex, _ in rank_batches]
    weights = released_token_weights(segs, ord_, avg_norm, group=group)
    loss_sum = sum(float((w.double() * ce * ex.loss_mask).sum()) for w, (ex, ce) in zip(weights, rank_batches))
    tokens = sum(int(ex.loss_mask.sum()) for ex, _ in rank_batches)
    return loss_sum, tokens, weights


def _worker(rank, init_file, jobs, eot, results):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        for (packed, ord_, avg_norm), batches in jobs.items():
            loss_sum, tokens, weights = _our_loss(batches[rank], eot, ord_, avg_norm, group=dist.group.WORLD)
            results[(packed, ord_, avg_norm, rank)] = (loss_sum, tokens, [w.tolist() for w in weights])
    finally:
        dist.destroy_process_group()


def test_released_loss_equals_their_code_packed_and_unpacked_over_dp(tokenizer, tmp_path):
    samples, img_id, eot = _samples(tokenizer, special=True)
    pad_id = tokenizer.special_token_id("<|end_of_text|>")
    cases = [(packed, ord_, avg) for packed in (False, True) for ord_, avg in ((1.0, False), (0.5, True))]
    jobs = {c: _our_batches(samples, img_id, pad_id, c[0]) for c in cases}
    out = mp.Manager().dict()
    mp.spawn(_worker, args=(str(tmp_path / "init"), jobs, eot, out), nprocs=2)  # one launch for every case
    results = {c: {r: out[(*c, r)] for r in range(2)} for c in cases}
    for (packed, ord_, avg), out in results.items():
        expected = _reference_loss(samples, img_id, eot, pad_id, ord_, avg)
        # per-token convention: the step divides the summed weighted loss by the global token count
        total_tokens = out[0][1] + out[1][1]
        assert (out[0][0] + out[1][0]) / total_tokens == pytest.approx(expected, rel=1e-6), (packed, ord_, avg)
    # packing does not change any weight
    for key in ((1.0, False), (0.5, True)):
        a, b = results[(False, *key)], results[(True, *key)]
        for r in range(2):
            wa = sorted(x for w in a[r][2] for row in w for x in row if x)
            wb = sorted(x for w in b[r][2] for row in w for x in row if x)
            assert wa == pytest.approx(wb)


def test_segments_follow_the_loss_mask(tokenizer):
    """Without special-token loss the user's <|eot_id|> is no target: one segment runs bos..first response end;
    with it the prompt is a segment of its own. Text-only samples are weighted 1; weights are >= 1."""
    for special, first, second in ((False, [1, 1], 3), (True, [2, 2], 6)):
        samples, img_id, eot = _samples(tokenizer, special)
        pad_id = tokenizer.special_token_id("<|end_of_text|>")
        (ex, _), (ex1, _) = _our_batches(samples, img_id, pad_id, packed=True)[0]
        seg0 = released_segments(ex.labels, ex.loss_mask, ex.segment_ids, ex.image_mask, eot)
        seg1 = released_segments(ex1.labels, ex1.loss_mask, ex1.segment_ids, ex1.image_mask, eot)
        assert [int((seg0.text_only == t).sum()) for t in (False, True)] == first
        assert len(seg1.lengths) == second
        # the image sample's segments cover every one of its positions (bos, prompt, E image positions, response)
        n0 = int((ex.segment_ids[0] == 0).sum())
        assert int(seg0.lengths[~seg0.text_only].sum()) == n0
        (w,) = released_token_weights([seg0], 1.0)
        on = ex.loss_mask[0]
        text, image = ex.segment_ids[0] == 1, ex.segment_ids[0] == 0
        assert (w[0][text & on] == 1).all() and (w[0][image & on] >= 1).all()
        if special:  # the prompt segment and the response differ in length: the shorter one weighs more
            assert (w[0][image & on] > 1).any()
