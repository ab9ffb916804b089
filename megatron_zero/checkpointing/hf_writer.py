"""Writing HuggingFace checkpoints as a stream: size-capped ``model-0000k-of-0000n.safetensors`` shards + index.

Tensors arrive one at a time; at most one shard (``max_shard_bytes``) is buffered before it is written, so
memory does not grow with the model. Shards are written as ``model-0000k.safetensors`` and renamed to the
``-of-0000n`` names once the count is known. Like every checkpoint writer here, it writes into a temporary
directory that :func:`atomic_directory` renames into place only when everything (``config.json`` last) is
written: an interrupted export leaves nothing that looks like a checkpoint.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from typing import Any, Iterator, Optional

import torch
from safetensors.torch import save_file

from megatron_zero.checkpointing.hf_reader import CONFIG, INDEX, SINGLE_FILE, TOKENIZER_FILES
from megatron_zero.errors import UserError

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str, flag: str = "--max-shard-size") -> int:
    """``"5GB"``, ``"500MB"``, ``"2GiB"`` or a byte count -> bytes."""
    m = _SIZE.match(str(text))
    if m is None:
        raise ValueError(f"{flag} {text!r}: expected a size such as 5GB, 500MB or 2GiB")
    size = int(float(m.group(1)) * _UNITS[(m.group(2) or "").upper()])
    if size <= 0:
        raise ValueError(f"{flag} {text!r}: must be positive")
    return size


class SaveDirError(UserError, ValueError):
    """The save directory cannot be written (exists and is not empty, without --overwrite)."""


def check_save_dir(path: str, overwrite: bool) -> None:
    """Refuse a non-empty ``path`` unless ``overwrite`` (call on every rank before any work)."""
    if os.path.isfile(path):
        raise SaveDirError(f"--save-dir {path}: is a file, not a directory")
    if os.path.isdir(path) and os.listdir(path) and not overwrite:
        raise SaveDirError(f"--save-dir {path}: directory exists and is not empty (pass --overwrite to replace it)")


def temp_dir_for(path: str, pid: Optional[int] = None) -> str:
    """``<path>.tmp-<pid>``; first removes the temp dirs that killed writers of ``path`` left behind."""
    remove_stale_temp_dirs(path)
    return f"{os.path.abspath(path).rstrip(os.sep)}.tmp-{os.getpid() if pid is None else pid}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temp_dirs(path: str) -> list[str]:
    """Delete ``<path>.tmp-<pid>`` (and ``.old``) directories whose writer process no longer runs on this host."""
    base = os.path.abspath(path).rstrip(os.sep)
    parent, name = os.path.split(base)
    removed = []
    try:
        entries = os.listdir(parent or ".")
    except OSError:
        return removed
    for entry in entries:
        if not entry.startswith(name + ".tmp-"):
            continue
        pid = entry[len(name) + 5:].split(".", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)
            removed.append(entry)
    return removed


def fsync_tree(root: str) -> None:
    """fsync every file and directory under ``root`` (before the rename that publishes it)."""
    for dirpath, _dirs, files in os.walk(root):
        for n in files:
            fd = os.open(os.path.join(dirpath, n), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(dirpath)


def fsync_dir(path: str) -> None:
    """fsync a directory (its entries: renames and new files), where the file system allows it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def publish(tmp: str, path: str) -> None:
    """Move finished ``tmp`` to ``path`` (after fsyncing it), replacing an existing directory there."""
    fsync_tree(tmp)
    old = None
    if os.path.lexists(path):
        old = f"{tmp}.old"
        os.replace(path, old)
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(path: str, overwrite: bool = False) -> Iterator[str]:
    """Yield a temporary directory; on success it replaces ``path``, on error it is removed (single process)."""
    check_save_dir(path, overwrite)
    tmp = temp_dir_for(path)
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish(tmp, path)


def copy_tokenizer_files(src: str, dst: str) -> list[str]:
    """Copy whichever HF tokenizer/generation files exist in ``src`` to ``dst``; returns their names."""
    copied = []
    for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(src, name)):
            shutil.copy2(os.path.join(src, name), os.path.join(dst, name))
            copied.append(name)
    return copied


class ShardedSafetensorsWriter:
    """Streams (name, tensor) pairs into size-capped safetensors shards and writes the index on :meth:`close`."""

    def __init__(self, out_dir: str, max_shard_bytes: int, log=print):
        self.out_dir = out_dir
        self.max_shard_bytes = max_shard_bytes
        self.log = log
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffer_bytes = 0
        self._shards: list[list[str]] = []  # tensor names per written shard
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._buffer or any(name in s for s in self._shards):
            raise ValueError(f"tensor {name!r} written twice")
        nbytes = tensor.numel() * tensor.element_size()
        if self._buffer and self._buffer_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._buffer[name] = tensor.detach().to("cpu").contiguous()
        self._buffer_bytes += nbytes
        self.total_bytes += nbytes

    def _temp_name(self, k: int) -> str:
        return os.path.join(self.out_dir, f"model-{k + 1:05d}.safetensors.part")

    def _flush(self) -> None:
        k = len(self._shards)
        save_file(self._buffer, self._temp_name(k), metadata={"format": "pt"})
        self.log(f"wrote shard {k + 1} ({len(self._buffer)} tensors, {self._buffer_bytes / 2**20:.1f} MiB)")
        self._shards.append(list(self._buffer))
        self._buffer, self._buffer_bytes = {}, 0

    def close(self) -> list[str]:
        """Write the last shard, give shards their final names and write the index; returns the file names."""
        if self._buffer:
            self._flush()
        n = len(self._shards)
        if n == 1:
            names = [SINGLE_FILE]
        else:
            names = [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
        for k, fname in enumerate(names):
            os.replace(self._temp_name(k), os.path.join(self.out_dir, fname))
        if n > 1:
            weight_map = {t: fname for fname, tensors in zip(names, self._shards) for t in tensors}
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
            with open(os.path.join(self.out_dir, INDEX), "w") as f:
                json.dump(index, f, indent=2)
        return names


_SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}
_GENERATION_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def written_float_dtype(out_dir: str) -> Optional[str]:
    """The floating-point dtype of the safetensors shards in ``out_dir`` (read from their headers), or None when
    there is none or they mix dtypes."""
    import struct

    found = set()
    for name in os.listdir(out_dir):
        if not name.endswith(".safetensors"):
            continue
        with open(os.path.join(out_dir, name), "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        found |= {_SAFETENSORS_DTYPES[v["dtype"]] for k, v in header.items()
                  if k != "__metadata__" and v.get("dtype") in _SAFETENSORS_DTYPES}
    return found.pop() if len(found) == 1 else None


def write_config(out_dir: str, config: dict[str, Any]) -> None:
    """``config.json``, written last. Its dtype is that of the tensors written (so ``transformers`` loads them
    as they are), and token ids missing from it are taken from the ``generation_config.json`` copied along."""
    config = dict(config)
    dtype = written_float_dtype(out_dir)
    if dtype is not None:
        config["torch_dtype"] = config["dtype"] = dtype
    gen_file = os.path.join(out_dir, "generation_config.json")
    if os.path.isfile(gen_file):
        with open(gen_file) as f:
            gen = json.load(f)
        targets = [config] + ([config["text_config"]] if isinstance(config.get("text_config"), dict) else [])
        for target in targets:
            for key in _GENERATION_IDS:
                if target.get(key) is None and gen.get(key) is not None:
                    target[key] = gen[key]
    with open(os.path.join(out_dir, CONFIG), "w") as f:
        json.dump(config, f, indent=2)
