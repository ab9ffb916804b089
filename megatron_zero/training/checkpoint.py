"""Training checkpoints: model + optimizer + scheduler + RNG + data position, resumable exactly.

Layout (megatron-core ``torch_dist`` via ``dist_checkpointing``)::

    <save>/iter_0000100/           model and optimizer shards, common state (iteration, scheduler, data position)
    <save>/iter_0000100/rng/rank_00003.pt   per-rank RNG states (and optimizer_rank_*.pt: plain-optimizer state)
    <save>/iter_0000100/COMPLETE   written last: a directory without it is never loaded
    <save>/latest_checkpointed_iteration.txt

Writes go to ``iter_XXXXXXX.tmp`` and are renamed into place once every rank has finished, so an
interrupted save leaves nothing that looks complete; only the newest ``keep_last`` complete checkpoints are
kept.
"""
from __future__ import annotations

import os
import random
import shutil
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron_zero.training.optimizer import unwrap
from megatron_zero.errors import UserError

COMPLETE = "COMPLETE"
# Optimizer state is saved per rank, so resume with the parallel layout the run was saved with (the model weights
# themselves reshard freely). The distributed optimizer's state goes through dist_checkpointing per DP shard
# (megatron-core 0.16's model-space format relies on ShardedTensor.flattened_range, which its dist_checkpointing
# no longer accepts); a plain optimizer's state_dict is saved with torch.save (its model-space sharded form cannot
# describe frozen layers inside megatron's stacked per-layer tensors).
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}
LATEST = "latest_checkpointed_iteration.txt"


class CheckpointError(UserError, RuntimeError):
    """A checkpoint directory that cannot be resumed from."""


def iter_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def complete_iterations(root: str) -> list[int]:
    """Iterations with a complete checkpoint under ``root``, oldest first."""
    if not os.path.isdir(root):
        return []
    out = []
    for name in os.listdir(root):
        if name.startswith("iter_") and not name.endswith(".tmp") and name[5:].isdigit():
            if os.path.exists(os.path.join(root, name, COMPLETE)):
                out.append(int(name[5:]))
    return sorted(out)


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rng_state() -> dict[str, Any]:
    from megatron.core import tensor_parallel

    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _model_sharded_state_dict(model_chunks: list) -> dict[str, Any]:
    if len(model_chunks) == 1:
        return {"model": unwrap(model_chunks[0]).sharded_state_dict()}
    return {f"model{i}": unwrap(m).sharded_state_dict() for i, m in enumerate(model_chunks)}


def save_checkpoint(
    root: str,
    iteration: int,
    model_chunks: list,
    optimizer=None,
    scheduler=None,
    extra: Optional[dict[str, Any]] = None,
    keep_last: Optional[int] = None,
) -> str:
    """Save a complete, resumable checkpoint of ``iteration`` under ``root``; returns its directory."""
    from megatron.core import dist_checkpointing

    final = iter_dir(root, iteration)
    tmp = final + ".tmp"
    if _rank() == 0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)  # empty: megatron warns "Overwriting old incomplete / corrupted checkpoint" otherwise
    _barrier()
    state = _model_sharded_state_dict(model_chunks)
    if optimizer is not None and _is_distributed(optimizer):
        state["optimizer"] = optimizer.sharded_state_dict(state, metadata=OPTIMIZER_METADATA)
    state["common"] = {
        "iteration": iteration,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "extra": extra or {},
    }
    dist_checkpointing.save(state, tmp)
    os.makedirs(os.path.join(tmp, "rng"), exist_ok=True)
    torch.save(_rng_state(), os.path.join(tmp, "rng", f"rank_{_rank():05d}.pt"))
    if optimizer is not None and not _is_distributed(optimizer):
        torch.save(optimizer.state_dict(), os.path.join(tmp, "rng", f"optimizer_rank_{_rank():05d}.pt"))
    _barrier()
    if _rank() == 0:
        with open(os.path.join(tmp, COMPLETE), "w") as f:
            f.write(f"{iteration}\n")
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        latest_tmp = os.path.join(root, LATEST + ".tmp")
        with open(latest_tmp, "w") as f:
            f.write(str(iteration))
        os.replace(latest_tmp, os.path.join(root, LATEST))
        if keep_last:
            for old in complete_iterations(root)[:-keep_last]:
                shutil.rmtree(iter_dir(root, old), ignore_errors=True)
    _barrier()
    return final


