"""Shared test helpers: launching multi-process workers with torchrun on CPU (gloo)."""
import os
import subprocess
import sys

import pytest

from megatron_zero import platform

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TIKTOKEN_CACHE_DIR", "")
platform.import_megatron_core()  # the test process is an entry point: megatron-core imported fast and quiet


def subprocess_env(**extra: str) -> dict:
    """Environment for a child process that starts its own torch.distributed world."""
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", **extra)
    # an in-process world of one (set up by earlier tests) leaves its rendezvous variables behind
    for var in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(var, None)
    return env


def run_cli(args, nproc: int = 1, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """A command as a user starts it from the repository root: ``args`` after ``python`` (``tools/x.py ...``,
    ``-m module ...``, ``examples/demo.py ...``, a script path), under torchrun when ``nproc`` > 1 (a world of one
    needs no launcher process), in :func:`subprocess_env` unless ``env`` is given. stdout and stderr captured."""
    launch = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"] if nproc > 1 else []
    return subprocess.run([sys.executable, *launch, *map(str, args)], cwd=REPO, env=env or subprocess_env(),
                          capture_output=True, text=True, timeout=timeout, check=False)


def run_cli_ok(args, nproc: int = 1, env: dict | None = None, timeout: int = 600) -> str:
    """:func:`run_cli` that fails the test with the command's output when it exits non-zero; stdout + stderr."""
    p = run_cli(args, nproc=nproc, env=env, timeout=timeout)
    out = p.stdout + p.stderr
    if p.returncode != 0:
        pytest.fail(f"{' '.join(map(str, args))} exited {p.returncode}:\n{out[-6000:]}")
    return out


def exit_status(main, argv) -> int:
    """Run a tool's ``main`` as its script does, behind :func:`megatron_zero.errors.run_main`; its exit status."""
    from megatron_zero.errors import run_main

    with pytest.raises(SystemExit) as exited:
        run_main(main, argv=argv)
    return exited.value.code


def worker_output(script: str, *args: str, nproc: int = 1, timeout: int = 600) -> tuple[int, str]:
    """Run ``tests/workers/<script>`` (under torchrun when nproc > 1): (exit status, stdout + stderr)."""
    p = run_cli([os.path.join(REPO, "tests", "workers", script), *args], nproc=nproc, timeout=timeout)
    return p.returncode, p.stdout + p.stderr


def run_worker(script: str, *args: str, nproc: int = 1, timeout: int = 600) -> str:
    """Run ``tests/workers/<script>`` (under torchrun when nproc > 1); fail the test with its output."""
    rc, out = worker_output(script, *args, nproc=nproc, timeout=timeout)
    if rc != 0:
        pytest.fail(f"{script} {' '.join(args)} exited {rc}:\n{out[-6000:]}")
    return out


@pytest.fixture(scope="session")
def layout_checks(tmp_path_factory):
    """The reference process and the one 4-process launch of tests/workers/layout_checks.py, shared by the
    layout-equivalence tests (parallel, vlm, packed): ``{"reference": output, "compare": output}``.

    Each test asserts its own worker's part (``WORKER <name> rc=0`` and its messages), so a failure is reported
    by the test it belongs to."""
    d = tmp_path_factory.mktemp("layout_checks")
    refs = [f"{name}={d / (name + '.pt')}" for name in ("parallel", "vlm", "packed")]
    _, reference = worker_output("layout_checks.py", "reference", *refs, timeout=900)
    _, compare = worker_output("layout_checks.py", "compare", *refs, nproc=4, timeout=1500)
    return {"reference": reference, "compare": compare}


def layout_check_output(checks: dict, name: str, stage: str) -> str:
    """The output of ``stage`` (reference/compare) of the layout_checks launch; fails unless worker ``name`` passed."""
    out = checks[stage]
    if f"WORKER {name} rc=0" not in out:
        pytest.fail(f"layout_checks.py {stage}: worker {name} did not pass:\n{out[-6000:]}")
    return out


@pytest.fixture(scope="module")
def wf(request, tmp_path_factory):
    """The whole workflow of one decoder family (``request.param``: its :class:`tests.workflow_world.Pipeline`
    subclass), each step run once per module."""
    from tests.workflow_world import Pipeline

    return Pipeline.of(request.param)(str(tmp_path_factory.mktemp(f"workflow-{request.param}")))
