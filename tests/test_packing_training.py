"""Sequence packing in training: packed micro-batches give the same per-sample losses and gradients as one sample
per row (TP=PP=1, TP=2/PP=2, TP=2/SP/DP=2), and ``pretrain_vlm`` trains the same loss curve packed and padded,
resumes a packed run exactly, and reports real/computed tokens."""
import json

import pytest

from tests.conftest import layout_check_output
from tests.test_pretrain_vlm import _metrics, _run, _world


@pytest.mark.timeout(1800)
def test_packed_equals_padded_losses_and_gradients(layout_checks):
    """tests/workers/packed_equivalence.py, in the launch the layout-equivalence tests share (the ``layout_checks``
    fixture of tests/conftest.py)."""
    out = layout_check_output(layout_checks, "packed", "reference")
    assert "PACKED TP=1 MATCHES PADDED" in out, out[-4000:]
    out = layout_check_output(layout_checks, "packed", "compare")
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
    assert "real tok/s/dev (" in out and "% of" in out and " computed)" in out
    _run([*common, "--load", str(tmp_path / "run"), "--save", str(tmp_path / "run"), "--metrics-file", str(packed)])
    p, q = _metrics(padded), _metrics(packed)
    assert [m["iteration"] for m in q] == [1, 2, 3]
    for a, b in zip(p, q):
        assert abs(a["loss"] - b["loss"]) < 1e-4 * max(1.0, abs(a["loss"])), (p, q)
        assert abs(a["grad_norm"] - b["grad_norm"]) < 1e-4 * max(1.0, a["grad_norm"]), (p, q)
        assert a["real_tokens"] == b["real_tokens"] > 0
        assert a["computed_tokens"] == 8 * 96
        assert b["real_tokens"] <= b["computed_tokens"] < a["computed_tokens"], json.dumps(q)


@pytest.mark.timeout(900)
def test_pretrain_lm_instruction_data_packed_equals_padded(tmp_path):
    from megatron_zero.data.tokenizers import load_tokenizer
    from megatron_zero.models.llama_config import LlamaConfig
    from tests.conftest import run_cli

    _world(tmp_path)
    vocab = load_tokenizer(str(tmp_path / "tok")).vocab_size
    LlamaConfig(num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4, num_query_groups=2,
                vocab_size=vocab, max_position_embeddings=128, rope_theta=10000.0, rope_scaling_factor=None,
                name="tiny-lm").save(str(tmp_path / "model_config.json"))
    runs = {}
    for flag in ("--pack-sequences", "--no-pack-sequences"):
        metrics = tmp_path / f"{flag}.jsonl"
        cmd = ["-m", "megatron_zero.training.pretrain_lm", "--model", str(tmp_path / "model_config.json"),
               "--instruction-data-path", str(tmp_path / "text.jsonl"), "--tokenizer", str(tmp_path / "tok"),
               "--seq-length", "64", "--micro-batch-size", "1", "--global-batch-size", "8", "--train-iters", "2",
               "--lr", "1e-3", "--log-interval", "1", flag, "--metrics-file", str(metrics)]
        p = run_cli(cmd)
        assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
        runs[flag] = _metrics(metrics)
    packed, padded = runs["--pack-sequences"], runs["--no-pack-sequences"]
    for a, b in zip(packed, padded):
        assert abs(a["loss"] - b["loss"]) < 1e-4 * max(1.0, b["loss"]), (packed, padded)
        assert a["real_tokens"] == b["real_tokens"] and a["computed_tokens"] < b["computed_tokens"] == 8 * 64
