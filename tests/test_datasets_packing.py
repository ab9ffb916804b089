"""Datasets (LLaVA JSON, instruction JSONL, mixtures, length cap), packing after image expansion, and the
resumable distributed sampler, each against a small independent reference."""
import itertools
import json
import random

import numpy as np
import pytest

from megatron_zero.data.chat_template import Message, chat_template_for
from megatron_zero.data.datasets import (
    ChatDataset,
    Conversation,
    MixtureDataset,
    Sample,
    TokenizationConfig,
    read_instruction_jsonl,
    read_llava_json,
    truncate_sample,
)
from megatron_zero.data.packing import (
    IGNORE_INDEX,
    collate_packed,
    expand_image_placeholders,
    pack_greedy,
    padding_fraction,
)
from megatron_zero.data.sampler import ResumableDistributedSampler
from megatron_zero.data.tokenizers import WordTokenizer

WORDS = ["the", "a", "cat", "dog", "sits", "runs", "on", "under", "red", "blue", "green", "couch", "field", "ball", "where", "what", "is", "it", "colour", "picture"]


@pytest.fixture(scope="module")
def template():
    return chat_template_for(WordTokenizer(WORDS + ["?", ".", ",", "describe"]))


LLAVA = [
    {"id": "a", "image": "coco/1.jpg", "conversations": [
        {"from": "human", "value": "<image>\nwhere is the cat?"}, {"from": "gpt", "value": "on the couch."},
        {"from": "human", "value": "what colour is it?"}, {"from": "gpt", "value": "red."}]},
    {"id": "b", "image": "gqa/2.jpg", "conversations": [
        {"from": "human", "value": "describe the picture."}, {"from": "gpt", "value": "a dog runs."}]},
    {"id": "c", "conversations": [
        {"from": "human", "value": "what is red?"}, {"from": "gpt", "value": "the ball."}]},
]


def _write(path, payload):
    path.write_text(payload if isinstance(payload, str) else json.dumps(payload))
    return path


def test_read_llava_json(tmp_path, template):
    convs = read_llava_json(_write(tmp_path / "llava.json", LLAVA), image_root=tmp_path / "images")
    assert [c.id for c in convs] == ["a", "b", "c"]
    assert convs[0].image_paths == [str(tmp_path / "images" / "coco/1.jpg")]
    assert [m.role for m in convs[0].messages] == ["user", "assistant", "user", "assistant"]
    assert convs[1].messages[0].content == "<image>\ndescribe the picture."  # tag added LLaVA-style
    assert convs[2].image_paths == []
    ds = ChatDataset.build(convs, template, TokenizationConfig(max_seq_len=4096, num_image_tokens=5), "llava")
    assert len(ds) == 3 and not ds.skipped and ds.truncated == 0
    sample = ds[0]
    direct = template.encode(convs[0].messages)
    assert sample.input_ids.tolist() == direct.input_ids and sample.loss_mask.tolist() == direct.loss_mask
    assert sample.num_images == 1 and sample.source == "llava" and sample.id == "a"
    assert sample.expanded_length(5) == len(direct.input_ids) + 4
    assert ds.lengths(5).tolist() == [ds[i].expanded_length(5) for i in range(3)]
    labels = sample.labels()
    assert (labels[~sample.loss_mask] == -100).all() and (labels[sample.loss_mask] >= 0).all()


