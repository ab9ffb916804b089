"""Host-value collectives (flags, counters, the loss broadcast) pick the device their backend moves: the first GPU
run failed in ``build_optimizer`` because a CPU flag went to an NCCL all-reduce ("No backend type associated with
device type cpu"). gloo is real here; NCCL is modelled by the backend name the helper reads."""
import torch
import torch.distributed as dist

from megatron_zero.parallel import collectives
from tests.conftest import run_cli, subprocess_env


def test_nccl_groups_reduce_on_the_current_cuda_device(monkeypatch):
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert collectives.comm_device() == torch.device("cuda", 3)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "gloo")
    assert collectives.comm_device() == torch.device("cpu")


def test_without_a_process_group_values_pass_through(monkeypatch):
    monkeypatch.setattr(dist, "is_initialized", lambda: False)  # earlier tests may leave a world of one behind
    assert collectives.all_reduce_values([1.0, 5.0], "sum") == [1.0, 5.0]
    assert collectives.any_rank(True) and not collectives.any_rank(False)


WORKER = r"""
import os, torch.distributed as dist
from megatron_zero.parallel import collectives
dist.init_process_group("gloo")
r = dist.get_rank()
line = (f"SUM {collectives.all_reduce_values([r, 1.0], 'sum')} MAX {collectives.all_reduce_values([r], 'max')} "
        f"MIN {collectives.all_reduce_values([r], 'min')} ANY {collectives.any_rank(r == 1)} {collectives.any_rank(False)}")
open(os.environ["OUT_PREFIX"] + str(r), "w").write(line)
dist.destroy_process_group()
"""


def test_reductions_over_two_gloo_ranks(tmp_path):
    script = tmp_path / "collectives_worker.py"
    script.write_text(WORKER)
    p = run_cli([str(script)], nproc=2, timeout=180, env=subprocess_env(OUT_PREFIX=str(tmp_path / "rank")))
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    for rank in (0, 1):
        assert (tmp_path / f"rank{rank}").read_text() == "SUM [1.0, 2.0] MAX [1.0] MIN [0.0] ANY True False"
