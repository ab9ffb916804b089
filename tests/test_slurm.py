"""The shipped sbatch scripts under a real SLURM (tests/slurm_cluster.py: munged, slurmctld and slurmd on this host,
one node, 2 CPUs; ``.ci/run`` installs Debian's ``slurm-wlm`` and ``munge``). Without them these tests skip with
the reason.

* every ``examples/slurm/*.sbatch``, scaled down (tiny models; the same TP/PP/SP/optimizer/overlap flags with TP8 ->
  TP2, PP4 -> PP2; 4 processes on CPU), submitted with ``sbatch`` and finishing (these are the layout runs:
  tests/test_workflow_layouts.py keeps only the input checks);
* preemption: ``scancel --signal=USR1`` mid-run -> save, exit 75, the job requeues itself and completes with the
  losses of an uninterrupted run;
* bad input: exit 2, never requeued;
* a job that reaches its time limit saves before it (``--signal=USR1@<lead>``).
"""
import json
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, subprocess_env
from tests.slurm_cluster import SlurmCluster, SlurmUnavailable

pytestmark = pytest.mark.timeout(1200)
SCRIPTS = Path(REPO) / "examples" / "slurm"
# the flags that make a layout: a scaled script keeps exactly the shipped script's set of them
LAYOUT_FLAGS = {"--tensor-model-parallel-size", "--pipeline-model-parallel-size", "--sequence-parallel",
                "--use-distributed-optimizer", "--overlap-grad-reduce", "--overlap-param-gather",
                "--recompute-activations", "--loss-weighting", "--stage", "--surrogate"}
