"""The main job's code path end to end (``examples/demo.py --quick``: tiny step counts, numbers meaningless):
target pretraining, trajectory, surrogate + control, per-seed stage 1/2/3 in two worker processes, grafting,
evaluation, the results.json shape the README documents and the computed conclusion."""
import json
import os

from tests.conftest import REPO, run_cli

KINDS = ["upper_bound", "surrogate_own", "surrogate_graft", "control_own", "control_graft", "untrained",
         "stage3_graft", "stage3_untrained"]


def test_demo_quick_runs_end_to_end(tmp_path):
    p = run_cli(["examples/demo.py", "--quick", "--seeds", "2", "--seed", "7", "--output-dir", tmp_path])
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    assert "model (held-out images)" in p.stdout
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["seeds"] == [7, 8] and result["target_layers"] == 12
    assert [r["kind"] for r in result["rows"]] == KINDS
    for r in result["rows"]:
        assert set(r) == {"kind", "model", "layers", "exact_match", "answer_loss"}
        assert len(r["exact_match"]) == len(r["answer_loss"]) == 2
        assert all(0.0 <= x <= 1.0 for x in r["exact_match"]) and all(x > 0 for x in r["answer_loss"])
    rows = {r["kind"]: r for r in result["rows"]}
    a, b = result["surrogate"]
    assert rows["surrogate_own"]["layers"] == rows["control_own"]["layers"] == 12 - (b - a)
    assert rows["upper_bound"]["layers"] == rows["surrogate_graft"]["layers"] == 12
    # the two seeds are different runs (encoder init and data), not copies
    assert rows["surrogate_own"]["answer_loss"][0] != rows["surrogate_own"]["answer_loss"][1]
    # every conclusion is a computed count over both seeds
    assert all("/2 seeds" in line for line in result["conclusions"][:-1]), result["conclusions"]
    assert (tmp_path / "demo.png").exists()
    assert (tmp_path / "seed7" / "grafted_surrogate" / "vlm_config.json").exists()


def _demo_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("demo", os.path.join(REPO, "examples", "demo.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(kind, exact_match, answer_loss, layers=12):
    return {"kind": kind, "model": kind, "layers": layers, "exact_match": exact_match, "answer_loss": answer_loss}


def test_claims_need_their_margin_on_every_seed():
    demo = _demo_module()
    rows = {"upper_bound": _row("upper_bound", [0.95, 0.91, 0.99], [0.05] * 3),
            "surrogate_own": _row("surrogate_own", [0.97, 0.96, 0.98], [0.06] * 3, layers=6),
            "surrogate_graft": _row("surrogate_graft", [0.90, 0.62, 0.93], [0.1, 0.5, 0.1]),
            "control_graft": _row("control_graft", [0.60, 0.60, 0.65], [0.5, 0.6, 0.5]),
            "untrained": _row("untrained", [0.14, 0.13, 0.15], [2.4] * 3)}
    lines = demo.conclusions(rows, [1, 2, 3], 12)
    assert lines[0] == "the encoder trained on the target itself reaches >= 80% exact match on 3/3 seeds (lowest 91.0)"
    # seed 2's graft beats the control by 2 points only, and its answer loss is only 1.2x lower: not claimed
    assert lines[1] == "graft > control by 5 points (exact match) is not shown at this scale (2/3 seeds)"
    assert lines[2] == "a 1.5x lower answer loss than the control's graft is not shown (2/3 seeds)"
    assert lines[3].startswith("zero-shot graft beats an untrained encoder on the target by >= 5 points")
    assert lines[3].endswith("on 3/3 seeds (smallest gap 49.0)")
    assert lines[4] == "the surrogate keeps 6 of the target's 12 layers (50%)"  # no stage-3 rows: no stage-3 claim
    # a --jobs subset claims only what its rows support
    assert demo.conclusions({"upper_bound": rows["upper_bound"]}, [1, 2, 3], 12) == lines[:1]


def test_jobs_flag_takes_a_subset_of_the_jobs():
    demo = _demo_module()
    assert demo.parse_args(["--jobs", "upper,untrained"]).jobs == ["upper", "untrained"]
    p = run_cli(["examples/demo.py", "--jobs", "upper,bogus"], timeout=120)
    assert p.returncode == 2 and "--jobs takes a comma-separated subset of upper,surrogate,control,untrained" in p.stderr
