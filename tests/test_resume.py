"""A TP=2 training run stopped by SIGTERM mid-way resumes to exactly the losses of an uninterrupted run."""
import json
import os
import subprocess
import sys

from tests.conftest import REPO, subprocess_env

COMMON = ["--model", "tiny", "--mock-data", "--tensor-model-parallel-size", "2", "--seq-length", "32",
          "--micro-batch-size", "2", "--global-batch-size", "8", "--train-iters", "6", "--lr", "3e-3",
          "--lr-warmup-fraction", "0.2", "--use-distributed-optimizer", "--log-interval", "1"]


def launch(tmp_path, *extra, env=None):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "megatron_zero.training.pretrain_lm", *COMMON, *extra]
    p = subprocess.run(cmd, env=subprocess_env(**(env or {})), capture_output=True, text=True, timeout=300, cwd=REPO)
    assert p.returncode == 0, (p.stdout + p.stderr)[-5000:]
    return p.stdout


def read_metrics(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_sigterm_then_resume_matches_uninterrupted(tmp_path):
    full = tmp_path / "full.jsonl"
    launch(tmp_path, "--metrics-file", str(full))
    ckpt = tmp_path / "ckpt"
    part = tmp_path / "part.jsonl"
    out = launch(tmp_path, "--save", str(ckpt), "--metrics-file", str(part),
                 env={"MEGATRON_ZERO_SIGTERM_AT_ITER": "3"})
    assert "exit signal received: stopped after iteration 3" in out
    assert [m["iteration"] for m in read_metrics(part)] == [1, 2, 3]
    # a half-written later checkpoint (as if killed during a save) must be ignored on resume
    os.makedirs(ckpt / "iter_0000005.tmp")
    os.makedirs(ckpt / "iter_0000004")  # no COMPLETE marker
    out = launch(tmp_path, "--load", str(ckpt), "--save", str(ckpt), "--metrics-file", str(part))
    assert "resumed from" in out and "at iteration 3" in out
    ref, got = read_metrics(full), read_metrics(part)
    assert [m["iteration"] for m in got] == [1, 2, 3, 4, 5, 6]
    for r, g in zip(ref, got):
        assert abs(r["loss"] - g["loss"]) < 1e-6, (r, g)
        assert abs(r["lr"] - g["lr"]) < 1e-12, (r, g)
        assert abs(r["grad_norm"] - g["grad_norm"]) < 1e-5, (r, g)
    # losses really changed over training (the comparison is not vacuous)
    assert len({round(m["loss"], 6) for m in ref}) > 3


def test_overlapped_grad_reduce_and_param_gather_match(tmp_path):
    """DP=2 with the distributed optimizer: overlapping gradient reduction and parameter all-gather with compute
    gives exactly the losses and grad norms of the plain schedule."""
    base = ["--model", "tiny", "--mock-data", "--seq-length", "32", "--micro-batch-size", "2",
            "--global-batch-size", "8", "--train-iters", "3", "--use-distributed-optimizer"]
    runs = {}
    tb = tmp_path / "tb"
    for name, extra in (("plain", ["--tensorboard-dir", str(tb)]),
                        ("overlap", ["--overlap-grad-reduce", "--overlap-param-gather"])):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               "-m", "megatron_zero.training.pretrain_lm", *base, *extra, "--metrics-file", str(tmp_path / name)]
        p = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300, cwd=REPO)
        assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
        runs[name] = read_metrics(tmp_path / name)
    assert len(runs["plain"]) == 3
    assert any(f.name.startswith("events.out.tfevents") for f in tb.iterdir())  # TensorBoard scalars written
    for a, b in zip(runs["plain"], runs["overlap"]):
        assert a["loss"] == b["loss"] and abs(a["grad_norm"] - b["grad_norm"]) < 1e-9
