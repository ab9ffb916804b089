"""The main job's code path end to end (``examples/demo.py --quick``: tiny step counts, numbers meaningless)."""
import json
import subprocess
import sys

from tests.conftest import REPO, subprocess_env


def test_demo_quick_runs_end_to_end(tmp_path):
    p = subprocess.run([sys.executable, "examples/demo.py", "--quick", "--output-dir", str(tmp_path)], cwd=REPO,
                       env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    assert "model (held-out images)" in p.stdout
    result = json.loads((tmp_path / "results.json").read_text())
    assert [r["model"].split(" ")[0] for r in result["results"]] == ["surrogate", "target", "control", "target",
                                                                     "target"]
    assert 0 < result["transition_layer"] < 8 and result["median_kl"][-1] == 0.0
    assert (tmp_path / "demo.png").exists() and (tmp_path / "grafted_surrogate" / "vlm_config.json").exists()
