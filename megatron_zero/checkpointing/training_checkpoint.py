"""Training checkpoints: model + optimizer + scheduler + RNG + data position, resumable exactly.

Written with megatron-core ``dist_checkpointing`` (``torch_dist``) into a run directory
(:mod:`megatron_zero.checkpointing.run_dir`: layout, lock, ``COMPLETE`` manifest, latest marker, pruning)::

    <save>/iter_0000100/           model and optimizer shards, common state (iteration, scheduler, data position)
    <save>/iter_0000100/rng/rank_00003.pt   per-rank RNG states (and optimizer_rank_*.pt: plain-optimizer state)
    <save>/iter_0000100/COMPLETE   written last, once every file is durable: a directory without it is never loaded

Writes go to ``iter_XXXXXXX.tmp``, which is renamed into place once every rank has written, hashed and fsynced
its files. With ``async_save`` the shards are written by a background process (megatron-core's asynchronous
``dist_checkpointing``: a forked writer per rank, which then hashes and fsyncs what it wrote) while training
continues; :func:`finalize_async_save` (called by the loop after every step, collectively) publishes the
checkpoint once the write is done on every rank, and :func:`wait_for_async_save` blocks until then (before the
next save, on preemption, at the end of training). A kill at any moment leaves no loadable incomplete checkpoint.

On load the files are verified against the manifest, the architecture must match the run's, and every piece of
state (per-rank RNG, optimizer) must be present; the parallel layout may change where the optimizer state can
follow (:func:`check_layout`).
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import random
import signal
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron_zero import platform
from megatron_zero.checkpointing import run_dir
from megatron_zero.parallel.collectives import all_reduce_values, any_rank
from megatron_zero.checkpointing.run_dir import (
    COMPLETE, CheckpointError, iter_dir, latest_iteration, rank as _rank, read_manifest, verify_files, warn as _warn,
)

# The distributed optimizer's state is saved, as Megatron-LM does by default, in megatron-core's ``dp_reshardable``
# format: each rank writes its own slice of the optimizer's flat buffers as they are (no copy, no communication), so
# a save costs the training process little; such a checkpoint resumes at the same TP/PP and any DP.
# ``--dist-ckpt-optim-fully-reshardable`` (Megatron-LM's flag) saves the ``fully_reshardable`` format instead
# (model-space tensors, gathered over DP on save, sliced per rank on load: resumes at any TP/PP/DP; the CPU/torch-Adam
# failure of its loader is fixed in ``platform.mcore_fixes``) at the price of a full copy + DP gather per save. A
# TP/PP change from a ``dp_reshardable`` checkpoint is refused before loading, in one line naming the flag.
# When some rank has nothing to train (a frozen pipeline stage, normal in stages 1-2) or a stacked per-layer key is
# partly frozen (the encoder's lower layers in stages 2-3), megatron-core's fully reshardable form is invalid (its
# per-layer model-space tensors have holes, "Invalid access pattern"): ``dp_reshardable`` is used even with the flag.
# A plain optimizer's state_dict is saved per rank with torch.save (its model-space sharded form cannot describe
# frozen layers inside megatron's stacked per-layer tensors), so it resumes only at the layout it was saved with;
# anything else is refused before loading.
FULLY_RESHARDABLE_FLAG = "--dist-ckpt-optim-fully-reshardable"


def optimizer_sharding_type(optimizer, fully_reshardable: bool = False, model_chunks: Optional[list] = None) -> str:
    """``dp_reshardable`` (the default), or ``fully_reshardable`` when asked for and that format can describe the
    state: every rank holds a trainable parameter and no stacked key is partly frozen. Collective the first time,
    which must pass ``model_chunks`` (:func:`decide_optimizer_format`); the answer is kept on the optimizer, so save
    and load decide the same way."""
    possible = getattr(optimizer, "_megatron_zero_full_format_possible", None)
    if possible is None:
        held = any(len(g["params"]) for g in optimizer.param_groups)
        partly = bool(model_chunks) and bool(partly_frozen_keys(model_chunks))
        possible = all_reduce_values([1.0 if held and not partly else 0.0], "min")[0] > 0
        optimizer._megatron_zero_full_format_possible = possible
    return "fully_reshardable" if fully_reshardable and possible else "dp_reshardable"


def decide_optimizer_format(optimizer, model_chunks: list) -> None:
    """Decide a distributed optimizer's checkpoint format from the model, once, before any load or save
    (collective)."""
    if _is_distributed(optimizer):
        optimizer_sharding_type(optimizer, model_chunks=model_chunks)


def partly_frozen_keys(model_chunks: list) -> list[str]:
    """Sharded keys of which some pieces train and others are frozen (a stacked per-layer key of which only the
    top layers train: the encoder in stages 2-3, the translator layer in stage 1), over all ranks. megatron-core's
    fully reshardable optimizer format describes each such key as one model-space tensor, which would have holes
    where the layers are frozen ("Invalid access pattern" on save). Collective."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    status = {}
    for m in model_chunks:
        for p in m.parameters():
            status[(p.data_ptr(), p.numel())] = p.requires_grad
    seen: dict[str, set] = {}

    def walk(d: dict) -> None:
        for v in d.values():
            if isinstance(v, dict):
                walk(v)
            elif isinstance(v, (ShardedTensor, ShardedTensorFactory)):
                s = status.get((v.data.data_ptr(), v.data.numel()))
                if s is not None:
                    seen.setdefault(v.key, set()).add(s)

    walk(_model_sharded_state_dict(model_chunks))
    merged: dict[str, set] = {}
    for part in run_dir.gather(seen):
        for k, s in part.items():
            merged.setdefault(k, set()).update(s)
    return sorted(k for k, s in merged.items() if len(s) > 1)


