"""Two nodes on localhost: two ``python -m megatron_zero.launcher`` processes with ``--nnodes 2 --node-rank 0/1``
and the c10d rendezvous, 2 processes each (what ``examples/slurm/common.sh`` starts on every node with srun).

* TP=2 x DP=2 across the node boundary gives the single-process losses;
* a preemption signal that reaches only one node's launcher (SLURM signals the nodes one by one) makes every rank
  on both nodes save the same iteration, and both launchers exit 75;
* a node whose launcher is killed outright (kill -9) makes the other node exit within NODE_LOSS_TIMEOUT s.
"""
import json
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO, subprocess_env

pytestmark = pytest.mark.timeout(900)
NODE_LOSS_TIMEOUT = 120  # seconds for the surviving node to exit after its peer node is gone
TINY = ["-m", "megatron_zero.training.pretrain_lm", "--model", "tiny", "--mock-data", "--seq-length", "32",
        "--micro-batch-size", "2", "--global-batch-size", "8", "--lr", "3e-3", "--lr-warmup-fraction", "0.2",
        "--log-interval", "1"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_nodes(tmp_path, *args):
    """Node 0 and node 1 (Popen each), their output in tmp_path/node<i>.log."""
    port = _free_port()
    nodes = []
    for rank in (0, 1):
        cmd = [sys.executable, "-m", "megatron_zero.launcher", "--nnodes", "2", "--node-rank", str(rank),
               "--nproc-per-node", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
               "--rdzv-id", f"mz-{port}", *TINY, *args]
        with open(tmp_path / f"node{rank}.log", "w") as log:
            nodes.append(subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(), stdout=log, stderr=subprocess.STDOUT))
    return nodes


def wait_all(nodes, timeout):
    deadline = time.time() + timeout
    try:
        return [n.wait(timeout=max(1, deadline - time.time())) for n in nodes]
    finally:
        for n in nodes:
            if n.poll() is None:
                n.kill()


def logs(tmp_path) -> str:
    return "\n".join(f"--- node{r}:\n" + (tmp_path / f"node{r}.log").read_text()[-4000:] for r in (0, 1))


def metrics(path):
    try:
        return [json.loads(line) for line in open(path)]
    except FileNotFoundError:
        return []


def ranks_alive(tmp_path) -> list:
    out = subprocess.run(["pgrep", "-f", str(tmp_path)], check=False, capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def test_tp2_dp2_across_two_nodes_gives_the_single_process_losses(tmp_path):
    run = ["--train-iters", "6", "--tensor-model-parallel-size", "2", "--use-distributed-optimizer"]
    nodes = start_nodes(tmp_path, *run, "--metrics-file", str(tmp_path / "two_nodes.jsonl"))
    ref = subprocess.run([sys.executable, *TINY, "--train-iters", "6", "--metrics-file", str(tmp_path / "ref.jsonl")],
                         check=False, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr[-3000:]
    assert wait_all(nodes, 600) == [0, 0], logs(tmp_path)
    assert "TP=2 PP=1 DP=2" in logs(tmp_path)
    got, want = metrics(tmp_path / "two_nodes.jsonl"), metrics(tmp_path / "ref.jsonl")
    assert [m["iteration"] for m in got] == [m["iteration"] for m in want] == list(range(1, 7))
    for g, w in zip(got, want):
        assert g["loss"] == pytest.approx(w["loss"], abs=2e-5), (g, w)
        assert g["grad_norm"] == pytest.approx(w["grad_norm"], rel=1e-3), (g, w)


def test_signal_to_one_node_saves_every_rank_at_one_iteration(tmp_path):
    from megatron_zero.checkpointing.run_dir import latest_iteration

    ckpt, m = tmp_path / "ckpt", tmp_path / "m.jsonl"
    nodes = start_nodes(tmp_path, "--train-iters", "500", "--tensor-model-parallel-size", "2", "--save", str(ckpt),
                        "--metrics-file", str(m))
    deadline = time.time() + 600
    while len(metrics(m)) < 2:
        assert all(n.poll() is None for n in nodes) and time.time() < deadline, logs(tmp_path)
        time.sleep(0.1)
    nodes[1].send_signal(signal.SIGUSR1)  # only node 1's launcher
    assert wait_all(nodes, 300) == [75, 75], logs(tmp_path)
    out = logs(tmp_path)
    saved = latest_iteration(str(ckpt))
    assert saved is not None and 2 <= saved < 500
    stops = {int(x) for x in re.findall(r"stopped early at iteration (\d+)", out)}
    assert stops == {saved}, (stops, saved, out)
    assert out.count("stopped early after a preemption signal") == 2  # both launchers
    assert not ranks_alive(tmp_path)


def test_killed_node_makes_the_other_node_exit(tmp_path):
    m = tmp_path / "m.jsonl"
    nodes = start_nodes(tmp_path, "--train-iters", "500", "--tensor-model-parallel-size", "2",
                        "--metrics-file", str(m))
    deadline = time.time() + 600
    while len(metrics(m)) < 2:
        assert all(n.poll() is None for n in nodes) and time.time() < deadline, logs(tmp_path)
        time.sleep(0.1)
    nodes[1].kill()  # node 1's launcher, kill -9: its ranks are told by the kernel (PDEATHSIG) and go too
    t0 = time.time()
    rc = wait_all(nodes[:1], NODE_LOSS_TIMEOUT)[0]
    took = time.time() - t0
    print(f"\nnode 0 exited {rc} {took:.1f} s after node 1's launcher was killed")
    assert rc != 0 and took < NODE_LOSS_TIMEOUT, logs(tmp_path)
    deadline = time.time() + 30
    while ranks_alive(tmp_path) and time.time() < deadline:
        time.sleep(0.5)
    assert not ranks_alive(tmp_path), "ranks left running"
