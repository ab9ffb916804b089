"""Loss-free under batch conditions (issue 16), tested as a user meets it: through the CLIs, torchrun and signals.

* preemption: SIGUSR1/SIGTERM sent to the *launcher* process (as SLURM does) of a 2-process run -> a checkpoint,
  every rank exits, exit 75 from ``megatron_zero.launcher``, and the chain of resumes gives exactly the losses of
  an uninterrupted run;
* ``--save`` safety: a lock against a second run, a used directory refused (or ``--overwrite``), the checkpoint
  just written never pruned;
* no silent wrong loads: a flipped byte, a truncated file, a different architecture, a missing RNG state;
* resume at another layout (TP=2 -> TP=1 x DP=2, DP=2 -> DP=1) continues the loss curve; an impossible one is
  refused in one line before loading.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO, subprocess_env

TINY = ["--model", "tiny", "--mock-data", "--seq-length", "32", "--micro-batch-size", "2", "--global-batch-size", "8",
        "--lr", "3e-3", "--lr-warmup-fraction", "0.2", "--log-interval", "1"]
DISTOPT = ["--use-distributed-optimizer"]
LM = ["-m", "megatron_zero.training.pretrain_lm"]


def torchrun(nproc=2):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]


def mz_launcher(nproc=2):
    return [sys.executable, "-m", "megatron_zero.launcher", "--standalone", f"--nproc-per-node={nproc}"]


def single():
    return [sys.executable]


def run(cmd, timeout=900, **env):
    p = subprocess.run(cmd, env=subprocess_env(**env), capture_output=True, text=True, timeout=timeout, cwd=REPO)
    return p.returncode, p.stdout, p.stderr


def ok(cmd, **env):
    rc, out, err = run(cmd, **env)
    assert rc == 0, (out + err)[-5000:]
    return out + err


def metrics(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def n_metrics(path):
    try:
        with open(path) as f:
            return sum(1 for _ in f)
    except FileNotFoundError:
        return 0


def processes_mentioning(text):
    """PIDs of live processes whose command line contains ``text`` (orphaned ranks)."""
    from megatron_zero_dev.reliability import pids_mentioning

    return pids_mentioning(text)


def signal_after(cmd, sig, metrics_file, after_lines, timeout=300, during=None):
    """Start ``cmd``, wait until ``metrics_file`` has ``after_lines`` lines, send ``sig`` to the launcher process.

    ``during()`` (optional) runs while the job trains, before the signal. Returns (rc, output)."""
    p = subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         cwd=REPO)
    try:
        deadline = time.time() + timeout
        while n_metrics(metrics_file) < after_lines:
            assert p.poll() is None, f"exited {p.returncode} before the signal:\n{p.stdout.read()[-5000:]}"
            assert time.time() < deadline, "no progress"
            time.sleep(0.05)
        if during is not None:
            during()
        p.send_signal(sig)
        out, _ = p.communicate(timeout=timeout)
    finally:
        if p.poll() is None:
            p.kill()
    return p.returncode, out


def last_error_line(text):
    lines = [x for x in text.strip().splitlines() if "error" in x]
    return lines[-1] if lines else ""


def assert_one_line_error(rc, out, err, *needles):
    assert rc == 2, (rc, (out + err)[-3000:])
    assert "Traceback" not in err, err[-3000:]
    line = last_error_line(err)
    for n in needles:
        assert n in line, (n, err[-3000:])


def test_preemption_signals_to_the_launcher_then_exact_resume(tmp_path):
    """SIGUSR1 to megatron_zero.launcher, SIGTERM and SIGUSR1 to a plain torchrun: each time every rank saves and
    exits; the resumed pieces together equal an uninterrupted run."""
    run_args = [*LM, *TINY, *DISTOPT, "--tensor-model-parallel-size", "2", "--train-iters", "200"]
    last = 14
    ref = tmp_path / "ref.jsonl"
    ok(torchrun() + run_args + ["--exit-after-iters", str(last), "--metrics-file", str(ref)])

    ckpt = tmp_path / "ckpt"
    got = tmp_path / "got.jsonl"
    resume = ["--save", str(ckpt), "--load", str(ckpt), "--metrics-file", str(got)]
    second_run = {}

    def try_second_run():  # a second run into the same --save while the first one trains: refused (lock)
        second_run["result"] = run(single() + [*LM, *TINY, "--train-iters", "3", "--save", str(ckpt),
                                               "--load", str(ckpt)])

    # 1. SIGUSR1 to our launcher: exit 75
    rc, out = signal_after(mz_launcher() + run_args + resume, signal.SIGUSR1, got, 2, during=try_second_run)
    assert rc == 75, out[-5000:]
    assert "stopped early" in out and "resumable" in out
    rc2, out2, err2 = second_run["result"]
    assert_one_line_error(rc2, out2, err2, f"--save {ckpt}", "in use by another run")
    from megatron_zero.checkpointing.run_dir import latest_iteration

    stops = [latest_iteration(str(ckpt))]
    assert stops[0] is not None and stops[0] >= 2
    assert not processes_mentioning(str(ckpt)), "ranks left running"
    # 2. SIGTERM to a plain torchrun (it forwards SIGTERM; its own exit status is 1), 3. SIGUSR1 to a plain torchrun
    # (it does not handle SIGUSR1 and dies: the ranks get SIGTERM from the kernel on its death)
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        rc, out = signal_after(torchrun() + run_args + resume, sig, got, n_metrics(got) + 1)
        assert f"resumed from {ckpt} at iteration {stops[-1]}" in out, out[-5000:]
        assert "stopped early at iteration" in out, out[-5000:]
        stops.append(latest_iteration(str(ckpt)))
        assert stops[-1] > stops[-2], (stops, out[-5000:])
        deadline = time.time() + 60
        while processes_mentioning(str(ckpt)) and time.time() < deadline:  # orphans of a dead torchrun exit too
            time.sleep(0.2)
        assert not processes_mentioning(str(ckpt)), "ranks left running"
    # 4. finish with the launcher
    if stops[-1] < last:
        ok(mz_launcher() + run_args + resume + ["--exit-after-iters", str(last)])
    want = {m["iteration"]: m for m in metrics(ref)}
    have = metrics(got)
    # every iteration once (a step after the last save is repeated after the resume: keep the last record)
    by_iter = {}
    for m in have:
        by_iter[m["iteration"]] = m
    assert sorted(by_iter) == list(range(1, max(by_iter) + 1)) and max(by_iter) >= last
    for it, m in by_iter.items():
        if it in want:
            assert m["loss"] == pytest.approx(want[it]["loss"], abs=1e-6), (it, m, want[it])
            assert m["grad_norm"] == pytest.approx(want[it]["grad_norm"], abs=1e-5), (it, m, want[it])
            assert m["lr"] == pytest.approx(want[it]["lr"], abs=1e-12)
    assert len({round(m["loss"], 6) for m in want.values()}) > 5  # the losses really moved


def test_save_dir_safety_and_damaged_checkpoints(tmp_path):
    """A used --save is refused (or --overwrite), a --load typo warned about; damaged checkpoints and a changed
    architecture are refused in one line; an interrupted save/prune leaves nothing loadable and is cleaned up."""
    from megatron_zero.checkpointing import run_dir as ckpt

    base = single() + LM + TINY + DISTOPT
    d = tmp_path / "run"
    ok(base + ["--train-iters", "4", "--save-interval", "2", "--save", str(d)])
    assert ckpt.complete_iterations(str(d)) == [2, 4]
    manifest = ckpt.read_manifest(str(d / "iter_0000004"))
    assert manifest["model_config"]["rope_theta"] and manifest["files"] and manifest["layout"]["dp"] == 1

    # a run from scratch into the used directory (a --load typo): refused, the old run intact
    rc, out, err = run(base + ["--train-iters", "3", "--save", str(d), "--load", str(tmp_path / "typo")])
    assert_one_line_error(rc, out, err, f"--save {d}", "already holds checkpoints of another run", "--overwrite")
    assert f"--load {tmp_path / 'typo'} does not exist" in err
    assert ckpt.complete_iterations(str(d)) == [2, 4]

    # damaged checkpoints, each refused before anything trains
    shutil.copytree(d, tmp_path / "good")
    distcp = sorted(f for f in os.listdir(d / "iter_0000004") if f.endswith(".distcp"))[0]
    with open(d / "iter_0000004" / distcp, "r+b") as f:
        f.seek(200)
        chunk = f.read(64)
        f.seek(200)
        f.write(bytes(b ^ 0xFF for b in chunk))
    resume = ["--train-iters", "6", "--save", str(d), "--load", str(d)]
    rc, out, err = run(base + resume)
    assert_one_line_error(rc, out, err, "damaged", distcp, "SHA-256")
    with open(d / "iter_0000004" / distcp, "r+b") as f:
        f.truncate(100)
    rc, out, err = run(base + resume)
    assert_one_line_error(rc, out, err, "damaged", distcp, "bytes, expected")
    shutil.rmtree(d)
    shutil.copytree(tmp_path / "good", d)
    os.remove(d / "iter_0000004" / "rng" / "rank_00000.pt")
    rc, out, err = run(base + resume)
    assert_one_line_error(rc, out, err, "rng/rank_00000.pt", "missing")
    shutil.rmtree(d)
    shutil.copytree(tmp_path / "good", d)
    from megatron_zero.models.llama_config import load_model_config

    cfg = load_model_config("tiny")
    cfg.rope_theta = cfg.rope_theta * 2
    cfg.save(str(tmp_path / "other_rope.json"))
    other = [a if a != "tiny" else str(tmp_path / "other_rope.json") for a in base]
    rc, out, err = run(other + resume)
    assert_one_line_error(rc, out, err, "architecture differs", "rope_theta")

    # a plain-optimizer run cannot move to the distributed optimizer: refused before loading, in one line
    plain = tmp_path / "plain"
    ok(single() + LM + TINY + ["--train-iters", "4", "--exit-after-iters", "1", "--save", str(plain)])
    rc, out, err = run(base + ["--train-iters", "4", "--save", str(plain), "--load", str(plain)])
    assert_one_line_error(rc, out, err, f"--load {plain}", "plain optimizer", "resume with")

    # leftovers of an interrupted save and an interrupted pruning (an iteration without COMPLETE) are ignored on
    # resume and removed; the resumed run's pruning keeps its newest checkpoints
    os.makedirs(d / "iter_0000005.tmp")
    os.makedirs(d / "iter_0000003")
    os.makedirs(d / "iter_0000001.deleting")
    out = ok(base + resume)
    assert "resumed from" in out and "at iteration 4" in out
    assert sorted(os.listdir(d)) == [".lock", "iter_0000004", "iter_0000006", "latest_checkpointed_iteration.txt",
                                     "model_config.json"]

    # --overwrite: the old run's checkpoints go, the new ones stay
    out = ok(base + ["--train-iters", "3", "--save-interval", "1", "--save", str(d), "--overwrite"])
    assert ckpt.complete_iterations(str(d)) == [2, 3]


def test_pruning_never_deletes_the_checkpoint_just_written(tmp_path):
    from megatron_zero.checkpointing import run_dir as ckpt

    for it in (15, 20, 5):
        os.makedirs(tmp_path / f"iter_{it:07d}")
        (tmp_path / f"iter_{it:07d}" / ckpt.COMPLETE).write_text(str(it))
    assert ckpt.prune(str(tmp_path), keep_last=2, just_written=5) == []
    assert ckpt.complete_iterations(str(tmp_path)) == [5, 15, 20]
    for it in (1, 2, 3):
        os.makedirs(tmp_path / f"iter_{it:07d}")
        (tmp_path / f"iter_{it:07d}" / ckpt.COMPLETE).write_text(str(it))
    assert ckpt.prune(str(tmp_path), keep_last=2, just_written=5) == [1, 2]
    assert ckpt.complete_iterations(str(tmp_path)) == [3, 5, 15, 20]


def test_resume_at_another_layout_continues_the_loss_curve(tmp_path):
    """Distributed optimizer: saved at TP=2 x DP=1 with --dist-ckpt-optim-fully-reshardable, resumed at TP=1 x DP=2;
    that run's checkpoint (the default DP-reshardable format) resumed at DP=1: the losses continue those of the
    uninterrupted TP=2 run. The DP-reshardable checkpoint at another TP is refused in one line naming the flag."""
    args = [*LM, *TINY, *DISTOPT, "--train-iters", "6"]
    # the uninterrupted TP=2 run is the reference and saves the TP=2 checkpoint of iteration 3 on the way
    ref = tmp_path / "ref.jsonl"
    run_dir = tmp_path / "tp2-run"
    ok(torchrun() + args + ["--tensor-model-parallel-size", "2", "--save-interval", "3", "--save", str(run_dir),
                            "--metrics-file", str(ref), "--dist-ckpt-optim-fully-reshardable"])
    want = {m["iteration"]: m["loss"] for m in metrics(ref)}
    assert sorted(want) == [1, 2, 3, 4, 5, 6]
    tp2 = tmp_path / "tp2"  # the run as it stood after iteration 3
    shutil.copytree(run_dir, tp2, ignore=shutil.ignore_patterns("iter_0000006", ".lock"))
    from megatron_zero.checkpointing.run_dir import latest_iteration

    assert latest_iteration(str(tp2)) == 3
    got = tmp_path / "dp2.jsonl"
    out = ok(torchrun() + args + ["--load", str(tp2), "--save", str(tmp_path / "dp2"), "--metrics-file", str(got),
                                  "--exit-after-iters", "5"])
    assert "saved at TP=2 PP=1 DP=1" in out and "resuming at TP=1 PP=1 DP=2" in out
    resumed = {m["iteration"]: m["loss"] for m in metrics(got)}
    assert sorted(resumed) == [4, 5]
    from megatron_zero.checkpointing.run_dir import iter_dir, read_manifest

    saved = read_manifest(iter_dir(str(tmp_path / "dp2"), 5))["layout"]
    assert saved["optimizer"] == "distributed:dp_reshardable" and saved["dp"] == 2
    rc, out, err = run(torchrun() + args + ["--tensor-model-parallel-size", "2", "--load", str(tmp_path / "dp2"),
                                            "--save", str(tmp_path / "tp2-again")])
    lines = [x for x in err.splitlines() if "pretrain_lm.py: error: --load" in x]  # (torchrun adds its own report)
    assert rc != 0 and lines, (out + err)[-3000:]
    assert "reshards only along DP" in lines[0] and "--dist-ckpt-optim-fully-reshardable" in lines[0], lines[0]
    got1 = tmp_path / "dp1.jsonl"
    out = ok(single() + args + ["--load", str(tmp_path / "dp2"), "--save", str(tmp_path / "dp1"),
                                "--metrics-file", str(got1)])
    assert "saved at TP=1 PP=1 DP=2" in out and "resuming at TP=1 PP=1 DP=1" in out
    resumed.update({m["iteration"]: m["loss"] for m in metrics(got1)})
    assert sorted(resumed) == [4, 5, 6]
    for it, loss in resumed.items():
        assert loss == pytest.approx(want[it], abs=2e-5), (it, loss, want[it])


def test_bad_images_drop_their_sample_replaced_by_the_next(tmp_path):
    """A missing/corrupt image drops its sample (its caption is not trained on) and the next sample takes its
    place; a micro-batch whose images all fail does not crash; the same iteration gives the same batch again
    (exact on resume); --strict-images raises."""
    import numpy as np
    import torch

    from megatron_zero.data.datasets import Sample
    from megatron_zero.data.images import ImageLoadError, load_image
    from megatron_zero.training.vlm_batches import VLMBatches

    from PIL import Image

    good = tmp_path / "good.png"
    Image.fromarray(np.full((8, 8, 3), 100, dtype=np.uint8)).save(good)
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)
    # 4 of 6 bad: among the 3 two-sample micro-batches of an epoch at least one has only bad images
    paths = {0: "missing.png", 1: "corrupt.png", 2: "missing.png", 3: "corrupt.png", 4: "good.png", 5: "good.png"}
    image_token = 99
    samples = [Sample(np.array([1, image_token, 10 + i, 2]), np.array([False, False, True, True]),
                      [str(tmp_path / paths[i])], id=str(i)) for i in range(6)]

    def make(strict=False):
        return VLMBatches(samples, image_token_id=image_token, num_image_embeddings=2, seq_length=8, pad_id=0,
                          global_batch_size=2, micro_batch_size=2, dp_rank=0, dp_size=1, seed=3,
                          load_image=lambda p: load_image(p, 16), strict_images=strict)

    batches = make()
    micro = [b for it in range(3) for b in batches.iteration(it)]
    caption_tokens = sorted(int(t) for b in micro for t in b["tokens"].flatten() if 10 <= int(t) < 16)
    # samples 0-3 are dropped (never trained on), each replaced by the next loadable one
    assert set(caption_tokens) <= {14, 15} and len(caption_tokens) == 6, caption_tokens
    assert batches.skipped_samples >= 4 and batches.total_skipped() == batches.skipped_samples
    assert all(b["images"].shape == (2, 3, 16, 16) for b in micro)
    again = [b for it in range(3) for b in make().iteration(it)]  # a resumed run rebuilds the same iterations
    for a, b in zip(micro, again):
        assert torch.equal(a["tokens"], b["tokens"]) and torch.equal(a["images"], b["images"])
    with pytest.raises(ImageLoadError, match="missing.png|corrupt.png"):
        list(make(strict=True).iteration(0))


def test_bad_inputs_give_one_line_errors(tmp_path):
    """The bad inputs of tools/reliability.py, through the real entry points: each exits non-zero with one
    ``error:`` line naming what was wrong, no traceback and no usage dump."""
    from megatron_zero_dev import reliability

    wanted = {"train-iters 0", "non-UTF-8 text data", "token ids beyond the vocabulary", "--save is a file",
              "generate --batch-size 0", "convert TP 0", "graft missing encoder",
              "vlm: --decoder-load is not a checkpoint"}
    cases = [c for c in reliability.bad_inputs(str(tmp_path)) if c[0] in wanted]
    assert len(cases) == len(wanted)
    procs = []
    for i in range(0, len(cases), 2):  # two at a time (CI has 2 cores)
        batch = [(name, subprocess.Popen(cmd, env=subprocess_env(), cwd=REPO, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, text=True)) for name, cmd in cases[i:i + 2]]
        procs += [(name, p, *p.communicate(timeout=300)) for name, p in batch]
    for name, p, out, err in procs:
        kind = reliability.classify(subprocess.CompletedProcess(p.args, p.returncode, out, err))
        assert kind == "clear", (name, p.returncode, err[-3000:])
        assert "usage:" not in err, (name, err)
        error_lines = [x for x in err.splitlines() if "error:" in x]
        assert len(error_lines) == 1, (name, err)
