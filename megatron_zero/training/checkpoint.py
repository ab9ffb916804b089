"""Training checkpoints: model + optimizer + scheduler + RNG + data position, resumable exactly.

Layout (megatron-core ``torch_dist`` via ``dist_checkpointing``)::

    <save>/iter_0000100/           model and optimizer shards, common state (iteration, scheduler, data position)
    <save>/iter_0000100/rng/rank_00003.pt   per-rank RNG states (and optimizer_rank_*.pt: plain-optimizer state)
    <save>/iter_0000100/COMPLETE   written last: a directory without it is never loaded
    <save>/latest_checkpointed_iteration.txt

Writes go to ``iter_XXXXXXX.tmp`` and are renamed into place once every rank has finished, so an
interrupted save leaves nothing that looks complete; only the newest ``keep_last`` complete checkpoints are
kept, and never the one just written is pruned (pruning renames to ``*.deleting`` first, so an interrupted
pruning leaves nothing loadable behind; leftovers are removed by the next run). Every file is fsynced (by the
rank that wrote it) before ``COMPLETE`` is written and the directory renamed, so the atomicity also covers
the loss of a node.

``COMPLETE`` is a JSON manifest: iteration, the size and SHA-256 of every file (hashed by the ranks that
wrote them, in parallel), the architecture (``model_config``) and the parallel layout. On load the files are
verified against it (``--checkpoint-verify size`` checks sizes only, for huge checkpoints, and says so), the
architecture must match the run's, and every piece of state (per-rank RNG, optimizer) must be present.

:func:`prepare_save_dir` (called before anything is built) takes a lock on ``--save`` so two runs cannot write
one directory, refuses to start from scratch into a directory holding another run's checkpoints (unless
``--overwrite``, or resuming from it), and warns when ``--load`` does not exist.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import socket
import sys
import time
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron_zero.training.optimizer import unwrap
from megatron_zero.errors import UserError

COMPLETE = "COMPLETE"
# The distributed optimizer's state is saved in megatron-core's ``fully_reshardable`` format (model-space tensors,
# gathered over DP on save, sliced per rank on load), so a run resumes at any TP/PP/DP (the CPU/torch-Adam failure
# of its loader is fixed in ``platform.mcore_fixes``). A plain optimizer's state_dict is saved per rank with
# torch.save (its model-space sharded form cannot describe frozen layers inside megatron's stacked per-layer
# tensors), so it resumes only at the layout it was saved with; anything else is refused before loading.
# Exception: when some rank has nothing to train (a frozen pipeline stage, normal in stages 1-2), megatron-core's
# fully reshardable form is invalid (its per-layer model-space tensors have holes) and the DP-reshardable format is
# used instead: such a run resumes at another DP size only (other changes are refused before loading).
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


def optimizer_sharding_type(optimizer, model_chunks=None) -> str:
    """``fully_reshardable``, or ``dp_reshardable`` when some rank holds no trainable parameter (collective the
    first time; the answer is kept on the optimizer)."""
    cached = getattr(optimizer, "_megatron_zero_sharding", None)
    if cached is not None:
        return cached
    del model_chunks  # the optimizer's own parameters decide, the same way on save and on load
    held = any(len(g["params"]) for g in optimizer.param_groups)
    local = torch.tensor([1.0 if held else 0.0])
    if dist.is_initialized():
        if dist.get_backend() == "nccl":
            local = local.cuda()
        dist.all_reduce(local, op=dist.ReduceOp.MIN)
    kind = OPTIMIZER_METADATA["distrib_optim_sharding_type"] if float(local) > 0 else "dp_reshardable"
    optimizer._megatron_zero_sharding = kind
    return kind
LATEST = "latest_checkpointed_iteration.txt"
LOCK = ".lock"
MANIFEST_VERSION = 1
_HASH_CHUNK = 16 << 20
_lock_file = None  # the open, flock-ed lock of this process's --save directory (released when it exits)


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
        if name.startswith("iter_") and name[5:].isdigit():
            if os.path.exists(os.path.join(root, name, COMPLETE)):
                out.append(int(name[5:]))
    return sorted(out)


def _warn(message: str) -> None:
    if _rank() == 0 and int(os.environ.get("LOCAL_RANK", "0") or 0) == 0:
        print(f"warning: {message}", file=sys.stderr, flush=True)


def _same_dir(a: Optional[str], b: Optional[str]) -> bool:
    return bool(a) and bool(b) and os.path.realpath(a) == os.path.realpath(b)


def _fsync_dir(path: str) -> None:
    from megatron_zero.checkpointing.hf_writer import fsync_dir

    fsync_dir(path)


def _remove_tree(path: str) -> None:
    """Delete a checkpoint directory so that an interruption leaves nothing that looks complete: rename first."""
    if not os.path.exists(path):
        return
    doomed = f"{path}.deleting"
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(path, doomed)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))
    shutil.rmtree(doomed, ignore_errors=True)


def prune(root: str, keep_last: int, just_written: int) -> list[int]:
    """Delete complete checkpoints older than ``just_written`` beyond the newest ``keep_last`` (counting it);
    never ``just_written`` itself, nor anything newer. Returns the pruned iterations."""
    older = [it for it in complete_iterations(root) if it < just_written]
    doomed = older[:max(len(older) - (keep_last - 1), 0)]
    for it in doomed:
        _remove_tree(iter_dir(root, it))
    return doomed


def remove_leftovers(root: str) -> list[str]:
    """Remove what interrupted saves and prunings left under ``root`` (``iter_*.tmp``, ``*.deleting``, iteration
    directories without ``COMPLETE``). Only call it while holding the directory's lock."""
    removed = []
    if not os.path.isdir(root):
        return removed
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        if not name.startswith("iter_") or not os.path.isdir(path):
            continue
        stale = name.endswith((".tmp", ".deleting")) or (name[5:].isdigit()
                                                         and not os.path.exists(os.path.join(path, COMPLETE)))
        if stale:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(name)
    return removed