def test_read_instruction_jsonl_formats(tmp_path):
    lines = [
        {"messages": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"}]},
        {"prompt": "q2", "response": "a2"},
        {"question": "q3", "answer": "a3", "id": "x"},
        {"text": [{"role": "user", "content": "q4"}, {"role": "assistant", "content": "a4"}]},
    ]
    path = _write(tmp_path / "genqa.jsonl", "\n".join(json.dumps(x) for x in lines) + "\n\n")
    convs = read_instruction_jsonl(path)
    assert [[(m.role, m.content) for m in c.messages] for c in convs] == [
        [("user", f"q{i}"), ("assistant", f"a{i}")] for i in range(1, 5)]
    assert convs[2].id == "x" and all(not c.image_paths for c in convs)


@pytest.mark.parametrize("payload, message", [
    ("[{\"id\": 1,", r"llava\.json: invalid JSON at line 1"),
    ({"id": 1}, "expected a JSON list"),
    ([LLAVA[0], {"id": "z"}], r"record 1 \(id 'z'\): missing 'conversations'"),
    ([{"image": "x.jpg", "conversations": [{"from": "human", "value": "<image><image>"}]}],
     r"record 0 .*2 <image> tag\(s\) but 1 image\(s\)"),
    ([{"conversations": [{"from": "robot", "value": "hi"}]}], "record 0 .*unknown role 'robot'"),
    ([{"conversations": [{"from": "human", "value": 3}]}], "record 0 .*must be a string"),
])
def test_malformed_llava_json_names_file_and_record(tmp_path, payload, message):
    with pytest.raises(ValueError, match=message):
        read_llava_json(_write(tmp_path / "llava.json", payload))


def test_malformed_jsonl_names_file_and_line(tmp_path):
    path = _write(tmp_path / "bad.jsonl", '{"prompt": "q", "response": "a"}\n{"prompt": "q"\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl: line 2: invalid JSON"):
        read_instruction_jsonl(path)
    path = _write(tmp_path / "bad2.jsonl", '{"prompt": "q", "response": "a"}\n{"input": "q"}\n')
    with pytest.raises(ValueError, match=r"bad2\.jsonl: line 2 .*expected 'messages'"):
        read_instruction_jsonl(path)


def _expanded(ids, placeholder, n):
    return sum(n if t == placeholder else 1 for t in ids)


def test_truncation_never_cuts_inside_an_image():
    P, N = 99, 10
    rng = random.Random(0)
    for _ in range(300):
        ids = np.array([P if rng.random() < 0.15 else rng.randrange(50) for _ in range(rng.randrange(1, 40))])
        mask = np.array([rng.random() < 0.5 for _ in ids])
        paths = [f"img{i}" for i in range(int((ids == P).sum()))]
        max_len = rng.randrange(1, 80)
        out_ids, out_mask, out_paths = truncate_sample(ids, mask, paths, P, N, max_len)
        # Brute-force reference: the longest prefix whose expansion fits.
        keep = max(k for k in range(len(ids) + 1) if _expanded(ids[:k], P, N) <= max_len)
        assert out_ids.tolist() == ids[:keep].tolist() and out_mask.tolist() == mask[:keep].tolist()
        assert out_paths == paths[: int((ids[:keep] == P).sum())]
    # The cut would fall inside the image: everything from the image on goes.
    ids = np.array([1, 2, P, 3, 4])
    assert truncate_sample(ids, ids > 0, ["i"], P, N, 11)[0].tolist() == [1, 2]
    assert truncate_sample(ids, ids > 0, ["i"], P, N, 13)[0].tolist() == [1, 2, P, 3]


def test_dataset_skips_what_cannot_be_trained_on(template):
    long_prompt = " ".join(["the red ball"] * 10)
    convs = [
        Conversation([Message("user", "<image> where is it?"), Message("assistant", "on the couch.")], ["x.jpg"], "fits"),
        Conversation([Message("user", long_prompt + " <image>"), Message("assistant", "red.")], ["y.jpg"], "img"),
        Conversation([Message("user", long_prompt), Message("assistant", "red.")], [], "text"),
        Conversation([Message("user", "what?"), Message("assistant", long_prompt)], [], "cut"),
    ]
    ds = ChatDataset.build(convs, template, TokenizationConfig(max_seq_len=30, num_image_tokens=12), "mix")
    assert ds.skipped == {"image_does_not_fit": 1, "no_target_tokens": 1}
    assert [ds[i].id for i in range(len(ds))] == ["fits", "cut"]
    assert ds.truncated == 1 and ds[1].expanded_length(12) == 30 and ds[1].loss_mask.any()


def _toy_dataset(template, name, n, with_image):
    convs = [Conversation([Message("user", ("<image> " if with_image else "") + "what is it?"),
                           Message("assistant", " ".join(["the ball"] * (1 + i % 7)))],
                          [f"{name}{i}.jpg"] if with_image else [], f"{name}{i}") for i in range(n)]
    return ChatDataset.build(convs, template, TokenizationConfig(max_seq_len=512, num_image_tokens=8), name)


def test_mixture_ratio_and_determinism(template):
    llava, genqa = _toy_dataset(template, "llava", 300, True), _toy_dataset(template, "genqa", 100, False)
    mix = MixtureDataset([llava, genqa], [0.7, 0.3], seed=3)
    assert len(mix) == 333  # as many as possible without repeating genqa: 100 / 0.3
    sources = np.array([mix.source_of(i) for i in range(len(mix))])
    assert (sources == 1).sum() == 100 and (sources == 0).sum() == 233
    for prefix in (10, 50, 200):  # evenly interleaved: every prefix is close to 30% genqa
        assert abs((sources[:prefix] == 1).mean() - 0.3) <= 1 / prefix + 1e-9
    ids = [mix[i].id for i in range(len(mix))]
    assert len(set(ids)) == len(ids)  # nothing repeated
    assert ids == [MixtureDataset([llava, genqa], [0.7, 0.3], seed=3)[i].id for i in range(len(mix))]
    assert ids != [MixtureDataset([llava, genqa], [0.7, 0.3], seed=4)[i].id for i in range(len(mix))]
    assert mix.lengths(8).tolist() == [mix[i].expanded_length(8) for i in range(len(mix))]
    upsampled = MixtureDataset([llava, genqa], [1, 1], seed=0, num_samples=500)
    assert [upsampled.source_of(i) for i in range(500)].count(1) == 250  # genqa repeated 2.5 times
    with pytest.raises(ValueError, match="one weight per dataset"):
        MixtureDataset([llava], [0.5, 0.5])


def test_packing_waste(template):
    rng = np.random.default_rng(0)
    # LLaVA-like lengths: 576 image positions + 30..600 text tokens, and text-only 50..1800 tokens.
    lengths = np.concatenate([576 + rng.integers(30, 600, 700), rng.integers(50, 1800, 300)])
    rng.shuffle(lengths)
    max_len = 4096
    rows = pack_greedy(lengths, max_len)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    row_lengths = [int(lengths[row].sum()) for row in rows]
    assert max(row_lengths) <= max_len
    packed_waste = padding_fraction(row_lengths, max_len)
    micro = 4  # unpacked: micro-batches of 4 in data order, padded to their longest sample
    unpacked_waste = 1 - lengths.sum() / sum(micro * lengths[i : i + micro].max() for i in range(0, 1000, micro))
    print(f"\npadding waste: packed into {len(rows)} rows of {max_len}: {packed_waste:.2%}; "
          f"unpacked micro-batches of {micro}: {unpacked_waste:.2%}")
    assert packed_waste < 0.02 < unpacked_waste
    with pytest.raises(ValueError, match="longer than max_len=4096"):
        pack_greedy([5000], max_len)


def _reference_expand(sample, placeholder, n):
    """Independent reference: expand the sample first, then shift for next-token prediction."""
    tokens, mask = [], []
    for t, m in zip(sample.input_ids.tolist(), sample.loss_mask.tolist()):
        tokens += [t] * (n if t == placeholder else 1)
        mask += [False] * (n - 1) + [m] if t == placeholder else [m]
    labels = [tokens[j + 1] if mask[j + 1] else IGNORE_INDEX for j in range(len(tokens) - 1)] + [IGNORE_INDEX]
    return tokens, labels


def test_cu_seqlens_are_computed_after_image_expansion(template):
    N, P = 7, template.image_placeholder_id
    pad = template.tokenizer.pad_id
    convs = [
        Conversation([Message("user", "<image> where is the cat?"), Message("assistant", "on the couch.")], ["1"]),
        Conversation([Message("user", "what is red?"), Message("assistant", "the ball.")], []),
        Conversation([Message("user", "<image> <image> colour?"), Message("assistant", "blue.")], ["2", "3"]),
        Conversation([Message("user", "describe <image>"), Message("assistant", "a dog runs on the field.")], ["4"]),
    ]
    ds = ChatDataset.build(convs, template, TokenizationConfig(max_seq_len=64, num_image_tokens=N))
    samples = [ds[i] for i in range(len(ds))]
    rows = pack_greedy([s.expanded_length(N) for s in samples], max_len=40)
    assert len(rows) > 1 and any(len(r) > 1 for r in rows)
    packed = collate_packed(samples, rows, pad_id=pad)
    out = expand_image_placeholders(packed, P, N, pad_id=pad, pad_to_multiple_of=8)
    E = out.input_ids.shape[1]
    assert E % 8 == 0 and E >= max(sum(samples[i].expanded_length(N) for i in r) for r in rows)

    ref_cu, naive_cu = [0], [0]
    for r, row in enumerate(rows):
        pos, naive_pos = 0, 0
        for seg, i in enumerate(row):
            tokens, labels = _reference_expand(samples[i], P, N)
            span = slice(pos, pos + len(tokens))
            assert out.input_ids[r, span].tolist() == tokens
            assert out.labels[r, span].tolist() == labels
            assert out.loss_mask[r, span].tolist() == [lab != IGNORE_INDEX for lab in labels]
            assert out.position_ids[r, span].tolist() == list(range(len(tokens)))
            assert (out.segment_ids[r, span] == seg).all()
            assert out.image_mask[r, span].tolist() == [t == P for t in tokens]
            pos += len(tokens)
            naive_pos += len(samples[i].input_ids)
            ref_cu.append(r * E + pos)
            naive_cu.append(r * E + naive_pos)
        assert (out.segment_ids[r, pos:] == -1).all() and not out.loss_mask[r, pos:].any()
        assert (out.input_ids[r, pos:] == pad).all()
        if pos < E:  # the padding tail is a segment of its own
            ref_cu.append((r + 1) * E)
            naive_cu.append((r + 1) * E)
    assert out.cu_seqlens.tolist() == ref_cu
    assert out.cu_seqlens.tolist() != naive_cu  # the Megatron-LM bug: boundaries from unexpanded rows
    assert out.max_seqlen == max(b - a for a, b in itertools.pairwise(ref_cu))
    assert int(out.image_mask.sum()) == N * 4
    assert out.image_paths == [p for row in rows for i in row for p in samples[i].image_paths]


def _run(sampler, steps):
    it = iter(sampler)
    return [next(it) for _ in range(steps * sampler.micro_batches_per_step)]


def test_sampler_resume_continues_with_next_unseen_sample():
    kwargs = {"num_samples": 103, "global_batch_size": 12, "micro_batch_size": 2, "dp_size": 3, "seed": 7}
    for rank in range(3):
        full = _run(ResumableDistributedSampler(dp_rank=rank, **kwargs), 8)  # 8 steps = 96 samples of 103
        first = ResumableDistributedSampler(dp_rank=rank, **kwargs)
        head = _run(first, 3)
        state = json.loads(json.dumps(first.state_dict()))  # survives a checkpoint round trip
        resumed = ResumableDistributedSampler(dp_rank=rank, **kwargs)
        resumed.load_state_dict(state)
        assert head + _run(resumed, 5) == full


def test_sampler_ranks_are_disjoint_and_cover_each_global_batch():
    kwargs = {"num_samples": 100, "global_batch_size": 24, "micro_batch_size": 4, "dp_size": 2, "seed": 1}
    per_rank = [[i for mb in ResumableDistributedSampler(dp_rank=r, **kwargs) for i in mb] for r in range(2)]
    assert not set(per_rank[0]) & set(per_rank[1])
    assert len(per_rank[0]) == len(per_rank[1]) == 48  # 4 full global batches; the tail of 4 is left out
    order = ResumableDistributedSampler(dp_rank=0, **kwargs).epoch_order(0)
    for step in range(4):
        union = per_rank[0][12 * step : 12 * step + 12] + per_rank[1][12 * step : 12 * step + 12]
        assert sorted(union) == sorted(order[24 * step : 24 * step + 24].tolist())


def test_sampler_epochs_and_state_checks():
    s = ResumableDistributedSampler(num_samples=20, global_batch_size=10, micro_batch_size=5, seed=0)
    epoch0 = [i for mb in s for i in mb]
    assert s.epoch == 1 and len(s) == 4
    epoch1 = [i for mb in s for i in mb]
    assert sorted(epoch0) == sorted(epoch1) == list(range(20)) and epoch0 != epoch1
    # A different DP layout can resume at a global-batch boundary.
    one = ResumableDistributedSampler(num_samples=40, global_batch_size=8, micro_batch_size=2, seed=5)
    uninterrupted = _run(ResumableDistributedSampler(num_samples=40, global_batch_size=8, micro_batch_size=2,
                                                     seed=5), 3)
    _run(one, 1)
    state = one.state_dict()
    continued = []
    for rank in range(2):
        two = ResumableDistributedSampler(num_samples=40, global_batch_size=8, micro_batch_size=2, dp_rank=rank,
                                          dp_size=2, seed=5)
        two.load_state_dict(state)
        continued += [i for mb in _run(two, 2) for i in mb]
    assert sorted(continued) == sorted(i for mb in uninterrupted[4:] for i in mb)
    with pytest.raises(ValueError, match="saved with seed=5"):
        ResumableDistributedSampler(num_samples=40, global_batch_size=8, micro_batch_size=2, seed=6) \
            .load_state_dict(state)
    with pytest.raises(ValueError, match="must be divisible"):
        ResumableDistributedSampler(num_samples=40, global_batch_size=8, micro_batch_size=3)


def test_sample_dataclass_labels():
    s = Sample(np.array([5, 6, 7]), np.array([False, True, True]), [])
    assert s.labels().tolist() == [-100, 6, 7] and s.num_images == 0


def test_pack_rows_fills_rows_better_than_first_fit():
    """pack_rows: a partition of the samples into rows within max_len, never more rows than first-fit, and fewer
    on a mix with a large minimum sample size (image samples)."""
    import numpy as np

    from megatron_zero.data.packing import pack_greedy, pack_rows

    rng = np.random.default_rng(0)
    lengths = (40 + rng.integers(0, 30, 128)).tolist() + [250, 200, 130]
    rows = pack_rows(lengths, 256)
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in r) <= 256 for r in rows)
    assert len(rows) < len(pack_greedy(lengths, 256))
    assert len(rows) <= -(-sum(lengths) // 256) + 1
    assert pack_rows(lengths, 256) == rows  # deterministic
    with pytest.raises(ValueError, match="longer than max_len=256"):
        pack_rows([10, 300], 256)
