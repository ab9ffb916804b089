"""Model-only megatron-core ``torch_dist`` checkpoints: save/load at any TP/PP, and streaming canonical reads.

Layout of a checkpoint directory::

    <dir>/.metadata, __*_*.distcp, common.pt, metadata.json   megatron-core dist_checkpointing (torch_dist)
    <dir>/model_config.json                                    the model's architecture (LlamaConfig.save)
    <dir>/checkpoint_meta.json                                 format version, layout it was saved from,
                                                               vocab sizes; written LAST = completion marker
    <dir>/tokenizer.json, tokenizer_config.json, ...           HF tokenizer files carried along, if any

The tensors are keyed by ``model.sharded_state_dict()``: layout-independent names (layers stacked along a
global-layer axis, TP pieces by offset), so :func:`load_model` reshards to any TP/PP. The keys do not depend
on the layer spec either: megatron-core's local spec maps its separate norms onto Transformer Engine's fused
names (``...linear_qkv.layer_norm_weight``), so the CPU (local) and GPU (TE) builds read and write the same
keys. Only weights are stored: ``_extra_state`` entries (TE's FP8 scaling state) are left out on save and
skipped on load. Vocabulary-sized tensors keep the saving layout's zero padding rows; megatron-core loads them
into another padding (``allow_shape_mismatch``).

Saves are atomic: everything is written into ``<dir>.tmp-<pid>``, which is renamed to ``<dir>`` only after
``checkpoint_meta.json``; a directory without it is refused by :func:`read_meta`.
"""
from __future__ import annotations

import functools
import json
import os
import shutil
from typing import Iterable, Any, Iterator, Optional

import torch
import torch.distributed as dist

from megatron_zero.checkpointing.hf_writer import check_save_dir, copy_tokenizer_files, publish, temp_dir_for
from megatron_zero.checkpointing.run_dir import CheckpointError
from megatron_zero.models.llama_config import LlamaConfig
from megatron_zero.parallel.collectives import any_rank
from megatron_zero.parallel.sharding import TE_NORM_ALIASES, VOCAB_KEYS

FORMAT_VERSION = 1
META_FILE = "checkpoint_meta.json"
CONFIG_FILE = "model_config.json"
_STACKED_LAYERS = "decoder.layers."


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _unwrap(model):
    while hasattr(model, "module"):
        model = model.module
    return model


def _weights_only(sharded: dict) -> dict:
    """Drop ``_extra_state`` entries (recursively): checkpoints here hold weights only."""
    out = {}
    for k, v in sharded.items():
        if k.endswith("_extra_state"):
            continue
        out[k] = _weights_only(v) if isinstance(v, dict) else v
    return out


def _sharded(model, prefix: str = "") -> dict:
    """``model.sharded_state_dict()``; for a plain ``torch.nn.Module`` holding megatron-core blocks (the vision
    encoder), megatron's default recursion: its own tensors replicated, each child's ``sharded_state_dict``."""
    from megatron.core.transformer.module import MegatronModule

    model = _unwrap(model)
    if hasattr(model, "sharded_state_dict"):
        return _weights_only(model.sharded_state_dict(prefix=prefix))
    return _weights_only(MegatronModule.sharded_state_dict(model, prefix))


_save_strategies: dict = {}  # structure -> megatron-core save strategy holding that structure's cached save plan
_MAX_STRUCTURES = 4  # a run saves one or two structures (e.g. both optimizer formats in a measurement)


def _structure(sharded_state_dict: dict) -> tuple:
    """What megatron-core's save plan depends on: every sharded entry's key, shape, offset, replica, flattened range
    and dtype, in the state dict's (deterministic) order."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedBase

    out = []
    for v in nested_values(sharded_state_dict):
        if isinstance(v, ShardedBase):
            fr = getattr(v, "flattened_range", None)  # (ShardedTensor's own fields: no tensor is touched)
            out.append((v.key, getattr(v, "global_shape", None), getattr(v, "global_offset", None), v.replica_id,
                        None if fr is None else (fr.start, fr.stop), getattr(v, "dtype", None)))
    return tuple(out)


def _strategy_for(sharded_state_dict: dict):
    """(save strategy, whether this structure is new on some rank: collective). Repeated saves of one structure
    (every ``--save-interval`` of a run) reuse one strategy, so megatron-core reuses its save plan and global
    metadata (validated by it across ranks) and the access-integrity check runs only on a structure's first save."""
    from megatron.core.dist_checkpointing.strategies.torch import (
        TorchDistSaveShardedStrategy,
    )

    structure = _structure(sharded_state_dict)
    new = any_rank(structure not in _save_strategies)
    if new:
        _save_strategies.pop(structure, None)
        while len(_save_strategies) >= _MAX_STRUCTURES:
            _save_strategies.pop(next(iter(_save_strategies)))
        _save_strategies[structure] = TorchDistSaveShardedStrategy("torch_dist", 1, cached_metadata=True)
    return _save_strategies[structure], new


