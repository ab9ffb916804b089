"""A training run's ``--save`` directory: the one place that knows its layout and lifecycle.

Layout::

    <save>/iter_0000100/           one checkpoint (model and optimizer shards, common state, rng/, ...)
    <save>/iter_0000100/COMPLETE   the manifest, written last: a directory without it is never loaded
    <save>/iter_0000100.tmp/       a save in progress (renamed to iter_0000100 once complete)
    <save>/latest_checkpointed_iteration.txt   the newest complete iteration (a hint; COMPLETE decides)
    <save>/model_config.json       the architecture (pretrain_lm)
    <save>/export/                 the run's final export (pretrain_vlm: a VLM checkpoint; pretrain_lm --export-model)
    <save>/.lock                   held by the run writing the directory

Lifecycle: :func:`prepare_save_dir` (lock, refuse another run's directory, remove leftovers), :func:`begin`
(a fresh ``.tmp`` directory), :func:`manifest_files` (every rank hashes and fsyncs what it wrote),
:func:`publish` (``COMPLETE``, rename, latest marker, prune). An interruption at any moment leaves nothing that
looks complete: pruning renames to ``*.deleting`` first, and leftovers are removed by the next run.

``COMPLETE`` is a JSON manifest: iteration, the size and SHA-256 of every file (hashed by the ranks that wrote
them, in parallel), and what the writer adds (architecture, parallel layout, the frozen base referenced). On load
the files are verified against it (:func:`verify_files`; ``size`` checks sizes only, for huge checkpoints).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import sys
import time
from typing import Any, Optional

import torch.distributed as dist

from megatron_zero.checkpointing.hf_writer import fsync_dir
from megatron_zero.errors import UserError

COMPLETE = "COMPLETE"
LATEST = "latest_checkpointed_iteration.txt"
LOCK = ".lock"
EXPORT_DIR = "export"
MODEL_CONFIG = "model_config.json"
HASHES_DIR = "hashes"  # per-rank {file: [size, sha256]} computed by a background (async) writer
MANIFEST_VERSION = 1
_HASH_CHUNK = 16 << 20
_lock_file = None  # the open, flock-ed lock of this process's --save directory (released when it exits)


class CheckpointError(UserError, ValueError):
    """A checkpoint (directory) that is missing, incomplete, damaged, or of another format, model or layout."""


def iter_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def export_dir(root: str) -> str:
    return os.path.join(root, EXPORT_DIR)


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


def latest_iteration(root: str) -> Optional[int]:
    """The newest complete iteration under ``root`` (the ``latest`` file is only a hint)."""
    done = complete_iterations(root)
    return done[-1] if done else None


def is_training_run(path: str, export_marker: str) -> bool:
    """``path`` looks like a training run's ``--save`` directory: an ``export/`` holding ``export_marker``, the
    latest marker, or any ``iter_*``."""
    if not os.path.isdir(path):
        return False
    if os.path.isfile(os.path.join(export_dir(path), export_marker)):
        return True
    return os.path.isfile(os.path.join(path, LATEST)) or any(
        n.startswith("iter_") and os.path.isdir(os.path.join(path, n)) for n in os.listdir(path))


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def warn(message: str) -> None:
    if rank() == 0 and int(os.environ.get("LOCAL_RANK", "0") or 0) == 0:
        print(f"warning: {message}", file=sys.stderr, flush=True)


def _same_dir(a: Optional[str], b: Optional[str]) -> bool:
    return bool(a) and bool(b) and os.path.realpath(a) == os.path.realpath(b)


def remove_tree(path: str) -> None:
    """Delete a checkpoint directory so that an interruption leaves nothing that looks complete: rename first."""
    if not os.path.exists(path):
        return
    doomed = f"{path}.deleting"
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(path, doomed)
    fsync_dir(os.path.dirname(os.path.abspath(path)))
    shutil.rmtree(doomed, ignore_errors=True)


def prune(root: str, keep_last: int, just_written: int) -> list[int]:
    """Delete complete checkpoints older than ``just_written`` beyond the newest ``keep_last`` (counting it);
    never ``just_written`` itself, nor anything newer. Returns the pruned iterations."""
    older = [it for it in complete_iterations(root) if it < just_written]
    doomed = older[:max(len(older) - (keep_last - 1), 0)]
    for it in doomed:
        remove_tree(iter_dir(root, it))
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
            warn(f"--load {load} does not exist: starting from scratch")
        elif not os.path.isdir(load):
            raise CheckpointError(f"--load {load} is a file, expected a checkpoint directory")
        else:
            warn(f"--load {load} holds no complete checkpoint (iter_*/{COMPLETE}): starting from scratch")
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
            warn(f"--overwrite: deleting the {len(existing)} checkpoint(s) of the previous run in {save}")
            for it in existing:
                remove_tree(iter_dir(save, it))
            for name in (LATEST, MODEL_CONFIG):
                if os.path.exists(os.path.join(save, name)):
                    os.remove(os.path.join(save, name))
        elif overwrite and resuming and _same_dir(load, save):
            warn(f"--overwrite ignored: resuming from {save}")
        removed = remove_leftovers(save)
        if removed:
            warn(f"removed leftovers of interrupted saves in {save}: {', '.join(removed)}")
    return resuming


def begin(root: str, iteration: int) -> str:
    """A fresh, empty ``iter_XXXXXXX.tmp`` for the save of ``iteration`` (made by rank 0; collective)."""
    tmp = iter_dir(root, iteration) + ".tmp"
    if rank() == 0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)  # empty: megatron warns "Overwriting old incomplete / corrupted checkpoint" otherwise
    barrier()
    return tmp


# ---- manifest: sizes and hashes of every file, written into COMPLETE ----------------------------------------
def _writer_rank(rel: str) -> int:
    """The rank that wrote ``rel`` (dist_checkpointing's ``__<rank>_<n>.distcp``, our per-rank files; else 0)."""
    m = re.match(r"__(\d+)_\d+\.distcp$", os.path.basename(rel)) or re.search(r"rank_(\d+)\.(pt|json)$", rel)
    return int(m.group(1)) if m else 0


def _files(path: str) -> list[str]:
    out = []
    for dirpath, _dirs, names in os.walk(path):
        for n in names:
            rel = os.path.relpath(os.path.join(dirpath, n), path)
            if rel != COMPLETE:
                out.append(rel)
    return sorted(out)


def hash_file(path: str, fsync: bool = False) -> tuple[int, str]:
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


def gather(obj: Any) -> list:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _my_share(files: list[str], me: Optional[int] = None, world: Optional[int] = None) -> list[str]:
    world = world if world is not None else (dist.get_world_size() if dist.is_initialized() else 1)
    me = rank() if me is None else me
    return [f for f in files if _writer_rank(f) % world == me]


def hash_own_shards(path: str, me: int, world: int) -> None:
    """In a background writer, after this rank's shards are written: hash and fsync them, and record the result
    in ``hashes/rank_XXXXX.json`` (fsynced), so that :func:`manifest_files` does not read them again."""
    shards = [f for f in _my_share(_files(path), me, world) if f.endswith(".distcp")]
    out = {rel: list(hash_file(os.path.join(path, rel), fsync=True)) for rel in shards}
    os.makedirs(os.path.join(path, HASHES_DIR), exist_ok=True)
    target = os.path.join(path, HASHES_DIR, f"rank_{me:05d}.json")
    with open(target + ".tmp", "w") as f:
        json.dump(out, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(target + ".tmp", target)


def manifest_files(path: str) -> dict[str, list]:
    """Every rank hashes and fsyncs the files it wrote (those a background writer hashed already are taken from
    ``hashes/``); returns {relative path: [size, sha256]} on every rank."""
    files = _files(path)
    known: dict[str, list] = {}
    mine = {}
    own_hashes = os.path.join(path, HASHES_DIR, f"rank_{rank():05d}.json")
    if os.path.isfile(own_hashes):
        with open(own_hashes) as f:
            known = json.load(f)
    for rel in _my_share(files):
        mine[rel] = known.get(rel) or list(hash_file(os.path.join(path, rel), fsync=True))
    merged: dict[str, list] = {}
    for part in gather(mine):
        merged.update(part)
    return merged


def publish(root: str, iteration: int, tmp: str, manifest: dict[str, Any], keep_last: Optional[int] = None) -> str:
    """On rank 0, once every file of ``tmp`` is durable: write ``COMPLETE`` (fsynced), rename ``tmp`` into place,
    move the latest marker, prune to ``keep_last``. Returns the checkpoint's directory."""
    final = iter_dir(root, iteration)
    for dirpath, _dirs, _names in os.walk(tmp):
        fsync_dir(dirpath)
    with open(os.path.join(tmp, COMPLETE), "w") as f:
        json.dump({"version": MANIFEST_VERSION, "iteration": iteration, **manifest}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(tmp)
    if os.path.exists(final):
        remove_tree(final)
    os.replace(tmp, final)
    latest_tmp = os.path.join(root, LATEST + ".tmp")
    with open(latest_tmp, "w") as f:
        f.write(str(iteration))
        f.flush()
        os.fsync(f.fileno())
    os.replace(latest_tmp, os.path.join(root, LATEST))
    fsync_dir(root)
    if keep_last:
        prune(root, keep_last, iteration)
    return final


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
        warn(f"--load {path}: the checkpoint records no checksums (written by an older version): not verified")
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
            _, actual = hash_file(full)
            if actual != digest:
                problems.append(f"{rel} fails its SHA-256 check")
    problems = sorted(p for part in gather(problems) for p in part)
    if problems:
        raise CheckpointError(f"--load {path}: the checkpoint is damaged ({'; '.join(problems[:5])}"
                              f"{'; ...' if len(problems) > 5 else ''}); move it away to resume from an older one")
    if mode != "hash":
        warn(f"--checkpoint-verify {mode}: {path} checked by file sizes only (no hashes)")