def _arch_differences(saved: dict[str, Any], current: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(saved) | set(current)):
        if k == "name":
            continue
        a, b = saved.get(k), current.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _arch_differences(a, b, f"{prefix}{k}.")
        elif a != b and (a is not None or b is not None):
            out.append(f"{prefix}{k}: checkpoint {a!r}, this run {b!r}")
    return out


def check_architecture(path: str, saved: Optional[dict[str, Any]], current: Optional[dict[str, Any]]) -> None:
    if saved is None or current is None:
        return
    diffs = _arch_differences(json.loads(json.dumps(saved)), json.loads(json.dumps(current)))
    if diffs:
        raise CheckpointError(f"--load {path}: the checkpoint's architecture differs from this run's --model "
                              f"({'; '.join(diffs[:6])}{'; ...' if len(diffs) > 6 else ''}); resume with the "
                              f"model the run was started with")


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


def _unwrap(model):
    while hasattr(model, "module"):
        model = model.module
    return model


def _model_sharded_state_dict(model_chunks: list) -> dict[str, Any]:
    if len(model_chunks) == 1:
        return {"model": _unwrap(model_chunks[0]).sharded_state_dict()}
    return {f"model{i}": _unwrap(m).sharded_state_dict() for i, m in enumerate(model_chunks)}


# ---- trainable-only checkpoints: the frozen base is referenced by its identity, not saved ---------------------
def has_frozen_parameters(model_chunks: list) -> bool:
    """Whether any rank holds a frozen parameter (collective)."""
    return any_rank(any(not p.requires_grad for m in model_chunks for p in m.parameters()))