def _is_view(t: torch.Tensor) -> bool:
    return t.untyped_storage().size() != t.numel() * t.itemsize


def _clone_views_then_write(write_fn, saving_pid: int, rank: int, write_buckets: list, *args, **kwargs):
    """The write of an asynchronous save (megatron-core's ``async_fn``), after cloning the CPU tensors that are views
    of larger storages (``torch.save`` would write the whole storage), which megatron-core's ``prepare_write_data``
    does in the training process. Run in the forked writer, the tensors are a copy-on-write snapshot taken at the
    fork, so the clones hold the values of that moment; there it uses one intra-op thread (the parent's OpenMP pool
    does not survive the fork: a parallel copy would wait forever)."""
    if os.getpid() != saving_pid:
        torch.set_num_threads(1)
    for i, (file_name, storage_key, (bytes_data, tensor_data)) in enumerate(write_buckets):
        tensor_data = [(item, t.clone() if t.device.type == "cpu" and _is_view(t) else t) for item, t in tensor_data]
        write_buckets[i] = (file_name, storage_key, (bytes_data, tensor_data))
    return write_fn(rank, write_buckets, *args, **kwargs)


def _writer_cloning_in_the_fork():
    """megatron-core's ``FileSystemWriterAsync`` whose ``prepare_write_data`` leaves views as they are (its
    ``_clone_if_needed`` copies every view in the training process: the model's weights and the optimizer's main
    parameters are all views of megatron's contiguous buffers); the writer process clones them
    (:func:`_clone_views_then_write`). The rest is megatron-core 0.16's method."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async as fa

    class Writer(fa.FileSystemWriterAsync):
        def prepare_write_data(self, plan, planner) -> None:
            storage_plan = plan.storage_data
            bins = self.thread_count // 2 if self.separation_hint is not None else self.thread_count
            item_buckets = fa._split_by_size_and_type(bins, plan.items)
            file_count = 0
            self.write_buckets = []
            for group_name, group_buckets in fa._split_by_separation_hint(item_buckets, self.separation_hint).items():
                for bucket in group_buckets:
                    bytes_data = [(item, planner.resolve_data(item)) for item in bucket
                                  if item.type == fa.WriteItemType.BYTE_IO]
                    tensor_data = [(item, planner.resolve_data(item).detach()) for item in bucket
                                   if item.type != fa.WriteItemType.BYTE_IO]
                    if bytes_data or tensor_data:
                        file_name = f"{group_name}{storage_plan.prefix}{file_count}{fa.DEFAULT_SUFFIX}"
                        file_count += 1
                        self.write_buckets.append((os.path.join(self.checkpoint_dir, file_name), file_name,
                                                   (bytes_data, tensor_data)))
            self.results_queue = fa._get_write_results_queue() if self.write_buckets else None

    return Writer


_results_manager = None


def results_manager():
    """The ``multiprocessing`` Manager (forked from this process) that carries the async writers' results (see
    :func:`dist_save`). It dies with this process: a rank killed by ``kill -9`` would otherwise leave the Manager's
    server process behind (found by the kill -9 trials: an orphan that outlived its run)."""
    import multiprocessing
    import signal
    from multiprocessing.managers import SyncManager

    from megatron_zero import platform

    global _results_manager
    if _results_manager is None:
        manager = SyncManager(ctx=multiprocessing.get_context("fork"))
        manager.start(initializer=platform.die_with_parent, initargs=(signal.SIGKILL, os.getpid()))
        _results_manager = manager
    return _results_manager


def dist_save(sharded_state_dict: dict, path: str, async_sharded_save: bool = False):
    """``dist_checkpointing.save`` (torch_dist) without the per-process ``spawn`` helper megatron-core starts;
    with ``async_sharded_save`` its ``AsyncRequest`` (the write, to be scheduled) is returned. The views of
    megatron's contiguous buffers (every weight, the optimizer's main parameters) are not copied in this process:
    the request's write (in the forked writer) clones them first.

    megatron-core collects its writer processes' results through a ``multiprocessing`` Manager queue created with
    the ``spawn`` start method: a fresh interpreter per saving process that imports torch to unpickle the results
    (~4 s of CPU on the first save of every rank). A Manager forked from this process (which has torch loaded
    already) gives the same queue at no start-up cost; megatron forks its writer processes itself.

    A structure saved before is saved with its cached plan and without re-validating its sharding
    (:func:`_strategy_for`; Megatron-LM's ``--ckpt-assume-constant-structure``, decided here per structure).
    """

    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if getattr(filesystem_async, "_results_queue", "absent") is None:  # not created yet in this process
        filesystem_async._results_queue = results_manager().Queue()
    strategy, new = _strategy_for(sharded_state_dict)
    if not async_sharded_save:
        return dist_checkpointing.save(sharded_state_dict, path, sharded_strategy=strategy,
                                       validate_access_integrity=new)
    from megatron.core.dist_checkpointing.strategies import torch as torch_strategies

    plain = torch_strategies.FileSystemWriterAsync
    torch_strategies.FileSystemWriterAsync = _writer_cloning_in_the_fork()
    try:
        request = dist_checkpointing.save(sharded_state_dict, path, sharded_strategy=strategy,
                                          validate_access_integrity=new, async_sharded_save=True)
    finally:
        torch_strategies.FileSystemWriterAsync = plain
    if request.async_fn is None:  # nothing to write on this rank
        return request
    return request._replace(async_fn=functools.partial(_clone_views_then_write, request.async_fn, os.getpid()))


def model_sharded_state_dict(chunks: list, prefix: str = "") -> dict[str, Any]:
    """``{"model": ...}`` (or ``model0``, ``model1``... for virtual pipeline chunks), as training checkpoints;
    ``prefix``: where the chunks sit in the checkpoint's model (``language_model.``: the decoder of a VLM's)."""
    if len(chunks) == 1:
        return {"model": _sharded(chunks[0], prefix)}
    return {f"model{i}": _sharded(m, prefix) for i, m in enumerate(chunks)}


# ---- metadata -----------------------------------------------------------------------------------------
def read_meta(path: str, flag: str = "--load-dir") -> dict[str, Any]:
    """The checkpoint's metadata; refuses directories that are not complete checkpoints of this format."""
    if not os.path.isdir(path):
        raise CheckpointError(f"{flag} {path}: not a directory")
    meta_path = os.path.join(path, META_FILE)
    if not os.path.exists(meta_path):
        raise CheckpointError(
            f"{flag} {path}: not a complete megatron_zero checkpoint (no {META_FILE}; an interrupted save?)"
        )
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{meta_path}: not valid JSON ({e})") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{meta_path}: checkpoint format version {meta.get('format_version')!r}, this code reads {FORMAT_VERSION}"
        )
    return meta