def acquire_lock(root: str) -> None:
    """Hold an exclusive lock on ``root`` for the rest of this process (one process per run takes it)."""
    global _lock_file
    import fcntl

    if _lock_file is not None and _same_dir(os.path.dirname(_lock_file.name), root):
        return
    path = os.path.join(root, LOCK)
    f = open(path, "a+")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise CheckpointError(f"--save {root} is in use by another run ({holder}); two runs cannot write one "
                              f"directory: wait for it to finish or choose another --save") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}"
            + (f", SLURM job {os.environ['SLURM_JOB_ID']}" if os.environ.get("SLURM_JOB_ID") else "")
            + f", since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    f.flush()
    _lock_file = f


def prepare_save_dir(save: Optional[str], load: Optional[str], overwrite: bool = False) -> bool:
    """Check ``--save``/``--load`` before a run builds anything; returns whether it will resume from ``--load``.

    On the process that owns the run's files (rank 0) this also takes the lock on ``--save`` and removes the
    leftovers of interrupted saves. Every rank raises the same :class:`CheckpointError` for a refused layout.
    """
    resuming = bool(load) and latest_iteration(load) is not None
    if load and not resuming:
        if not os.path.exists(load):
            _warn(f"--load {load} does not exist: starting from scratch")
        elif not os.path.isdir(load):
            raise CheckpointError(f"--load {load} is a file, expected a checkpoint directory")
        else:
            _warn(f"--load {load} holds no complete checkpoint (iter_*/{COMPLETE}): starting from scratch")
    if not save:
        return resuming
    if os.path.exists(save) and not os.path.isdir(save):
        raise CheckpointError(f"--save {save} is a file, expected a directory for checkpoints")
    existing = complete_iterations(save)
    owner = int(os.environ.get("RANK", "0") or 0) == 0
    if existing and not (resuming and _same_dir(load, save)):
        shown = ", ".join(str(i) for i in existing[-4:])
        if not overwrite:
            raise CheckpointError(
                f"--save {save} already holds checkpoints of another run (iteration {shown}); resume it with "
                f"--load {save}, choose another --save, or pass --overwrite to delete them and start "
                + ("from --load" if resuming else "from scratch"))
    if owner:
        try:
            os.makedirs(save, exist_ok=True)
        except OSError as e:
            raise CheckpointError(f"--save {save}: cannot create the directory ({e.strerror})") from None
        acquire_lock(save)
        if existing and overwrite and not (resuming and _same_dir(load, save)):
            _warn(f"--overwrite: deleting the {len(existing)} checkpoint(s) of the previous run in {save}")
            for it in existing:
                _remove_tree(iter_dir(save, it))
            for name in (LATEST, "model_config.json"):
                if os.path.exists(os.path.join(save, name)):
                    os.remove(os.path.join(save, name))
        elif overwrite and resuming and _same_dir(load, save):
            _warn(f"--overwrite ignored: resuming from {save}")
        removed = remove_leftovers(save)
        if removed:
            _warn(f"removed leftovers of interrupted saves in {save}: {', '.join(removed)}")
    return resuming


