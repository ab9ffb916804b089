"""How and when checkpoints are written (issue 23), through the CLI: ``--async-save`` (background writes, published
once durable) and ``--exit-duration-in-mins`` (save and exit 75 before the walltime), each resuming exactly.
(kill -9 during background writes: ``tools/reliability.py --async-save``.)"""
import json
import os

import pytest

from tests.conftest import run_worker
from tests.test_reliability import DISTOPT, LM, TINY, metrics, ok, run, single


def test_async_saves_and_walltime_exit_resume_exactly(tmp_path):
    from megatron_zero.checkpointing import run_dir

    args = single() + LM + TINY + DISTOPT + ["--train-iters", "6"]
    ref = tmp_path / "ref.jsonl"
    ok(args + ["--metrics-file", str(ref)])
    want = {m["iteration"]: m["loss"] for m in metrics(ref)}

    save, got = tmp_path / "run", tmp_path / "got.jsonl"
    common = ["--save", str(save), "--load", str(save), "--metrics-file", str(got)]
    # background saves after every step; the last (synchronous) one waits for the one in flight
    out = ok(args + common + ["--async-save", "--save-interval", "1", "--exit-after-iters", "4"])
    assert "started saving checkpoint iteration 1" in out  # (published at a later step, or before the next save)
    assert run_dir.complete_iterations(str(save)) == [3, 4]
    for it in (3, 4):
        path = run_dir.iter_dir(str(save), it)
        manifest = run_dir.read_manifest(path)
        run_dir.verify_files(path, manifest)
        assert any(f.endswith(".distcp") for f in manifest["files"])
    assert not [n for n in os.listdir(save) if n.endswith((".tmp", ".deleting"))]

    # walltime: resumed at 4, one step, then save and exit 75 with no signal
    rc, out, err = run(args + common + ["--exit-duration-in-mins", "0.001"])
    assert rc == 75, (out + err)[-3000:]
    assert "--exit-duration-in-mins" in out + err and "stopped at iteration 5/6" in err
    assert run_dir.latest_iteration(str(save)) == 5

    ok(args + common + ["--async-save", "--save-interval", "1"])
    losses = {}
    for m in metrics(got):
        losses[m["iteration"]] = m["loss"]
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    for it, loss in losses.items():
        assert loss == pytest.approx(want[it], abs=1e-6), (it, loss, want[it])
    with open(save / "latest_checkpointed_iteration.txt") as f:
        assert json.loads(f.read()) == 6


def test_timing_flags_refuse_non_positive_values():
    rc, out, err = run(single() + LM + TINY + ["--train-iters", "2", "--exit-duration-in-mins", "0"])
    assert rc == 2 and "--exit-duration-in-mins must be > 0" in err and "Traceback" not in err


def test_repeated_saves_reuse_the_save_plan_and_load_back(tmp_path):
    assert "save plans: reused and loadable" in run_worker("save_plan_cache.py", str(tmp_path), nproc=2)


MANAGER_SCRIPT = r"""
import sys, time
from megatron_zero.checkpointing.mcore_checkpoint import results_manager
print(results_manager()._process.pid, flush=True)
time.sleep(120)
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return "\nState:\tZ" not in f.read()  # a zombie has exited (its reaper may be slow in a container)
    except FileNotFoundError:
        return False


def test_the_async_writers_results_manager_dies_with_its_rank(tmp_path):
    """megatron-core's async writers report through a multiprocessing Manager forked from the rank; a rank killed
    by kill -9 must not leave that server process behind (the kill -9 trials found one outliving its run)."""
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import REPO, subprocess_env

    rank = subprocess.Popen([sys.executable, "-c", MANAGER_SCRIPT], cwd=REPO, env=subprocess_env(),
                            stdout=subprocess.PIPE, text=True)
    try:
        manager_pid = int(rank.stdout.readline())
        assert _alive(manager_pid)
        rank.send_signal(signal.SIGKILL)
        rank.wait(timeout=30)
        deadline = time.time() + 20
        while _alive(manager_pid) and time.time() < deadline:
            time.sleep(0.1)
        assert not _alive(manager_pid), "the Manager outlived its rank"
    finally:
        rank.kill()
