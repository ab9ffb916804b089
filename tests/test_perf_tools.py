"""The performance tools' plumbing at tiny sizes (no timing is asserted): tools/gpu_check.py (refusal without a GPU,
--dry-run writing its JSON + Markdown), tools/benchmark_packing.py and tools/compare_speed.py."""
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


def test_gpu_check_dry_run_writes_every_check(tmp_path):
    from megatron_zero.gpu_check import CHECKS

    _tool("tools/gpu_check.py", "--dry-run", "--output-dir", str(tmp_path))
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["dry_run"] is True and result["ok"] is True
    records = {r["check"]: r for r in result["checks"]}
    assert list(records) == [name for name, _ in CHECKS]
    for name, r in records.items():
        assert r["ok"] is not False, r
        if r["ok"] is None:  # only DALI may be absent
            assert name == "dali_vs_pillow"
        else:
            assert r["metrics"], name
    assert records["cross_entropy_kernel"]["metrics"]["torch_reference_value_abs"] < 1e-5
    assert 0 < records["packed_vlm_stage2"]["metrics"]["real_token_fraction"] <= 1
    md = (tmp_path / "gpu_check.md").read_text()
    assert "DRY RUN" in md and "| throughput_bf16 |" in md and "| precision |" in md
    p = _tool("tools/gpu_check.py", "--dry-run", "--only", "nope", "--output-dir", str(tmp_path), check=False)
    assert p.returncode == 2 and "unknown check(s) nope" in p.stderr


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
