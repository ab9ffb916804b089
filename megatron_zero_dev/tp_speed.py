"""TP=2 (two processes) vs TP=1 (one process) step time of the same ``pretrain_lm`` run on this machine, run
alternately (TP=1, TP=2, TP=1, ...) so that a shared machine's load hits both alike; reported per pair as a ratio.

Each run is what a user starts: ``python -m megatron_zero.training.pretrain_lm`` for TP=1 and
``python -m megatron_zero.launcher --nproc-per-node 2 ... --tensor-model-parallel-size 2`` for TP=2, both with
``OMP_NUM_THREADS=threads`` per process (default 1, what torchrun gives each rank; on a loaded machine OpenMP's
spinning threads make a multi-threaded process wildly slow: 55 s/step for the TP=1 run with 2 threads at load
~100 on 2 cores, against 0.3-1 s with 1). The step time of a run is the median of its logged ms/step after
``warmup`` steps.
"""
from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
from dataclasses import dataclass

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEP = re.compile(r"iter (\d+)/\d+ .*?\| ([\d.]+) ms/step")


@dataclass
class TPSpeedConfig:
    model: str = "tiny"
    seq_length: int = 128
    global_batch_size: int = 16
    micro_batch_size: int = 1
    iters: int = 8
    warmup: int = 2
    rounds: int = 3
    threads: int = 1


def _run_args(cfg: TPSpeedConfig) -> list[str]:
    return ["-m", "megatron_zero.training.pretrain_lm", "--model", cfg.model, "--mock-data",
            "--seq-length", str(cfg.seq_length), "--global-batch-size", str(cfg.global_batch_size),
            "--micro-batch-size", str(cfg.micro_batch_size), "--train-iters", str(cfg.iters), "--log-interval", "1"]


def step_ms(cmd: list[str], warmup: int, threads: int) -> float:
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), PYTHONWARNINGS="ignore",
               OMP_NUM_THREADS=str(threads))
    p = subprocess.run(cmd, check=False, cwd=REPO, env=env, capture_output=True, text=True)
    out = p.stdout + p.stderr
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {p.returncode}:\n{out[-3000:]}")
    times = [float(ms) for it, ms in STEP.findall(out) if int(it) > warmup]
    if not times:
        raise RuntimeError(f"no ms/step lines after step {warmup} in the output of {' '.join(cmd)}")
    return statistics.median(times)


def run_pairs(cfg: TPSpeedConfig, log=print) -> dict:
    tp1 = [sys.executable, *_run_args(cfg)]
    tp2 = [sys.executable, "-m", "megatron_zero.launcher", "--standalone", "--nproc-per-node", "2",
           *_run_args(cfg), "--tensor-model-parallel-size", "2"]
    pairs = []
    for r in range(cfg.rounds):
        a = step_ms(tp1, cfg.warmup, cfg.threads)
        b = step_ms(tp2, cfg.warmup, cfg.threads)
        pairs.append((a, b))
        log(f"round {r + 1}/{cfg.rounds}: TP=1 {a:.0f} ms/step, TP=2 {b:.0f} ms/step, ratio {b / a:.2f} "
            f"(load average {os.getloadavg()[0]:.1f})", flush=True)
    ratios = [b / a for a, b in pairs]
    return {"pairs_ms": pairs, "ratios": ratios, "median_ratio": statistics.median(ratios),
            "load_average": os.getloadavg(), "cpus": os.cpu_count()}