def load_model_config(path: str) -> LlamaConfig:
    """The Llama architecture stored next to a checkpoint."""
    meta = read_meta(path)
    if meta.get("model_type", "llama") != "llama":
        raise CheckpointError(f"{path}: holds a {meta['model_type']!r} model, not a Llama decoder")
    return LlamaConfig.load(os.path.join(path, CONFIG_FILE))


# ---- save / load ----------------------------------------------------------------------------------------
def save_model(
    chunks: list,
    save_dir: str,
    config,
    *,
    model_type: str = "llama",
    overwrite: bool = False,
    iteration: int = 0,
    copy_files_from: Optional[str] = None,
    extra_meta: Optional[dict[str, Any]] = None,
) -> str:
    """Save this rank's model chunks (collective over all ranks) as a complete checkpoint in ``save_dir``.

    ``config`` is the model's architecture (anything with ``save(path)``); ``copy_files_from`` a directory whose
    HF tokenizer files are carried along.
    """
    from megatron.core import parallel_state as ps

    check_save_dir(save_dir, overwrite)
    pid = [os.getpid()]
    if dist.is_initialized():
        dist.broadcast_object_list(pid, src=0)
    tmp = temp_dir_for(save_dir, pid[0])
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    _barrier()
    try:
        dist_save(model_sharded_state_dict(chunks), tmp)
        _barrier()
        if _rank() == 0:
            config.save(os.path.join(tmp, CONFIG_FILE))
            carried = copy_tokenizer_files(copy_files_from, tmp) if copy_files_from else []
            meta = {
                "format_version": FORMAT_VERSION,
                "model_type": model_type,
                "iteration": iteration,
                "tensor_parallel_size": ps.get_tensor_model_parallel_world_size(),
                "pipeline_parallel_size": ps.get_pipeline_model_parallel_world_size(),
                "vocab_size": getattr(config, "vocab_size", None),
                "tokenizer_files": carried,
                **(extra_meta or {}),
            }
            with open(os.path.join(tmp, META_FILE), "w") as f:
                json.dump(meta, f, indent=2)
            publish(tmp, save_dir)
        _barrier()
    except BaseException:
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return save_dir