# ---- manifest: sizes and hashes of every file, written into COMPLETE ----------------------------------------
def _writer_rank(rel: str) -> int:
    """The rank that wrote ``rel`` (dist_checkpointing's ``__<rank>_<n>.distcp``, our per-rank files; else 0)."""
    m = re.match(r"__(\d+)_\d+\.distcp$", os.path.basename(rel)) or re.search(r"rank_(\d+)\.pt$", rel)
    return int(m.group(1)) if m else 0


def _files(path: str) -> list[str]:
    out = []
    for dirpath, _dirs, names in os.walk(path):
        for n in names:
            rel = os.path.relpath(os.path.join(dirpath, n), path)
            if rel != COMPLETE:
                out.append(rel)
    return sorted(out)


def _hash_file(path: str, fsync: bool = False) -> tuple[int, str]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while True:
            chunk = f.read(_HASH_CHUNK)
            if not chunk:
                break
            size += len(chunk)
            h.update(chunk)
        if fsync:
            os.fsync(f.fileno())
    return size, h.hexdigest()


def _gather(obj: Any) -> list:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _my_share(files: list[str]) -> list[str]:
    world = dist.get_world_size() if dist.is_initialized() else 1
    return [f for f in files if _writer_rank(f) % world == _rank()]


def _manifest_files(path: str) -> dict[str, list]:
    """Every rank hashes and fsyncs the files it wrote; returns {relative path: [size, sha256]} on every rank."""
    files = _files(path)
    mine = {rel: list(_hash_file(os.path.join(path, rel), fsync=True)) for rel in _my_share(files)}
    merged: dict[str, list] = {}
    for part in _gather(mine):
        merged.update(part)
    return merged


def read_manifest(path: str) -> dict[str, Any]:
    """The COMPLETE marker of checkpoint directory ``path`` (an old plain-text marker gives ``{"iteration"}``)."""
    with open(os.path.join(path, COMPLETE)) as f:
        text = f.read()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = None
    if not isinstance(data, dict):
        try:
            return {"iteration": int(text.strip())}
        except ValueError:
            raise CheckpointError(f"--load {path}: damaged {COMPLETE} marker (neither a manifest nor an "
                                  f"iteration number)") from None
    return data


