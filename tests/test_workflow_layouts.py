"""The pretrain_vlm input checks that must stop a run before any model is built, each a one-line error with exit
status 2, and the input checks of the surrogate builder and the benchmark. The layouts of examples/slurm/*.sbatch,
scaled down, run as sbatch jobs under a real SLURM in tests/test_slurm.py (stage 1/2 of the 70B recipe also in
tests/test_workflow.py against the PP=1 losses)."""
import json

import pytest

from tests.conftest import run_cli
from tests.test_pretrain_vlm import hf_style_world

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return hf_style_world(tmp_path_factory.mktemp("layouts"))


def _vlm(world, *args, nproc=4, expect=0):
    p = run_cli(["-m", "megatron_zero.training.pretrain_vlm", "--decoder-load", world / "decoder",
                 "--data-path", world / "llava.json", "--image-root", world / "images", "--seq-length", "48",
                 "--micro-batch-size", "1", "--log-interval", "1", *args], nproc=nproc)
    out = p.stdout + p.stderr
    assert p.returncode == expect, out[-5000:]
    return out


def _losses(path):
    return [json.loads(line)["loss"] for line in open(path)]


@pytest.mark.parametrize("case", ["encoder-layers", "too-short", "too-small"])
def test_bad_runs_stop_before_any_model_is_built(world, case):
    args = {"encoder-layers": ["--stage", "2", "--encoder-trainable-layers", "5", "--global-batch-size", "8"],
            "too-short": ["--stage", "2", "--seq-length", "16", "--global-batch-size", "8"],
            "too-small": ["--stage", "2", "--global-batch-size", "64"]}[case]
    out = _vlm(world, "--vision-model", "tiny-clip", "--train-iters", "1", *args, nproc=1, expect=2)
    assert "Traceback" not in out
    expected = {"encoder-layers": "--encoder-trainable-layers 5: the encoder tiny-clip builds 3 layers",
                "too-short": "--seq-length 16 drops 16 of 16 conversations",
                "too-small": "16 usable samples, fewer than one global batch (--global-batch-size 64)"}[case]
    assert expected in out, out[-3000:]
    if case == "too-short":
        assert "an image takes 19 positions" in out and "raise --seq-length to" in out


def test_surrogate_from_a_trajectory_that_leaves_nothing_to_drop(world, tmp_path):
    """The detected layer is named, why it cannot be used, and a span that can; no flag the user never gave."""
    traj = tmp_path / "trajectory.json"
    traj.write_text(json.dumps({"transition_layer": 2, "num_layers": 4}))  # b = L-2 = 2: nothing to drop
    p = run_cli(["tools/build_surrogate.py", "--load-dir", world / "decoder", "--save-dir", tmp_path / "srgt",
                 "--from-trajectory", traj], timeout=300)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert "detected transition layer 2" in p.stderr and "the default end L-2 = 2" in p.stderr
    assert "--translator-end 2" in p.stderr and "--translator-start 1" in p.stderr  # the suggested span T(1,2)
    assert not (tmp_path / "srgt").exists()


def test_benchmark_needs_enough_iterations():
    p = run_cli(["tools/benchmark.py", "--model", "tiny", "--surrogate", "1,2", "--iters", "2"], timeout=300)
    assert p.returncode == 2 and "--iters 2: need at least 3 timed iterations" in p.stderr
    assert "Traceback" not in p.stderr
