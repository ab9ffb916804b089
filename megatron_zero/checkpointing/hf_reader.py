"""Streaming reader for HuggingFace checkpoints: ``config.json`` + ``model.safetensors`` or a sharded index.

Shards are opened lazily with ``safetensors.safe_open`` (memory-mapped, at most two at a time), and
:meth:`HFCheckpoint.get` loads one tensor at a time, so a conversion reads only the tensors it needs and never
holds the whole model.
Every problem with the files is raised as :class:`CheckpointFormatError` with a one-line message naming the file.
"""
from __future__ import annotations

import collections
import json
import os
from typing import Any, Iterable, Mapping, Optional

import torch
from safetensors import SafetensorError, safe_open
from megatron_zero.errors import UserError

CONFIG = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX = "model.safetensors.index.json"
# HF tokenizer / generation files carried along by conversions (whichever exist).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
    "preprocessor_config.json",
)

# Shards kept open (memory-mapped) at once: pages read through a map count as this process's memory until it
# is closed, so keeping every shard open would grow with the model.
MAX_OPEN_SHARDS = 2


class CheckpointFormatError(UserError, ValueError):
    """A checkpoint whose files are missing, corrupt, or do not match its config."""


def _read_json(path: str, what: str) -> Any:
    if not os.path.exists(path):
        raise CheckpointFormatError(f"{path}: {what} not found")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointFormatError(f"{path}: not valid JSON ({e})") from None


class HFCheckpoint:
    """A HuggingFace checkpoint directory, read tensor by tensor.

    ``weight_map`` maps every tensor name to the shard file that holds it. Shards are opened on first use.
    """

    def __init__(self, path: str):
        if not os.path.isdir(path):
            raise CheckpointFormatError(f"--load-dir {path}: not a directory")
        self.path = path
        self._handles: collections.OrderedDict[str, Any] = collections.OrderedDict()
        self.config: dict[str, Any] = _read_json(os.path.join(path, CONFIG), "HF config")
        index_path = os.path.join(path, INDEX)
        if os.path.exists(index_path):
            index = _read_json(index_path, "safetensors index")
            if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
                raise CheckpointFormatError(f"{index_path}: has no 'weight_map' object")
            self.weight_map: dict[str, str] = dict(index["weight_map"])
            self.source = index_path
        elif os.path.exists(os.path.join(path, SINGLE_FILE)):
            self.weight_map = {name: SINGLE_FILE for name in self._open(SINGLE_FILE).keys()}
            self.source = os.path.join(path, SINGLE_FILE)
        else:
            raise CheckpointFormatError(f"{path}: no {SINGLE_FILE} or {INDEX} (only safetensors checkpoints are read)")

    # ---- files -------------------------------------------------------------------------------------------
    def _open(self, fname: str, for_tensor: Optional[str] = None):
        handle = self._handles.get(fname)
        if handle is not None:
            self._handles.move_to_end(fname)
            return handle
        full = os.path.join(self.path, fname)
        if not os.path.exists(full):
            raise CheckpointFormatError(
                f"{full}: shard missing (the index maps tensor {for_tensor!r} to it)" if for_tensor
                else f"{full}: file missing"
            )
        try:
            handle = safe_open(full, framework="pt")
        except (SafetensorError, OSError) as e:
            raise CheckpointFormatError(f"{full}: cannot read safetensors shard (truncated or corrupt?): {e}") from None
        self._handles[fname] = handle
        while len(self._handles) > MAX_OPEN_SHARDS:  # release the memory maps of shards read earlier
            self._handles.popitem(last=False)
        return handle

    def shard_files(self) -> list[str]:
        return sorted(set(self.weight_map.values()))

    def validate(self, names: Optional[Iterable[str]] = None) -> None:
        """Open every shard (headers only) and check the index against them; cheap, and fails early."""
        for fname in self.shard_files():
            keys = set(self._open(fname, next(n for n, f in self.weight_map.items() if f == fname)).keys())
            for name, f in self.weight_map.items():
                if f == fname and name not in keys:
                    raise CheckpointFormatError(
                        f"{os.path.join(self.path, fname)}: has no tensor {name!r}, though {INDEX} maps it there"
                    )
        for name in names or ():
            if name not in self.weight_map:
                raise CheckpointFormatError(f"{self.source}: no tensor {name!r}")

    # ---- tensors -----------------------------------------------------------------------------------------
    def _file_of(self, name: str) -> str:
        try:
            return self.weight_map[name]
        except KeyError:
            raise CheckpointFormatError(f"{self.source}: no tensor {name!r}") from None

    def shape(self, name: str) -> tuple[int, ...]:
        fname = self._file_of(name)
        return tuple(self._open(fname, name).get_slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        return _DTYPES[self._open(self._file_of(name), name).get_slice(name).get_dtype()]

    def get(self, name: str) -> torch.Tensor:
        """Load one tensor (a copy, so the shard's memory map is not kept alive by it)."""
        fname = self._file_of(name)
        handle = self._open(fname, name)
        try:
            return handle.get_tensor(name).clone()
        except (SafetensorError, OSError, RuntimeError) as e:
            raise CheckpointFormatError(
                f"{os.path.join(self.path, fname)}: cannot read tensor {name!r} (truncated or corrupt?): {e}"
            ) from None

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.get(name)

    def check_shapes(self, expected: Mapping[str, tuple[int, ...]]) -> None:
        """Every tensor in ``expected`` exists with that shape, else a one-line error naming tensor and file."""
        for name, shape in expected.items():
            found = self.shape(name)
            if tuple(found) != tuple(shape):
                raise CheckpointFormatError(
                    f"{os.path.join(self.path, self.weight_map[name])}: tensor {name!r} has shape {tuple(found)} but "
                    f"{os.path.join(self.path, CONFIG)} implies {tuple(shape)} (does the config match the weights?)"
                )

    def close(self) -> None:
        self._handles.clear()


_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
