"""Reliability trials (``tools/reliability.py``): random kill -9 / SIGUSR1 / SIGTERM interruptions of small
training runs, then resume; and bad inputs to the entry points.

Each :func:`trial` picks a launcher (``megatron_zero.launcher`` or plain ``torchrun``), TP=1 or 2 (2 processes),
the distributed or plain optimizer, and an interruption (``kill -9`` of the launcher and every rank — a lost
node —, SIGUSR1 or SIGTERM to the launcher) at a random moment (also during saves: ``--save-interval 1``); the run
is then resumed to the end and its losses compared with an uninterrupted run of the same configuration. With
``async_save`` the runs save in the background (``--async-save``), so a kill lands in a background write most of
the time; after every interruption each checkpoint that looks complete (``COMPLETE``) is verified against its
manifest: one that fails is a *loadable incomplete* checkpoint (the goal is none).
:func:`run_trials` runs them and the :func:`bad_inputs` and returns the figures: trials, exact resumes, steps
lost, exit codes as documented, bad inputs tried, clear errors (non-zero exit, one ``error:`` line, no traceback),
tracebacks.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--model", "tiny", "--mock-data", "--seq-length", "32", "--micro-batch-size", "2", "--global-batch-size", "8",
        "--lr", "3e-3", "--lr-warmup-fraction", "0.2"]
LM = ["-m", "megatron_zero.training.pretrain_lm"]


def env() -> dict:
    e = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1",
             PYTHONWARNINGS="ignore", TIKTOKEN_CACHE_DIR="")
    for var in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MEGATRON_ZERO_TRACEBACK"):
        e.pop(var, None)
    return e


def launcher(kind: str) -> list[str]:
    mod = "megatron_zero.launcher" if kind == "mz" else "torch.distributed.run"
    return [sys.executable, "-m", mod, "--standalone", "--nproc-per-node=2"]


def read_metrics(path: str) -> dict[int, float]:
    out: dict[int, float] = {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    m = json.loads(line)
                except json.JSONDecodeError:  # a line cut by kill -9
                    continue
                out[m["iteration"]] = m["loss"]
    return out


def count_lines(path: str) -> int:
    try:
        with open(path) as f:
            return sum(1 for _ in f)
    except FileNotFoundError:
        return 0


def pids_mentioning(text: str) -> list[int]:
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit() and int(pid) != os.getpid():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if text.encode() in f.read():
                        found.append(int(pid))
            except OSError:
                pass
    return found


def latest(save: str):
    sys.path.insert(0, REPO)
    from megatron_zero.checkpointing.run_dir import latest_iteration

    return latest_iteration(save)


def config_args(cfg: dict, iters: int) -> list[str]:
    a = [*LM, *TINY, "--train-iters", str(iters), "--tensor-model-parallel-size", str(cfg["tp"])]
    return a + (["--use-distributed-optimizer"] if cfg["distopt"] else [])


def loadable_incomplete(save: str) -> int:
    """Checkpoints under ``save`` that look complete (``COMPLETE``) but whose files fail their manifest."""
    from megatron_zero.checkpointing import run_dir

    bad = 0
    for it in run_dir.complete_iterations(save):
        path = run_dir.iter_dir(save, it)
        try:
            run_dir.verify_files(path, run_dir.read_manifest(path))
        except run_dir.CheckpointError:
            bad += 1
    return bad


def trial(rng: random.Random, work: str, n: int, iters: int, refs: dict, log,
          interruptions=("kill9", "SIGUSR1", "SIGTERM"), async_save: bool = False) -> dict:
    cfg = {"tp": rng.choice([1, 2]), "distopt": rng.choice([True, False])}
    kind = rng.choice(["mz", "torchrun"])
    how = rng.choice(list(interruptions))
    key = (cfg["tp"], cfg["distopt"])
    if key not in refs:
        ref_file = os.path.join(work, f"ref_tp{cfg['tp']}_{int(cfg['distopt'])}.jsonl")
        if not os.path.exists(ref_file):
            subprocess.run(launcher("torchrun") + config_args(cfg, iters) + ["--metrics-file", ref_file], env=env(),
                           cwd=REPO, capture_output=True, check=True)
        refs[key] = read_metrics(ref_file)
    d = os.path.join(work, f"trial{n}")
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    save, metrics = os.path.join(d, "ckpt"), os.path.join(d, "metrics.jsonl")
    common = config_args(cfg, iters) + ["--save", save, "--load", save, "--save-interval", "1", "--metrics-file",
                                        metrics] + (["--async-save"] if async_save else [])
    # output to a file, not a pipe: after kill -9 a helper process of a rank may keep a pipe open
    log_file = open(os.path.join(d, "interrupted.log"), "w")
    p = subprocess.Popen(launcher(kind) + common, env=env(), cwd=REPO, stdout=log_file, stderr=subprocess.STDOUT)
    at = rng.randint(1, iters - 2)
    while count_lines(metrics) < at and p.poll() is None:
        time.sleep(0.02)
    time.sleep(rng.uniform(0, 0.6))  # anywhere in a step or a save
    reached = max(read_metrics(metrics) or {0: 0})
    if how == "kill9":
        for pid in [p.pid] + pids_mentioning(save):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    else:
        p.send_signal(getattr(signal, how))
    try:
        p.wait(timeout=600)
    finally:
        log_file.close()
    deadline = time.time() + 60
    while pids_mentioning(save) and time.time() < deadline:
        time.sleep(0.2)
    orphans = pids_mentioning(save)
    for pid in orphans:
        os.kill(pid, signal.SIGKILL)
    incomplete = loadable_incomplete(save)
    resumed_from = latest(save) or 0
    reached = max(max(read_metrics(metrics) or {0: 0}), reached)
    r = subprocess.run(launcher("mz") + common, env=env(), cwd=REPO, capture_output=True, text=True)
    got = read_metrics(metrics)
    ref = refs[key]
    exact = r.returncode == 0 and sorted(got) == sorted(ref) and all(abs(got[i] - ref[i]) < 1e-6 for i in ref)
    expected_rc = {"kill9": None, "SIGUSR1": 75 if kind == "mz" else None, "SIGTERM": 75 if kind == "mz" else None}
    rc_ok = expected_rc[how] is None or p.returncode == expected_rc[how] or p.returncode == 0
    res = {"trial": n, "launcher": kind, "signal": how, **cfg, "at_iteration": reached, "resumed_from": resumed_from,
           "steps_lost": max(reached - resumed_from, 0), "interrupted_rc": p.returncode, "rc_as_documented": rc_ok,
           "orphans": len(orphans), "loadable_incomplete": incomplete, "resume_rc": r.returncode, "exact": exact,
           "async_save": async_save}
    log(json.dumps(res))
    if not exact:
        log((r.stdout + r.stderr)[-3000:])
    return res


def bad_inputs(work: str) -> list[tuple[str, list[str]]]:
    """(name, command) pairs of bad inputs a user could give."""
    os.makedirs(work, exist_ok=True)
    text = os.path.join(work, "latin1.txt")
    with open(text, "wb") as f:
        f.write("caf\xe9 na\xefve\n".encode("latin-1"))
    npy = os.path.join(work, "big_ids.npy")
    import numpy as np

    np.save(npy, np.arange(0, 100000, dtype=np.int64))
    afile = os.path.join(work, "a_file")
    open(afile, "w").close()
    try:
        import llama_models

        tokenizer = os.path.join(os.path.dirname(llama_models.__file__), "llama3", "tokenizer.model")
    except ImportError:
        tokenizer = os.path.join(work, "no_tokenizer")
    py = [sys.executable]
    lm = py + LM + TINY
    return [
        ("train-iters 0", lm + ["--train-iters", "0"]),
        ("no data", py + LM + ["--model", "tiny", "--train-iters", "2"]),
        ("unknown model", py + LM + ["--model", "nosuch", "--mock-data", "--train-iters", "2"]),
        ("non-UTF-8 text data", py + LM + ["--model", "tiny", "--train-iters", "2", "--data-path", text,
                                           "--tokenizer", tokenizer]),
        ("token ids beyond the vocabulary", py + LM + ["--model", "tiny", "--train-iters", "2", "--seq-length", "32",
                                                       "--data-path", npy]),
        ("--save is a file", lm + ["--train-iters", "2", "--save", afile]),
        ("--load is a file", lm + ["--train-iters", "2", "--load", afile]),
        ("bad flag value", lm + ["--train-iters", "x"]),
        ("generate --batch-size 0", py + ["tools/generate.py", "--checkpoint", work, "--prompts", afile,
                                          "--batch-size", "0"]),
        ("convert TP 0", py + ["tools/convert_checkpoint.py", "--load-dir", work, "--save-dir", afile,
                               "--source-format", "mcore", "--target-format", "mcore",
                               "--target-tensor-parallel-size", "0"]),
        ("convert into a file", py + ["tools/convert_checkpoint.py", "--load-dir", work, "--save-dir", afile,
                                      "--source-format", "mcore", "--target-format", "hf"]),
        ("graft missing encoder", py + ["tools/graft.py", "--encoder", os.path.join(work, "none"), "--target", work,
                                        "--output", os.path.join(work, "out")]),
        ("vlm: --decoder-load is not a checkpoint", py + ["-m", "megatron_zero.training.pretrain_vlm", "--stage",
                                                         "1", "--decoder-load", work, "--tokenizer", tokenizer,
                                                         "--data-path", afile, "--train-iters", "1"]),
        ("--load-dir missing", py + ["tools/convert_checkpoint.py", "--load-dir", os.path.join(work, "none"),
                                     "--save-dir", os.path.join(work, "o"), "--source-format", "hf",
                                     "--target-format", "mcore"]),
    ]


def classify(proc: subprocess.CompletedProcess) -> str:
    err = proc.stderr.strip()
    if proc.returncode == 0:
        return "accepted"
    if "Traceback (most recent call last)" in err:
        return "traceback"
    lines = [x for x in err.splitlines() if "error" in x.lower()]
    if lines and "internal error" not in lines[-1]:
        return "clear"
    return "unclear"


def run_trials(trials: int, iters: int, workdir: str, seed: int = 0, with_bad_inputs: bool = True,
               log=print, interruptions=("kill9", "SIGUSR1", "SIGTERM"), async_save: bool = False) -> dict:
    """Run ``trials`` interruption trials (and the bad inputs) under ``workdir``; returns the summary figures."""
    rng = random.Random(seed)
    os.makedirs(workdir, exist_ok=True)
    results, refs = [], {}
    t0 = time.time()
    for n in range(trials):
        results.append(trial(rng, workdir, n, iters, refs, log, interruptions, async_save))
        log(f"trial {n + 1}/{trials} done, {time.time() - t0:.0f} s")
    kinds = {"clear": 0, "traceback": 0, "unclear": 0, "accepted": 0}
    if with_bad_inputs:
        for name, cmd in bad_inputs(os.path.join(workdir, "bad")):
            r = subprocess.run(cmd, env=env(), cwd=REPO, capture_output=True, text=True, timeout=600)
            k = classify(r)
            kinds[k] += 1
            last = [x for x in r.stderr.strip().splitlines() if x.strip()][-1:] or [""]
            log(f"bad input [{k}] {name}: rc {r.returncode}: {last[0][:200]}")
    return {
        "trials": len(results),
        "exact_resumes": sum(r["exact"] for r in results),
        "steps_lost_total": sum(r["steps_lost"] for r in results),
        "steps_lost_max": max((r["steps_lost"] for r in results), default=0),
        "exit_codes_as_documented": sum(r["rc_as_documented"] for r in results),
        "orphaned_ranks": sum(r["orphans"] for r in results),
        "loadable_incomplete_checkpoints": sum(r["loadable_incomplete"] for r in results),
        "bad_inputs_tried": sum(kinds.values()) if with_bad_inputs else 0,
        "clear_errors": kinds["clear"], "unclear_errors": kinds["unclear"], "tracebacks": kinds["traceback"],
        "bad_inputs_accepted": kinds["accepted"], "seconds": round(time.time() - t0),
    }
