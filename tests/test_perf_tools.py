"""The performance tools' plumbing at tiny sizes (no timing is asserted): tools/gpu_check.py's refusal without a GPU
(its --dry-run is rehearsed in tests/test_device_gpu_check.py), tools/benchmark_packing.py and
tools/compare_speed.py."""
import json

import pytest

from megatron_zero import platform
from tests.conftest import run_cli


def _tool(*args, check=True):
    p = run_cli(args)
    if check:
        assert p.returncode == 0, (p.stdout + p.stderr)[-6000:]
    return p


@pytest.mark.skipif(platform.HAVE_CUDA, reason="the refusal is the CPU behaviour")
def test_gpu_check_refuses_without_gpu_in_one_line(tmp_path):
    p = _tool("tools/gpu_check.py", "--output-dir", str(tmp_path), check=False)
    assert p.returncode == 2
    errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: gpu_check needs a CUDA GPU (none is visible); --dry-run exercises its plumbing on CPU"]
    assert "Traceback" not in p.stderr and not list(tmp_path.iterdir())


def test_benchmark_packing_plumbing(tmp_path):
    out = tmp_path / "r.json"
    p = _tool("tools/benchmark_packing.py", "--seq-length", "64", "--num-image-tokens", "9", "--scale", "64",
              "--global-batch-size", "16", "--num-samples", "64", "--rounds", "1", "--num-layers", "1",
              "--hidden-size", "32", "--ffn-hidden-size", "64", "--vocab-size", "128", "--output-json", str(out))
    r = json.loads(out.read_text())
    assert r["padded"]["real_token_fraction"] < r["packed"]["real_token_fraction"] <= 1
    assert r["losses_equal"] is True  # same samples, same weights: same loss in both layouts
    assert "packed / padded real tokens/s" in p.stdout and "length mix: vqa" in p.stdout


def test_compare_speed_plumbing(tmp_path):
    out = tmp_path / "r.json"
    p = _tool("tools/compare_speed.py", "--num-layers", "1", "--hidden-size", "32", "--ffn-hidden-size", "64",
              "--num-attention-heads", "4", "--num-query-groups", "2", "--vocab-size", "128", "--seq-length", "16",
              "--batch-size", "2", "--rounds", "2", "--output-json", str(out))
    r = json.loads(out.read_text())
    assert len(r["ratio_per_round"]) == 2 and r["ratio_min"] <= r["ratio_median"] <= r["ratio_max"]
    assert "ratio ours/transformers" in p.stdout
