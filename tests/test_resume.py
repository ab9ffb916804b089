"""Overlapped DP communication matches the plain schedule. (Stopping by a signal and resuming exactly, at the
same or another layout, is tested in tests/test_reliability.py.)"""
import json

from tests.conftest import run_cli

def read_metrics(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_overlapped_grad_reduce_and_param_gather_match(tmp_path):
    """DP=2 with the distributed optimizer: overlapping gradient reduction and parameter all-gather with compute
    gives exactly the losses and grad norms of the plain schedule."""
    base = ["--model", "tiny", "--mock-data", "--seq-length", "32", "--micro-batch-size", "2",
            "--global-batch-size", "8", "--train-iters", "3", "--use-distributed-optimizer"]
    runs = {}
    tb = tmp_path / "tb"
    for name, extra in (("plain", ["--tensorboard-dir", str(tb)]),
                        ("overlap", ["--overlap-grad-reduce", "--overlap-param-gather"])):
        p = run_cli(["-m", "megatron_zero.training.pretrain_lm", *base, *extra, "--metrics-file", tmp_path / name],
                    nproc=2, timeout=300)
        assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
        runs[name] = read_metrics(tmp_path / name)
    assert len(runs["plain"]) == 3
    assert any(f.name.startswith("events.out.tfevents") for f in tb.iterdir())  # TensorBoard scalars written
    for a, b in zip(runs["plain"], runs["overlap"]):
        assert a["loss"] == b["loss"] and abs(a["grad_norm"] - b["grad_norm"]) < 1e-9