def verify_files(path: str, manifest: dict[str, Any], mode: str = "hash") -> None:
    """Check the files of ``path`` against its manifest (every rank checks a share; all raise the same error)."""
    files = manifest.get("files")
    if files is None:
        _warn(f"--load {path}: the checkpoint records no checksums (written by an older version): not verified")
        return
    problems = []
    for rel in _my_share(sorted(files)):
        size, digest = files[rel]
        full = os.path.join(path, rel)
        if not os.path.isfile(full):
            problems.append(f"{rel} is missing")
            continue
        actual_size = os.path.getsize(full)
        if actual_size != size:
            problems.append(f"{rel} has {actual_size} bytes, expected {size}")
        elif mode == "hash":
            _, actual = _hash_file(full)
            if actual != digest:
                problems.append(f"{rel} fails its SHA-256 check")
    problems = sorted(p for part in _gather(problems) for p in part)
    if problems:
        raise CheckpointError(f"--load {path}: the checkpoint is damaged ({'; '.join(problems[:5])}"
                              f"{'; ...' if len(problems) > 5 else ''}); move it away to resume from an older one")
    if mode != "hash":
        _warn(f"--checkpoint-verify {mode}: {path} checked by file sizes only (no hashes)")


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
    meta: Optional[dict[str, Any]] = None,
) -> str:
    """Save a complete, resumable checkpoint of ``iteration`` under ``root``; returns its directory.

    ``meta`` (e.g. ``{"model_config": ..., "layout": ...}``) is recorded in the ``COMPLETE`` manifest.
    """
    from megatron_zero.checkpointing.mcore_checkpoint import dist_save

    final = iter_dir(root, iteration)
    tmp = final + ".tmp"
    if _rank() == 0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)  # empty: megatron warns "Overwriting old incomplete / corrupted checkpoint" otherwise
    _barrier()
    state = _model_sharded_state_dict(model_chunks)
    if optimizer is not None and _is_distributed(optimizer):
        state["optimizer"] = optimizer.sharded_state_dict(
            state, metadata={"distrib_optim_sharding_type": optimizer_sharding_type(optimizer, model_chunks)})
    state["common"] = {
        "iteration": iteration,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "extra": extra or {},
    }
    dist_save(state, tmp)
    os.makedirs(os.path.join(tmp, "rng"), exist_ok=True)
    torch.save(_rng_state(), os.path.join(tmp, "rng", f"rank_{_rank():05d}.pt"))
    if optimizer is not None and not _is_distributed(optimizer):
        torch.save(optimizer.state_dict(), os.path.join(tmp, "rng", f"optimizer_rank_{_rank():05d}.pt"))
    _barrier()
    files = _manifest_files(tmp)  # every rank hashes + fsyncs what it wrote
    if _rank() == 0:
        manifest = {"version": MANIFEST_VERSION, "iteration": iteration, "files": files,
                    "layout": current_layout(optimizer), **(meta or {})}
        for d in (os.path.join(tmp, "rng"), tmp):
            _fsync_dir(d)
        with open(os.path.join(tmp, COMPLETE), "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        if os.path.exists(final):
            _remove_tree(final)
        os.replace(tmp, final)
        latest_tmp = os.path.join(root, LATEST + ".tmp")
        with open(latest_tmp, "w") as f:
            f.write(str(iteration))
            f.flush()
            os.fsync(f.fileno())
        os.replace(latest_tmp, os.path.join(root, LATEST))
        _fsync_dir(root)
        if keep_last:
            prune(root, keep_last, iteration)
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


def current_layout(optimizer=None) -> dict[str, Any]:
    """This run's parallel layout and optimizer format, as recorded in (and compared with) the manifest."""
    from megatron.core import parallel_state as ps

    layout = {"world_size": dist.get_world_size() if dist.is_initialized() else 1}
    if ps.model_parallel_is_initialized():
        layout.update(tp=ps.get_tensor_model_parallel_world_size(), pp=ps.get_pipeline_model_parallel_world_size(),
                      vpp=ps.get_virtual_pipeline_model_parallel_world_size(),
                      dp=ps.get_data_parallel_world_size())
    if optimizer is not None:
        layout["optimizer"] = ("distributed:" + optimizer_sharding_type(optimizer)
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


def check_layout(path: str, saved: Optional[dict[str, Any]], current: dict[str, Any]) -> bool:
    """Whether the layout changed; raises (before anything is loaded) when the optimizer state cannot follow."""
    if not saved:
        return False
    keys = ("tp", "pp", "vpp", "dp", "optimizer")
    changed = any(saved.get(k) != current.get(k) for k in keys if k in current)
    if not changed:
        return False
    s_opt, c_opt = saved.get("optimizer"), current.get("optimizer")
    if c_opt is None or s_opt == c_opt == "distributed:fully_reshardable":
        return True
    if s_opt == c_opt and c_opt.startswith("distributed:"):
        if all(saved.get(k) == current.get(k) for k in ("tp", "pp", "vpp")):
            return True  # dp_reshardable: along DP only
        raise CheckpointError(f"--load {path}: saved at {_describe_layout(saved)} in a format that reshards only "
                              f"along DP; this run is {_describe_layout(current)}: resume with the same TP/PP")
    if s_opt == "per_rank":
        why = "a plain optimizer's state is saved per rank and resumes only at the layout it was saved with"
    else:
        why = "a distributed optimizer's state cannot be loaded into a plain optimizer"
    raise CheckpointError(f"--load {path}: saved at {_describe_layout(saved)}, this run is "
                          f"{_describe_layout(current)}: {why}; resume with {_describe_layout(saved)} "
                          f"(--use-distributed-optimizer checkpoints reshard to any TP/PP/DP)")
    return True


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
    optimizer checkpoint resumes at any TP/PP/DP, a plain-optimizer one only at its own layout (refused in
    one line otherwise).
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
        _ensure_optimizer_state(optimizer)
        saved_opt = (manifest.get("layout") or {}).get("optimizer") or ""
        # checkpoints written before the manifest recorded the layout used the DP-only reshardable format
        sharding = saved_opt.split(":", 1)[1] if saved_opt.startswith("distributed:") else (
            OPTIMIZER_METADATA["distrib_optim_sharding_type"] if manifest.get("layout") else "dp_reshardable")
        state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=True,
                                                          metadata={"distrib_optim_sharding_type": sharding})
    state["common"] = {"iteration": 0, "scheduler": None, "extra": {}}
    try:
        loaded = dist_checkpointing.load(state, path)
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - a checkpoint that passed verification but does not fit the model
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(f"--load {path}: cannot be loaded into this model ({type(e).__name__}: "
                              f"{first[:300]})") from e
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
    if load_rng and not relayout:
        _set_rng_state(torch.load(rng_file, weights_only=False))
    return int(common["iteration"]), common["extra"]