def latest_iteration(root: str) -> Optional[int]:
    """The newest complete iteration under ``root`` (the ``latest`` file is only a hint)."""
    done = complete_iterations(root)
    return done[-1] if done else None


def _is_distributed(optimizer) -> bool:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return any(isinstance(o, DistributedOptimizer) for o in getattr(optimizer, "chained_optimizers", [optimizer]))


def _ensure_optimizer_state(optimizer) -> None:
    """Give a fresh (never stepped) Adam its state tensors so its sharded state dict can be built for loading.

    megatron-core's distributed optimizer reads ``state["step"]`` of every parameter when building the
    state dict; without apex/TE its own init function does not create ``step``.
    """
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = opt.optimizer
        for group in inner.param_groups:
            for p in group["params"]:
                st = inner.state[p]
                if not st:
                    st["exp_avg"] = torch.zeros_like(p.data)
                    st["exp_avg_sq"] = torch.zeros_like(p.data)
                st.setdefault("step", torch.tensor(0.0))


def _restore_step_counters(optimizer) -> None:
    """Make torch Adam's per-parameter ``step`` right after a distributed-optimizer load.

    Without apex/TE, megatron-core 0.16 keeps the true step count only in the param groups: the
    per-parameter ``step`` comes back from the template (0) and, where it is set, as one tensor shared by
    every parameter, which torch's Adam would then increment once per parameter per step. Both corrupt
    Adam's bias correction, so each parameter gets its own counter with the param group's value.
    """
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = opt.optimizer
        for group in inner.param_groups:
            for p in group["params"]:
                st = inner.state.get(p)
                if st and "step" in st:
                    value = group.get("step", st["step"])
                    st["step"] = torch.tensor(float(value), dtype=torch.float32)


def load_checkpoint(
    root: str,
    model_chunks: list,
    optimizer=None,
    scheduler=None,
    iteration: Optional[int] = None,
    load_rng: bool = True,
) -> tuple[int, dict[str, Any]]:
    """Restore the newest complete checkpoint (or ``iteration``); returns (iteration, extra state)."""
    from megatron.core import dist_checkpointing

    if iteration is None:
        iteration = latest_iteration(root)
        if iteration is None:
            raise CheckpointError(f"--load {root}: no complete checkpoint (iter_*/{COMPLETE}) found")
    path = iter_dir(root, iteration)
    if not os.path.exists(os.path.join(path, COMPLETE)):
        raise CheckpointError(f"--load {path}: checkpoint is incomplete (no {COMPLETE} marker); refusing to load")
    state = _model_sharded_state_dict(model_chunks)
    if optimizer is not None and _is_distributed(optimizer):
        _ensure_optimizer_state(optimizer)
        state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=True, metadata=OPTIMIZER_METADATA)
    state["common"] = {"iteration": 0, "scheduler": None, "extra": {}}
    loaded = dist_checkpointing.load(state, path)
    if len(model_chunks) == 1:
        unwrap(model_chunks[0]).load_state_dict(loaded["model"])
    else:
        for i, m in enumerate(model_chunks):
            unwrap(m).load_state_dict(loaded[f"model{i}"])
    if optimizer is not None and _is_distributed(optimizer):
        with torch.no_grad():  # fp32 main params are views of the (leaf) model params
            optimizer.load_state_dict(loaded["optimizer"])
        _restore_step_counters(optimizer)
    elif optimizer is not None:
        optim_file = os.path.join(path, "rng", f"optimizer_rank_{_rank():05d}.pt")
        if not os.path.exists(optim_file):
            raise CheckpointError(f"--load {path}: no optimizer state for rank {_rank()} ({optim_file}); "
                                  f"resume with the parallel layout and optimizer the run was saved with")
        optimizer.load_state_dict(torch.load(optim_file, weights_only=False))
    common = loaded["common"]
    if scheduler is not None and common["scheduler"] is not None:
        scheduler.load_state_dict(common["scheduler"])
    rng_file = os.path.join(path, "rng", f"rank_{_rank():05d}.pt")
    if load_rng and os.path.exists(rng_file):
        _set_rng_state(torch.load(rng_file, weights_only=False))
    return int(common["iteration"]), common["extra"]