def load_model(chunks: list, load_dir: str, skip=None) -> dict[str, Any]:
    """Load a checkpoint into this rank's chunks (collective), resharding from whatever layout saved it.

    ``skip(name)``: model tensors not to read (left as built, e.g. fresh LoRA adapters on a base checkpoint)."""
    from megatron.core import dist_checkpointing

    meta = read_meta(load_dir)
    request = model_sharded_state_dict(chunks)
    if skip is not None:
        request = {c: {k: v for k, v in sd.items() if not skip(k)} for c, sd in request.items()}
    loaded = dist_checkpointing.load(request, load_dir)
    for i, chunk in enumerate(chunks):
        state = loaded["model"] if len(chunks) == 1 else loaded[f"model{i}"]
        missing, unexpected = _unwrap(chunk).load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.endswith("_extra_state") and not (skip and skip(k))]
        if missing or unexpected:
            raise CheckpointError(f"{load_dir}: checkpoint does not fit the model (missing {missing[:3]}, "
                                  f"unexpected {unexpected[:3]})")
    return meta


# ---- streaming canonical reads (no model needed) ------------------------------------------------------------
_STORED_NORM_NAMES = {local: te for te, local in TE_NORM_ALIASES.items()}


def _load_pieces(load_dir: str, requests: dict[str, tuple[str, Optional[int], Any]]) -> dict[str, torch.Tensor]:
    """Load whole stored tensors, or one layer of a layer-stacked one: ``{name: (stored_key, layer|None, meta)}``."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedTensor

    sharded = {}
    for name, (key, layer, md) in requests.items():
        shape = tuple(md.global_shape)
        if layer is None:
            sharded[name] = ShardedTensor.from_rank_offsets(key, torch.empty(shape, dtype=md.dtype), replica_id=0)
        else:
            sharded[name] = ShardedTensor.from_rank_offsets(
                key, torch.empty((1, *shape[1:]), dtype=md.dtype), (0, layer, shape[0]), replica_id=0)
    loaded = dist_checkpointing.load(sharded, load_dir, validate_access_integrity=False)
    return {name: (t if requests[name][1] is None else t[0]) for name, t in loaded.items()}


def iter_llama_canonical(load_dir: str, cfg: LlamaConfig,
                         layers: Optional[Iterable[int]] = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield the canonical tensors of a Llama checkpoint one layer at a time, without building a model.

    ``layers`` restricts the decoder layers read (default: all; the embedding, final norm and output layer are
    always read). Collective: under ``torch.distributed`` every rank must iterate with the same ``layers`` (each
    receives every tensor). Peak memory is one layer plus the largest vocabulary tensor.
    """
    from megatron.core import dist_checkpointing

    from megatron_zero.checkpointing import hf_llama

    read_meta(load_dir)
    stored = dist_checkpointing.load_tensors_metadata(load_dir)

    def locate(ckey: str) -> tuple[str, Optional[int], Any]:
        if ckey in stored:
            return ckey, None, stored[ckey]
        if ckey.startswith(_STACKED_LAYERS):
            index, suffix = ckey[len(_STACKED_LAYERS):].split(".", 1)
            for name in (_STORED_NORM_NAMES.get(suffix), suffix):
                if name is not None and _STACKED_LAYERS + name in stored:
                    return _STACKED_LAYERS + name, int(index), stored[_STACKED_LAYERS + name]
        raise CheckpointError(f"{load_dir}: checkpoint has no tensor for {ckey!r} (does {CONFIG_FILE} match it?)")

    groups: list[list[str]] = [["embedding.word_embeddings.weight"]]
    groups += [[k for k in hf_llama.canonical_keys(cfg, range(i, i + 1)) if k.startswith(_STACKED_LAYERS)]
               for i in (range(cfg.num_layers) if layers is None else sorted(set(layers)))]
    groups.append(["decoder.final_layernorm.weight"] + ([] if cfg.tie_word_embeddings else ["output_layer.weight"]))
    for group in groups:
        tensors = _load_pieces(load_dir, {k: locate(k) for k in group})
        for ckey in group:
            t = tensors.pop(ckey)
            if ckey in VOCAB_KEYS:
                if t.shape[0] < cfg.vocab_size:
                    raise CheckpointError(f"{load_dir}: {ckey} has {t.shape[0]} rows, fewer than the vocabulary "
                                          f"size {cfg.vocab_size} in {CONFIG_FILE}")
                t = t[: cfg.vocab_size].clone()
            yield ckey, t
