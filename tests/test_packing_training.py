"""Sequence packing in training: packed micro-batches give the same per-sample losses and gradients as one sample
per row (TP=PP=1, TP=2/PP=2, TP=2/SP/DP=2), and ``pretrain_vlm`` trains the same loss curve packed and padded,
resumes a packed run exactly, and reports real/computed tokens."""
import json

import pytest

from tests.conftest import run_worker
from tests.test_pretrain_vlm import _metrics, _run, _world


@pytest.mark.timeout(900)
def test_packed_equals_padded_losses_and_gradients(tmp_path):
    ref = str(tmp_path / "reference.pt")
    out = run_worker("packed_equivalence.py", "--reference", ref)
    assert "PACKED TP=1 MATCHES PADDED" in out, out[-4000:]
    out = run_worker("packed_equivalence.py", "--compare", ref, nproc=4)
    assert "PACKED LAYOUTS MATCH PADDED" in out, out[-4000:]
    for layout in ("TP=2 PP=2 DP=1 SP=False", "TP=2 PP=1 DP=2 SP=True"):
        assert f"checked packed {layout}" in out


@pytest.mark.timeout(900)
def test_pretrain_vlm_packed_curve_resume_and_token_metrics(tmp_path):
    _world(tmp_path)
    common = ["--stage", "3", "--decoder-load", str(tmp_path / "decoder"), "--vision-model", "tiny-clip",
              "--tokenizer", str(tmp_path / "tok"), "--data-path", str(tmp_path / "llava.json"),
              "--image-root", str(tmp_path / "images"), "--text-data-path", str(tmp_path / "text.jsonl"),
              "--text-ratio", "0.25", "--seq-length", "96", "--micro-batch-size", "2", "--global-batch-size", "8",
              "--train-iters", "3", "--log-interval", "1", "--lr", "1e-3", "--loss-weighting", "length-weighted",
              "--no-export", "--encoder-trainable-layers", "1"]
    padded = tmp_path / "padded.jsonl"
    _run([*common, "--no-pack-sequences", "--metrics-file", str(padded)])
    packed = tmp_path / "packed.jsonl"
    out = _run([*common, "--save", str(tmp_path / "run"), "--exit-after-iters", "2", "--metrics-file", str(packed)])
    assert "real tok/s/dev" in out and "% of" in out
    _run([*common, "--load", str(tmp_path / "run"), "--save", str(tmp_path / "run"), "--metrics-file", str(packed)])
    p, q = _metrics(padded), _metrics(packed)
    assert [m["iteration"] for m in q] == [1, 2, 3]
    for a, b in zip(p, q):
        assert abs(a["loss"] - b["loss"]) < 1e-4 * max(1.0, abs(a["loss"])), (p, q)
        assert abs(a["grad_norm"] - b["grad_norm"]) < 1e-4 * max(1.0, a["grad_norm"]), (p, q)
        assert a["real_tokens"] == b["real_tokens"] > 0
        assert a["computed_tokens"] == 8 * 96
        assert b["real_tokens"] <= b["computed_tokens"] < a["computed_tokens"], json.dumps(q)
