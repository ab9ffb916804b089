"""Process groups from Megatron-style flags, under ``torchrun`` (env:// rendezvous) or a single process.

Data parallelism is what remains of the world: ``DP = world_size / (TP * PP)``.
"""
from __future__ import annotations

import datetime
import os
import socket
from typing import Optional

import torch
import torch.distributed as dist

from megatron_zero import platform
from megatron_zero.errors import UserError
from megatron_zero.platform import mcore_fixes


class ParallelConfigError(UserError, ValueError):
    """A parallel layout that cannot work with this world size or model."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_process_group(timeout_minutes: int = 10) -> None:
    """Initialise ``torch.distributed`` from torchrun's environment, or as a world of one without it."""
    if dist.is_initialized():
        return
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"] = "0", "1", "0"
    if platform.HAVE_CUDA:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(
        backend=platform.distributed_backend(),
        init_method="env://",
        timeout=datetime.timedelta(minutes=timeout_minutes),
    )


def check_world(world_size: int, tp: int, pp: int, cp: int = 1) -> int:
    """Return the data-parallel size, or explain why the layout does not fit the world."""
    for flag, v in (("--tensor-model-parallel-size", tp), ("--pipeline-model-parallel-size", pp),
                    ("--context-parallel-size", cp)):
        if v < 1:
            raise ParallelConfigError(f"{flag} must be >= 1, got {v}")
    mp = tp * pp * cp
    if world_size % mp:
        raise ParallelConfigError(
            f"world size {world_size} is not divisible by tensor ({tp}) x pipeline ({pp}) x context ({cp}) "
            f"parallel = {mp}; launch a multiple of {mp} processes"
        )
    return world_size // mp


def initialize_parallel(
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    virtual_pipeline_model_parallel_size: Optional[int] = None,
    seed: int = 1234,
) -> int:
    """Set up torch.distributed and megatron-core's parallel state; returns the data-parallel size."""
    mcore_fixes.setup_megatron_core()
    init_process_group()
    from megatron.core import parallel_state, tensor_parallel

    world = dist.get_world_size()
    dp = check_world(world, tensor_model_parallel_size, pipeline_model_parallel_size)
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=virtual_pipeline_model_parallel_size,
    )
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed)
    return dp


def initialize_from_config(parallel, seed: int) -> int:
    """:func:`initialize_parallel` from a run's :class:`megatron_zero.config.ParallelConfig`."""
    return initialize_parallel(parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size,
                               parallel.virtual_pipeline_model_parallel_size, seed=seed)


def destroy_parallel() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def print_rank0(*args, **kwargs) -> None:
    if is_rank0():
        print(*args, **kwargs, flush=True)
