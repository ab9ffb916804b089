"""The main job's code path end to end (``examples/demo.py --quick``: tiny step counts, numbers meaningless):
target pretraining, trajectory, surrogate + control, per-seed stage 1/2/3 in two worker processes, grafting,
evaluation, the results.json shape the README documents and the computed conclusion."""
import json

from tests.conftest import run_cli

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
