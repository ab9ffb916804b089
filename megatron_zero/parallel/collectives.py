"""Small collectives on host values (flags, counters, a loss) that work under every backend.

NCCL only moves CUDA tensors: ``dist.all_reduce(torch.tensor([1]))`` fails there with "No backend type associated
with device type cpu" (found on the first GPU run, docs/gpu.md), while gloo takes CPU tensors. :func:`comm_tensor`
puts such values where the group's backend wants them; every reduction of host values goes through it."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist


def comm_device(group: Optional[dist.ProcessGroup] = None) -> torch.device:
    """The device ``group``'s backend communicates from: the current CUDA device under NCCL, else the CPU."""
    if dist.is_initialized() and "nccl" in str(dist.get_backend(group)).lower():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def comm_tensor(values: Sequence[float], dtype: torch.dtype = torch.float64,
                group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """``values`` as a 1-D tensor on :func:`comm_device` of ``group``."""
    return torch.tensor(list(values), dtype=dtype, device=comm_device(group))


def all_reduce_values(values: Sequence[float], op: str = "max", group: Optional[dist.ProcessGroup] = None,
                      dtype: torch.dtype = torch.float64) -> list[float]:
    """``values`` reduced (``"max"``, ``"min"`` or ``"sum"``) over ``group``; unchanged without a process group."""
    if not dist.is_initialized():
        return list(values)
    t = comm_tensor(values, dtype, group)
    dist.all_reduce(t, op={"max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN, "sum": dist.ReduceOp.SUM}[op],
                    group=group)
    return t.tolist()


def any_rank(flag: bool, group: Optional[dist.ProcessGroup] = None) -> bool:
    """Whether ``flag`` holds on any rank of ``group`` (collective)."""
    return bool(all_reduce_values([float(flag)], "max", group)[0])
