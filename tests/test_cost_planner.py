"""The cost planner (tools/benchmark.py --project-only): each stage's hours from the FLOP model, beside the paper's
Table 9. The arithmetic is checked against megatron_zero.training.flops, not against recorded outputs."""
import json
import subprocess
import sys

import pytest

from tests.conftest import REPO, subprocess_env


def _planner(*args, check=True):
    p = subprocess.run([sys.executable, "tools/benchmark.py", "--project-only", *args], cwd=REPO,
                       env=subprocess_env(), capture_output=True, text=True, timeout=300)
    if check:
        assert p.returncode == 0, p.stderr[-3000:]
    return p


def _expected_flops(cfg, trainable, enc_trainable, vl, text, vl_tokens=850, text_tokens=1180):
    from megatron_zero.models.clip_vit import get_vision_preset
    from megatron_zero.training.flops import decoder_flops_per_step, vit_flops_per_image

    v = get_vision_preset("clip-vit-l-14-336")
    frozen_share = (cfg.num_layers - trainable) / cfg.num_layers  # frozen layers: 2x forward of the 3x

    def dec(tokens):
        return decoder_flops_per_step(cfg, 1, tokens) * (1 - frozen_share / 3)

    image = vit_flops_per_image(24, 1024, 4096, 577, enc_trainable)
    assert v.num_layers == 24 and v.num_positions == 577
    return vl * (dec(vl_tokens) + image) + text * dec(text_tokens)


def test_project_only_matches_the_flop_model(tmp_path):
    from megatron_zero.models.llama_config import get_preset
    from megatron_zero.surrogate import surrogate_config

    out = tmp_path / "plan.json"
    p = _planner("--gpu-type", "H200", "--num-gpus-projection", "64", "--mfu", "0.45", "--output-json", str(out))
    r = json.loads(out.read_text())
    target = get_preset("llama-3.1-70b")
    surrogate = surrogate_config(target, 40, 78)
    assert surrogate.num_layers == 42
    expected = {  # (method, stage): FLOPs
        ("baseline", "pre."): _expected_flops(target, 0, 0, 665_000, 0),
        ("baseline", "ft. enc."): 0.0,
        ("baseline", "ft. dec."): _expected_flops(target, 80, 8, 665_000, 0),
        ("ours", "pre."): _expected_flops(surrogate, 1, 0, 665_000, 500_000),
        ("ours", "ft. enc."): _expected_flops(surrogate, 0, 8, 665_000, 0),
        ("ours", "ft. dec."): _expected_flops(target, 80, 8, 133_000, 0),
    }
    rate = 64 * 989.4e12 * 0.45 * 3600  # FLOPs per hour of the cluster
    for row in r["stages"]:
        f = expected[(row["method"], row["stage"])]
        assert row["flops"] == pytest.approx(f, rel=1e-9)
        assert row["hours"] == pytest.approx(f / rate, rel=1e-9)
        if row["paper_hours"]:  # the MFU that meets the paper's hours gives exactly those hours
            assert f / (64 * 989.4e12 * row["mfu_to_meet_paper"] * 3600) == pytest.approx(row["paper_hours"])
    base, ours = r["totals"]["baseline"], r["totals"]["ours"]
    assert base["hours"] == pytest.approx(sum(f for (m, _), f in expected.items() if m == "baseline") / rate)
    assert r["savings"]["fraction"] == pytest.approx(1 - ours["hours"] / base["hours"])
    assert r["savings"]["paper_fraction"] == pytest.approx(1 - 19.17 / 34.79)
    # the surrogate's own saving: stage 2 on T(40,78) (42 layers) instead of the 80-layer target
    assert r["savings"]["stage2_on_target_hours"] == pytest.approx(_expected_flops(target, 0, 8, 665_000, 0) / rate)
    assert 0 < r["savings"]["stage2_fraction"] < 1
    # the paper's Table 9 printed beside the projection
    assert "128 7.01 + 0.00 + 27.88 = 34.79" in p.stdout and "128 9.36 + 4.25 + 5.56 = 19.17" in p.stdout
    assert "paper 44.9%" in p.stdout and "MFU at which the projection meets the paper's total hours" in p.stdout


def test_project_only_uses_a_measured_mfu_and_refuses_bad_input(tmp_path):
    check = tmp_path / "gpu_check.json"
    check.write_text(json.dumps({"device": "NVIDIA H200", "started": "2026-12-05 10:00:00 UTC", "checks": [
        {"check": "throughput_bf16", "status": "ok", "metrics": {"mfu_datasheet": 0.3, "mfu": 0.37}}]}))
    out = tmp_path / "a.json"
    p = _planner("--gpu-type", "H200", "--mfu-from", str(check), "--output-json", str(out))
    assert "MFU 30.0% (measured on NVIDIA H200, 2026-12-05 10:00:00 UTC)" in p.stdout
    # hours scale as 1 / (GPUs x MFU): 128 x 0.30 vs 256 x 0.15 is the same compute rate
    from tools.benchmark import main

    other = main(["--project-only", "--gpu-type", "H200", "--mfu", "0.15", "--num-gpus-projection", "256"])
    for x, y in zip(json.loads(out.read_text())["stages"], other["stages"], strict=True):
        assert x["hours"] == pytest.approx(y["hours"])
    from megatron_zero_dev.cost_planner import PlannerError

    for bad, message in ((["--gpu-type", "X1"], "--gpu-type X1: unknown"), (["--surrogate", "40,79"], "--surrogate 40,79:")):
        with pytest.raises(PlannerError, match=message):
            main(["--project-only", *bad])
    p = _planner("--mfu", "0", check=False)  # the CLI's error route: one line, exit 2
    errors = [line for line in p.stderr.splitlines() if "error:" in line]
    assert p.returncode == 2 and errors == ["benchmark.py: error: --mfu 0.0: must be in (0, 1]"], p.stderr[-2000:]
    assert "Traceback" not in p.stderr
