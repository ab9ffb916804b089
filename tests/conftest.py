"""Shared test helpers: launching multi-process workers with torchrun on CPU (gloo)."""
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TIKTOKEN_CACHE_DIR", "")


def subprocess_env(**extra: str) -> dict:
    """Environment for a child process that starts its own torch.distributed world."""
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", **extra)
    # an in-process world of one (set up by earlier tests) leaves its rendezvous variables behind
    for var in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(var, None)
    return env


def run_worker(script: str, *args: str, nproc: int = 1, timeout: int = 600) -> str:
    """Run ``tests/workers/<script>`` (under torchrun when nproc > 1); fail the test with its output."""
    env = subprocess_env()
    path = os.path.join(REPO, "tests", "workers", script)
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", path]
    else:
        cmd = [sys.executable, path]
    proc = subprocess.run(cmd + list(args), env=env, capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        pytest.fail(f"{script} {' '.join(args)} exited {proc.returncode}:\n{out[-6000:]}")
    return out