TINY_LM = ["-m", "megatron_zero.training.pretrain_lm", "--model", "tiny", "--mock-data", "--seq-length", "32",
           "--micro-batch-size", "2", "--global-batch-size", "8", "--lr", "3e-3", "--lr-warmup-fraction", "0.2",
           "--log-interval", "1", "--use-distributed-optimizer", "--tensor-model-parallel-size", "2"]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    try:
        cluster = SlurmCluster.start(tmp_path_factory.mktemp("slurm"))
    except SlurmUnavailable as e:
        pytest.skip(f"no SLURM to submit to: {e}")
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from tests.test_pretrain_vlm import hf_style_world

    return hf_style_world(tmp_path_factory.mktemp("slurm_world"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scaled(script: str, command: str, same_layout: bool = True) -> str:
    """The shipped script with its header fitted to the test node (1 node, no GPUs) and ``command`` as its last
    line; asserts that ``command`` keeps the shipped run's layout flags (``same_layout``)."""
    text = (SCRIPTS / script).read_text()
    head, body = text.split("\nsource ", 1)
    source_line, shipped_command = body.split("\n", 1)
    flags = lambda s: set(re.findall(r"(?<!\S)--[a-z][a-z-]*", s)) & LAYOUT_FLAGS
    assert not same_layout or flags(command) == flags(shipped_command), (script, flags(command) ^ flags(shipped_command))
    lines = []
    for line in head.splitlines():
        if line.startswith(("#SBATCH --gpus-per-node", "#SBATCH --exclusive")):
            continue
        lines.append("#SBATCH --nodes=1" if line.startswith("#SBATCH --nodes") else line)
    return "\n".join(lines) + "\nsource " + source_line + "\n" + command + "\n"


def job_env(nproc: int, ckpt_root: Path, **extra) -> dict:
    env = subprocess_env(GPUS_PER_NODE=str(nproc), CKPT_ROOT=str(ckpt_root), **extra)
    env["MASTER_PORT"] = str(_free_port())  # (subprocess_env drops an inherited one)
    return env


def submit(slurm: SlurmCluster, tmp_path: Path, script_text: str, *sbatch_args: str, env: dict, cwd=REPO) -> int:
    path = tmp_path / "job.sbatch"
    path.write_text(script_text)
    return slurm.sbatch(f"--output={tmp_path}/%x-%j.out", *sbatch_args, str(path), env=env, cwd=cwd)


def log_of(tmp_path: Path, job_id: int) -> str:
    (path,) = tmp_path.glob(f"*-{job_id}.out")
    return path.read_text()


def metrics(path: Path) -> list:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


VLM = "run_torchrun -m megatron_zero.training.pretrain_vlm --decoder-load {w}/decoder " \
      "--data-path {w}/llava.json --image-root {w}/images --vision-model tiny-clip --seq-length 48 " \
      "--micro-batch-size 1 --log-interval 1 --train-iters 2 --metrics-file {m} "
TP2PP2 = "--tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 --sequence-parallel "
COMMANDS = {
    # TP2 x DP4 -> TP2 x DP2; the default --encoder-trainable-layers (8) on a 3-layer encoder trains all 3
    "single_node_8b.sbatch": VLM + "--stage 2 --loss-on-special-tokens --tensor-model-parallel-size 2 "
    "--global-batch-size 8 --use-distributed-optimizer --recompute-activations --save $CKPT_ROOT/8b-stage2 "
    "--load $CKPT_ROOT/8b-stage2",
    # TP8 x PP2 -> TP2 x PP2 (stage 1/2 losses vs PP=1: tests/test_workflow.py)
    "stage1_surrogate_70b.sbatch": VLM + "--stage 1 --translator-layer 1 " + TP2PP2 + "--global-batch-size 4 "
    "--use-distributed-optimizer --overlap-grad-reduce --recompute-activations --save $CKPT_ROOT/stage1 "
    "--load $CKPT_ROOT/stage1",
    "stage2_surrogate_70b.sbatch": VLM + "--stage 2 --loss-on-special-tokens " + TP2PP2 + "--global-batch-size 4 "
    "--use-distributed-optimizer --overlap-grad-reduce --recompute-activations --save $CKPT_ROOT/stage2 "
    "--load $CKPT_ROOT/stage2",
    # TP8 x PP4 -> TP2 x PP2, length-weighted loss, overlapped grad reduce and param gather
    "stage3_target_70b.sbatch": VLM + "--stage 3 --loss-weighting length-weighted --loss-weighting-ord 0.5 " + TP2PP2
    + "--global-batch-size 4 --use-distributed-optimizer --overlap-grad-reduce --overlap-param-gather "
    "--recompute-activations --save $CKPT_ROOT/stage3 --load $CKPT_ROOT/stage3",
    "benchmark_70b.sbatch": "run_torchrun \"$REPO/tools/benchmark.py\" --model tiny --surrogate 1,2 " + TP2PP2
    + "--recompute-activations --seq-length 32 --micro-batch-size 1 --global-batch-size 2 --iters 3 --warmup 1 "
    "--output-json $CKPT_ROOT/benchmark.json",
}


@pytest.mark.parametrize("script", sorted(COMMANDS))
def test_shipped_sbatch_script_runs_under_slurm(slurm, world, tmp_path, script):
    """Submitted from the repository root, no REPO set (found through SLURM_SUBMIT_DIR), 4 processes."""
    m = tmp_path / "m.jsonl"
    text = scaled(script, COMMANDS[script].format(w=world, m=m))
    job = submit(slurm, tmp_path, text, env=job_env(4, tmp_path / "ckpt"))
    info = slurm.wait(job, timeout=900)
    log = log_of(tmp_path, job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-5000:]
    assert info["Restarts"] == "0"
    if script.startswith("benchmark"):
        assert "Projected training hours" in log and (tmp_path / "ckpt" / "benchmark.json").is_file()
    else:
        assert len(metrics(m)) == 2, log[-5000:]
        assert ("TP=2 PP=2 DP=1" if "--pipeline" in text else "TP=2 PP=1 DP=2") in log
        assert (tmp_path / "ckpt").is_dir()


def _lm_job(tmp_path: Path, *args: str) -> str:
    """A job in the shape of the shipped scripts (common.sh + run_torchrun) training the tiny LM at TP=2."""
    return scaled("single_node_8b.sbatch", "run_torchrun " + " ".join([*TINY_LM, *args]), same_layout=False)


def test_preemption_requeues_and_resumes_the_loss_curve(slurm, tmp_path):
    """scancel --signal=USR1 mid-run (what --signal=USR1@<s> does before the time limit): every rank saves, exit 75,
    the job requeues itself, resumes from --load and completes; the losses are those of an uninterrupted run.
    Submitted from another directory with REPO set."""
    iters = 12
    ckpt, m, ref = tmp_path / "ckpt", tmp_path / "m.jsonl", tmp_path / "ref.jsonl"
    args = ["--train-iters", str(iters), "--save", str(ckpt), "--load", str(ckpt), "--metrics-file", str(m)]
    env = job_env(2, tmp_path / "root", REPO=REPO)
    job = submit(slurm, tmp_path, _lm_job(tmp_path, *args), env=env, cwd=str(tmp_path))
    deadline = time.time() + 600
    while len(metrics(m)) < 3:
        assert slurm.job(job).get("JobState") in ("PENDING", "RUNNING", "CONFIGURING"), log_of(tmp_path, job)
        assert time.time() < deadline, "no training progress"
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR1", str(job)], env=slurm.env, check=True)
    info = slurm.wait(job, timeout=900)
    log = log_of(tmp_path, job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-6000:]
    saved = [int(x) for x in re.findall(r"resumed from \S+ at iteration (\d+)", log)]
    requeues = int(info["Restarts"])
    print(f"\npreemption under SLURM: {requeues} requeue(s), saved at iteration(s) {saved}, "
          f"final iteration {metrics(m)[-1]['iteration']}")
    assert requeues == 1 and len(saved) == 1 and 3 <= saved[0] < iters, log[-6000:]
    assert "stopped early with a checkpoint (exit 75): requeueing" in log and "(restart 1)" in log
    # the uninterrupted run (same layout, plain launcher) for the loss curve
    p = subprocess.run([sys.executable, "-m", "megatron_zero.launcher", "--standalone", "--nproc-per-node=2",
                        *TINY_LM, "--train-iters", str(iters), "--metrics-file", str(ref)],
                       check=False, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, (p.stdout + p.stderr)[-5000:]
    by_iter = {r["iteration"]: r for r in metrics(m)}  # a step after the save is repeated: keep the last record
    want = {r["iteration"]: r for r in metrics(ref)}
    assert sorted(by_iter) == sorted(want) == list(range(1, iters + 1))
    for it, w in want.items():
        assert by_iter[it]["loss"] == pytest.approx(w["loss"], abs=1e-6), (it, by_iter[it], w)


def test_bad_input_exits_2_and_is_not_requeued(slurm, tmp_path):
    text = _lm_job(tmp_path, "--train-iters", "2", "--global-batch-size", "7")
    job = submit(slurm, tmp_path, text, env=job_env(2, tmp_path / "root"))
    info = slurm.wait(job, timeout=600)
    log = log_of(tmp_path, job)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", (info, log[-5000:])
    assert info["Restarts"] == "0" and "requeueing" not in log and "--global-batch-size 7" in log, log[-5000:]


def test_time_limit_saves_before_it(slurm, tmp_path):
    """--time=3 with --signal=USR1@90 (SLURM sends it up to 60 s early: 30-90 s into the job): the run saves and
    requeues before the limit (then we cancel it)."""
    from megatron_zero.checkpointing.run_dir import latest_iteration

    ckpt = tmp_path / "ckpt"
    text = _lm_job(tmp_path, "--train-iters", "100000", "--save", str(ckpt), "--load", str(ckpt))
    job = submit(slurm, tmp_path, text, "--time=3", "--signal=USR1@90", env=job_env(2, tmp_path / "root"))
    deadline = time.time() + 300
    info = slurm.job(job)
    while info.get("Restarts", "0") == "0" and info.get("JobState") not in ("COMPLETED", "FAILED", "TIMEOUT"):
        assert time.time() < deadline, info
        time.sleep(0.5)
        info = slurm.job(job)
    subprocess.run(["scancel", str(job)], check=False, env=slurm.env)
    log = log_of(tmp_path, job)
    assert info["JobState"] != "TIMEOUT" and info.get("Restarts") == "1", (info, log[-5000:])
    assert "got SIGUSR1" in log and "stopped early with a checkpoint (exit 75): requeueing" in log, log[-5000:]
    assert latest_iteration(str(ckpt)) >= 1
    print(f"\ntime limit: saved iteration {latest_iteration(str(ckpt))} before the 3-minute limit")