def _first_shard(v):
    """``v`` itself, or the first sharded tensor a ``ShardedTensorFactory`` (SwiGLU's fused fc1) builds."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    while not isinstance(v, ShardedTensor):
        v = v.build_fn(v.key, v.data, v.replica_id, v.flattened_range)
        while isinstance(v, (dict, list, tuple)):
            v = next(iter(v.values())) if isinstance(v, dict) else v[0]
    return v


def _tensor_id(v) -> str:
    """A layout-independent name of a sharded tensor: its key and global layer (the prepended axes' offsets)."""
    v = _first_shard(v)
    return f"{v.key}@{','.join(map(str, v.global_offset[:v.prepend_axis_num]))}"


def split_frozen(state: dict, is_frozen, names: Optional[set] = None) -> dict[str, Any]:
    """Remove the entries ``is_frozen(sharded_tensor)`` accepts from the model part of ``state`` (in place);
    returns them as ``{"<sharded key>@<global offset>": tensor}`` (this rank's shards); their state-dict names
    go into ``names``."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    removed: dict[str, Any] = {}

    def walk(d: dict) -> None:
        for k in list(d):
            v = d[k]
            if isinstance(v, dict):
                walk(v)
            elif isinstance(v, (ShardedTensor, ShardedTensorFactory)) and is_frozen(v):
                removed[f"{v.key}@{','.join(map(str, _first_shard(v).global_offset))}"] = v
                if names is not None:
                    names.add(k)
                del d[k]

    for name in list(state):
        if name.startswith("model"):
            walk(state[name])
    return removed


def frozen_in(model_chunks: list, state: dict):
    """``is_frozen`` for :func:`split_frozen`: the sharded tensor is a parameter with ``requires_grad=False`` and
    no rank trains another piece of its key (megatron-core saves a stacked key, e.g. the encoder's layers of which
    only the top ones train, whole or not at all). Collective."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    frozen = {(p.data_ptr(), p.numel()) for m in model_chunks for p in m.parameters() if not p.requires_grad}
    trained: set = set()

    def walk(d: dict) -> None:
        for v in d.values():
            if isinstance(v, dict):
                walk(v)
            elif isinstance(v, (ShardedTensor, ShardedTensorFactory)) and (v.data.data_ptr(), v.data.numel()) \
                    not in frozen:
                trained.add(v.key)

    for name in state:
        if name.startswith("model"):
            walk(state[name])
    trained = set().union(*run_dir.gather(trained))
    return lambda v: (v.data.data_ptr(), v.data.numel()) in frozen and v.key not in trained


def recorded_frozen(manifest: dict[str, Any]):
    """``is_frozen`` for :func:`split_frozen`: the tensor was left out of a trainable-only checkpoint."""
    ids = set((manifest.get("frozen_base") or {}).get("frozen", ()))
    return lambda v: _tensor_id(v) in ids


def architecture_hash(model_config: Optional[dict[str, Any]]) -> Optional[str]:
    if model_config is None:
        return None
    return hashlib.sha256(json.dumps(model_config, sort_keys=True).encode()).hexdigest()


def frozen_identity(frozen: dict[str, Any]) -> dict[str, Any]:
    """The frozen tensors' layout-independent names and fingerprints (sampled rows, as grafting fingerprints
    embeddings), gathered from all ranks."""
    from megatron_zero.checkpointing.vlm_checkpoint import embedding_fingerprint

    def fingerprint(t):
        return embedding_fingerprint(t.detach().reshape(t.shape[0], -1) if t.dim() > 1 else t.detach().reshape(-1, 1))

    mine = ({k: fingerprint(v.data) for k, v in frozen.items()}, sorted({_tensor_id(v) for v in frozen.values()}))
    tensors: dict[str, str] = {}
    ids: set = set()
    for part, names in run_dir.gather(mine):
        tensors.update(part)
        ids.update(names)
    return {"frozen": sorted(ids), "tensors": tensors}


def describe_base(base: Optional[dict[str, str]]) -> str:
    return " + ".join(f"{flag} {p}" for flag, p in (base or {}).items()) or "the base it was trained on"


def check_frozen_base(path: str, recorded: dict[str, Any], frozen: dict[str, Any], flag: str = "--load") -> None:
    """Refuse (one line naming the base) a run whose frozen tensors are not the base the checkpoint references
    (``flag``: how the checkpoint was given; ``reading``: read elsewhere, its base loaded by the reader)."""
    base = describe_base(recorded.get("path"))
    resume = flag == "--load"
    for base_flag, p in (recorded.get("path") or {}).items():
        if resume and not os.path.exists(p):
            raise CheckpointError(f"--load {path}: a trainable-only checkpoint whose frozen base ({base_flag} {p}) "
                                  f"no longer exists; restore it there (checkpoints with --save-frozen hold it)")
    current = frozen_identity(frozen)["tensors"]
    common = sorted(set(current) & set(recorded.get("tensors", {})))
    differ = [k for k in common if current[k] != recorded["tensors"][k]]
    where = f"--load {path}" if resume else path
    if current and not common:
        _warn(f"{where}: the frozen base's fingerprints were taken at another parallel layout: not verified")
    if differ:
        what = f"{len(differ)} of {len(common)} frozen tensors differ, e.g. {differ[0].split('@')[0]}"
        if not resume:
            raise CheckpointError(f"{path}: a trainable-only checkpoint of the frozen base {base}, which has changed "
                                  f"since ({what}); restore that base (checkpoints with --save-frozen hold it)")
        raise CheckpointError(f"--load {path}: a trainable-only checkpoint of the frozen base {base}, but this run's "
                              f"frozen weights are not that base ({what}); start from {base}")


_async_queue = None  # megatron-core's AsyncCallsQueue, created by the first asynchronous save


def _write_then_hash(write_fn, tmp: str, me: int, world: int, rank_pid: int, *args, **kwargs) -> None:
    """The background writer of an asynchronous save: megatron-core's write, then hash + fsync of this rank's
    shards (so the main process only hashes the small files when it publishes). It dies with its rank (also when
    the rank died between the fork and this request)."""
    platform.die_with_parent(signal.SIGKILL, rank_pid)
    write_fn(*args, **kwargs)
    run_dir.hash_own_shards(tmp, me, world)


def _publish(root: str, iteration: int, tmp: str, manifest: dict[str, Any], keep_last: Optional[int]) -> None:
    """Collective: every rank hashes + fsyncs what it wrote, then rank 0 publishes the checkpoint."""
    files = run_dir.manifest_files(tmp)
    if _rank() == 0:
        run_dir.publish(root, iteration, tmp, {"files": files, **manifest}, keep_last)
    run_dir.barrier()


def _save_rank_state(tmp: str, optimizer) -> None:
    """This rank's RNG state (and a plain optimizer's state), written synchronously after the shards' plan."""
    os.makedirs(os.path.join(tmp, "rng"), exist_ok=True)
    torch.save(_rng_state(), os.path.join(tmp, "rng", f"rank_{_rank():05d}.pt"))
    if optimizer is not None and not _is_distributed(optimizer):
        torch.save(optimizer.state_dict(), os.path.join(tmp, "rng", f"optimizer_rank_{_rank():05d}.pt"))


def save_checkpoint(
    root: str,
    iteration: int,
    model_chunks: list,
    optimizer=None,
    scheduler=None,
    extra: Optional[dict[str, Any]] = None,
    keep_last: Optional[int] = None,
    meta: Optional[dict[str, Any]] = None,
    async_save: bool = False,
    trainable_only: bool = False,
    frozen_base: Optional[dict[str, str]] = None,
    fully_reshardable: bool = False,
) -> str:
    """Save a complete, resumable checkpoint of ``iteration`` under ``root``; returns its directory.

    ``meta`` (e.g. ``{"model_config": ...}``) is recorded in the ``COMPLETE`` manifest. With ``async_save`` the
    shards are written in the background and the checkpoint is published later by :func:`finalize_async_save`
    (a save still in flight is waited for first: one at a time). With ``trainable_only`` frozen parameters are
    left out and referenced instead (``frozen_base``: the flags and paths they were loaded from; recorded with
    their fingerprints and the architecture hash, verified on load). ``fully_reshardable``: the distributed
    optimizer's state in the format that resumes at any TP/PP/DP (``--dist-ckpt-optim-fully-reshardable``; default:
    ``dp_reshardable``, any DP at the same TP/PP, much cheaper to save).
    """
    from megatron_zero.checkpointing.mcore_checkpoint import dist_save

    wait_for_async_save()
    tmp = run_dir.begin(root, iteration)
    state = _model_sharded_state_dict(model_chunks)
    if optimizer is not None and _is_distributed(optimizer):
        state["optimizer"] = optimizer.sharded_state_dict(
            state, metadata={"distrib_optim_sharding_type": optimizer_sharding_type(optimizer, fully_reshardable)})
    manifest = {"layout": current_layout(optimizer, fully_reshardable), **(meta or {})}
    if trainable_only:
        manifest["frozen_base"] = {"path": {k: os.path.abspath(v) for k, v in (frozen_base or {}).items()},
                                   "architecture_hash": architecture_hash(manifest.get("model_config")),
                                   **frozen_identity(split_frozen(state, frozen_in(model_chunks, state)))}
    state["common"] = {
        "iteration": iteration,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "extra": extra or {},
    }
    if not async_save:
        dist_save(state, tmp)
        _save_rank_state(tmp, optimizer)
        run_dir.barrier()
        _publish(root, iteration, tmp, manifest, keep_last)
        return iter_dir(root, iteration)
    global _async_queue
    from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

    request = dist_save(state, tmp, async_sharded_save=True)
    _save_rank_state(tmp, optimizer)
    world = dist.get_world_size() if dist.is_initialized() else 1
    request = request._replace(async_fn=functools.partial(_write_then_hash, request.async_fn, tmp, _rank(), world,
                                                                 os.getpid()))
    request.add_finalize_fn(functools.partial(_publish, root, iteration, tmp, manifest, keep_last))
    if _async_queue is None:
        _async_queue = AsyncCallsQueue()
    _async_queue.schedule_async_request(request)
    return iter_dir(root, iteration)


def async_save_in_flight() -> bool:
    return _async_queue is not None and _async_queue.get_num_unfinalized_calls() > 0


def finalize_async_save(blocking: bool = False) -> bool:
    """Publish an asynchronous save whose write has finished on every rank (collective: call it on every rank at
    the same point); ``blocking`` waits for it. Returns whether a checkpoint was published."""
    if not async_save_in_flight():
        return False
    return bool(_async_queue.maybe_finalize_async_calls(blocking=blocking))


def wait_for_async_save() -> bool:
    """Block until an asynchronous save in flight is durable and published (collective)."""
    return finalize_async_save(blocking=True)


def _is_distributed(optimizer) -> bool:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return any(isinstance(o, DistributedOptimizer) for o in getattr(optimizer, "chained_optimizers", [optimizer]))


def ensure_optimizer_state(optimizer) -> None:
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


def current_layout(optimizer=None, fully_reshardable: bool = False) -> dict[str, Any]:
    """This run's parallel layout and optimizer format, as recorded in (and compared with) the manifest."""
    from megatron.core import parallel_state as ps

    layout = {"world_size": dist.get_world_size() if dist.is_initialized() else 1}
    if ps.model_parallel_is_initialized():
        layout.update(tp=ps.get_tensor_model_parallel_world_size(), pp=ps.get_pipeline_model_parallel_world_size(),
                      vpp=ps.get_virtual_pipeline_model_parallel_world_size(),
                      dp=ps.get_data_parallel_world_size())
    if optimizer is not None:
        layout["optimizer"] = ("distributed:" + optimizer_sharding_type(optimizer, fully_reshardable)
                               if _is_distributed(optimizer) else "per_rank")
    return layout


def _describe_layout(layout: dict[str, Any]) -> str:
    parts = [f"{k.upper()}={layout[k]}" for k in ("tp", "pp", "dp") if k in layout]
    if layout.get("vpp"):
        parts.append(f"VPP={layout['vpp']}")
    opt = layout.get("optimizer")
    if opt:
        parts.append("plain optimizer" if opt == "per_rank" else f"distributed optimizer ({opt.split(':', 1)[1]})")
    return " ".join(parts)


def _optimizer_kind(layout: dict[str, Any]) -> Optional[str]:
    opt = layout.get("optimizer")
    return None if opt is None else opt.split(":", 1)[0]


def check_layout(path: str, saved: Optional[dict[str, Any]], current: dict[str, Any]) -> bool:
    """Whether the layout changed; raises (before anything is loaded) when the optimizer state cannot follow.

    The format a distributed optimizer's state is read in is the saved one (the current run's own save format does
    not matter): ``fully_reshardable`` follows any TP/PP/DP change, ``dp_reshardable`` a DP change only."""
    if not saved:
        return False
    changed = any(saved.get(k) != current.get(k) for k in ("tp", "pp", "vpp", "dp") if k in current)
    s_kind, c_kind = _optimizer_kind(saved), _optimizer_kind(current)
    if c_kind is not None and s_kind != c_kind:
        changed = True
    if not changed:
        return False
    if c_kind is None or (s_kind == c_kind == "distributed" and saved.get("optimizer") ==
                          "distributed:fully_reshardable"):
        return True
    if s_kind == c_kind == "distributed":
        if all(saved.get(k) == current.get(k) for k in ("tp", "pp", "vpp")):
            return True  # dp_reshardable: along DP only
        raise CheckpointError(f"--load {path}: saved at {_describe_layout(saved)} in a format that reshards only "
                              f"along DP; this run is {_describe_layout(current)}: resume with the same TP/PP, or "
                              f"save with {FULLY_RESHARDABLE_FLAG} (resumes at any TP/PP/DP)")
    if s_kind == "per_rank":
        why = "a plain optimizer's state is saved per rank and resumes only at the layout it was saved with"
    else:
        why = "a distributed optimizer's state cannot be loaded into a plain optimizer"
    raise CheckpointError(f"--load {path}: saved at {_describe_layout(saved)}, this run is "
                          f"{_describe_layout(current)}: {why}; resume with {_describe_layout(saved)} "
                          f"(--use-distributed-optimizer checkpoints saved with {FULLY_RESHARDABLE_FLAG} reshard to "
                          f"any TP/PP/DP)")


def load_checkpoint(
    root: str,
    model_chunks: list,
    optimizer=None,
    scheduler=None,
    iteration: Optional[int] = None,
    load_rng: bool = True,
    model_config: Optional[dict[str, Any]] = None,
    verify: str = "hash",
) -> tuple[int, dict[str, Any]]:
    """Restore the newest complete checkpoint (or ``iteration``); returns (iteration, extra state).

    Before anything is loaded: the files are checked against the manifest (``verify``: ``hash`` or ``size``),
    ``model_config`` (this run's architecture) against the saved one, and the parallel layout: a distributed-
    optimizer checkpoint resumes at any DP (``dp_reshardable``, the default) or any TP/PP/DP (saved with
    ``--dist-ckpt-optim-fully-reshardable``), a plain-optimizer one only at its own layout (refused in one line
    otherwise).
    """
    from megatron.core import dist_checkpointing

    if iteration is None:
        iteration = latest_iteration(root)
        if iteration is None:
            raise CheckpointError(f"--load {root}: no complete checkpoint (iter_*/{COMPLETE}) found")
    path = iter_dir(root, iteration)
    if not os.path.exists(os.path.join(path, COMPLETE)):
        raise CheckpointError(f"--load {path}: checkpoint is incomplete (no {COMPLETE} marker); refusing to load")
    manifest = read_manifest(path)
    saved_config = manifest.get("model_config")
    legacy_config = os.path.join(root, "model_config.json")
    if saved_config is None and os.path.isfile(legacy_config):
        with open(legacy_config) as f:
            saved_config = json.load(f)
    check_architecture(path, saved_config, model_config)
    layout = current_layout(optimizer)
    relayout = check_layout(path, manifest.get("layout"), layout)
    verify_files(path, manifest, verify)
    if relayout:
        _warn(f"--load {path}: saved at {_describe_layout(manifest['layout'])}, resuming at "
              f"{_describe_layout(layout)} (weights and optimizer state resharded; per-rank RNG states not restored)")
    rng_file = os.path.join(path, "rng", f"rank_{_rank():05d}.pt")
    if load_rng and not relayout and not os.path.exists(rng_file):
        raise CheckpointError(f"--load {path}: rng/{os.path.basename(rng_file)} is missing (the RNG state of "
                              f"rank {_rank()}); the checkpoint is incomplete")
    state = _model_sharded_state_dict(model_chunks)
    if optimizer is not None and _is_distributed(optimizer):
        ensure_optimizer_state(optimizer)
        saved_opt = (manifest.get("layout") or {}).get("optimizer") or ""
        # checkpoints written before the manifest recorded the layout used the DP-only reshardable format
        sharding = saved_opt.split(":", 1)[1] if saved_opt.startswith("distributed:") else (
            "fully_reshardable" if manifest.get("layout") else "dp_reshardable")
        state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=True,
                                                          metadata={"distrib_optim_sharding_type": sharding})
    frozen_names: set = set()
    if manifest.get("frozen_base"):  # trainable-only: the frozen part is this run's (from the base), checked
        frozen = split_frozen(state, frozen_in(model_chunks, state), frozen_names)
        check_frozen_base(path, manifest["frozen_base"], frozen)
    state["common"] = {"iteration": 0, "scheduler": None, "extra": {}}
    try:
        loaded = dist_checkpointing.load(state, path)
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - a checkpoint that passed verification but does not fit the model
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(f"--load {path}: cannot be loaded into this model ({type(e).__name__}: "
                              f"{first[:300]})") from e
    for i, m in enumerate(model_chunks):
        part = loaded["model"] if len(model_chunks) == 1 else loaded[f"model{i}"]
        if not frozen_names:
            _unwrap(m).load_state_dict(part)
            continue
        missing, unexpected = _unwrap(m).load_state_dict(part, strict=False)
        missing = [k for k in missing if k not in frozen_names and not k.endswith("_extra_state")]
        if missing or unexpected:
            raise CheckpointError(f"--load {path}: does not fit the model (missing {missing[:3]}, unexpected "
                                  f"{unexpected[:3]})")
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
    if load_rng and not relayout:
        _set_rng_state(torch.load(rng_file, weights_only=False))
    return int(common["iteration"]), common["extra"]
