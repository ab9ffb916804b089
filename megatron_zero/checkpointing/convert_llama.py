"""Llama decoders: HF <-> megatron-core ``torch_dist`` at any TP/PP, and mcore -> mcore resharding.

* :func:`hf_to_mcore` / :func:`mcore_to_mcore`: collective over a TP x PP world; each rank builds its part of the
  target layout (no random init), reads only its tensors, and the ranks write one checkpoint together.
* :func:`mcore_to_hf`: streams the checkpoint layer by layer into size-capped safetensors shards + index +
  ``config.json`` that ``transformers`` loads unchanged (one process).

Tokenizer files are carried along; writes are atomic.
"""
from __future__ import annotations

import dataclasses

import os
import sys

import torch

from megatron_zero.checkpointing import hf_llama
from megatron_zero.checkpointing.convert_common import (
    DTYPES, PROG, Progress, check_world, dtype_of, load_canonical, log, num_weights, target_runtime_options,
)
from megatron_zero.checkpointing.hf_reader import CheckpointFormatError, HFCheckpoint
from megatron_zero.checkpointing.hf_writer import (
    ShardedSafetensorsWriter, atomic_directory, check_save_dir, copy_tokenizer_files, write_config,
)
from megatron_zero.models.llama import RuntimeOptions
from megatron_zero.models.llama_config import LlamaConfig


def read_hf_llama(load_dir: str) -> tuple[HFCheckpoint, LlamaConfig]:
    """Open a HF Llama checkpoint and check its tensors against its ``config.json`` (headers only)."""
    reader = HFCheckpoint(load_dir)
    try:
        cfg = LlamaConfig.from_hf_config(reader.config,
                                         name=os.path.basename(os.path.abspath(load_dir)))
    except (KeyError, ValueError) as e:
        raise CheckpointFormatError(f"{os.path.join(load_dir, 'config.json')}: {e.args[0] if e.args else e}") from None
    reader.validate()
    expected = hf_llama.hf_shapes(cfg)
    reader.check_shapes(expected)
    unexpected = [n for n in reader.weight_map if n not in expected and not n.endswith("rotary_emb.inv_freq")
                  and not (cfg.tie_word_embeddings and n == "lm_head.weight")]
    if unexpected:
        raise CheckpointFormatError(f"{reader.source}: tensors a Llama with this config.json does not have: "
                                    f"{unexpected[:3]}{' ...' if len(unexpected) > 3 else ''}")
    return reader, cfg


def build_target(cfg: LlamaConfig, opts: RuntimeOptions):
    """This rank's model for the target layout (``opts`` from ``target_runtime_options``: uninitialised weights)."""
    from megatron_zero.models.llama import build_llama_model
    from megatron_zero.parallel.initialize import initialize_parallel

    initialize_parallel(opts.tensor_model_parallel_size, opts.pipeline_model_parallel_size)
    return build_llama_model(cfg, opts)


def hf_to_mcore(load_dir: str, save_dir: str, tp: int = 1, pp: int = 1, stage_layers=None,
                overwrite: bool = False, params_dtype: str = "auto") -> None:
    """HF Llama -> megatron-core checkpoint; every rank of a TP*PP world calls this."""
    from megatron.core import parallel_state as ps

    from megatron_zero.checkpointing import mcore_checkpoint

    reader, cfg = read_hf_llama(load_dir)
    dtype = reader.dtype("model.embed_tokens.weight") if params_dtype == "auto" else DTYPES[params_dtype]
    opts = target_runtime_options(cfg, tp, pp, stage_layers, dtype)
    check_world(tp, pp)
    check_save_dir(save_dir, overwrite)
    model = build_target(cfg, opts)
    tp_rank = ps.get_tensor_model_parallel_rank()
    get = Progress(hf_llama.canonical_getter(reader.get, cfg), num_weights(model), "reading HF tensors (rank 0)")
    load_canonical(model, get, tp_rank, tp, reader.source)
    get.bar.close()
    reader.close()
    log(f"writing torch_dist checkpoint (TP={tp}, PP={pp}) to {save_dir}")
    mcore_checkpoint.save_model([model], save_dir, cfg, overwrite=overwrite, copy_files_from=load_dir,
                                extra_meta={"source": os.path.abspath(load_dir), "params_dtype": str(dtype)})


def mcore_to_mcore(load_dir: str, save_dir: str, tp: int = 1, pp: int = 1, stage_layers=None,
                   overwrite: bool = False) -> None:
    """Reshard a megatron-core checkpoint to another TP/PP; every rank of a TP*PP world calls this."""
    from megatron_zero.checkpointing import mcore_checkpoint

    cfg = mcore_checkpoint.load_model_config(load_dir)
    meta = mcore_checkpoint.read_meta(load_dir)
    opts = target_runtime_options(cfg, tp, pp, stage_layers, dtype_of(meta))
    check_world(tp, pp)
    check_save_dir(save_dir, overwrite)
    model = build_target(cfg, opts)
    log(f"loading {load_dir} (saved at TP={meta['tensor_parallel_size']}, PP={meta['pipeline_parallel_size']})")
    mcore_checkpoint.load_model([model], load_dir)
    log(f"writing torch_dist checkpoint (TP={tp}, PP={pp}) to {save_dir}")
    mcore_checkpoint.save_model([model], save_dir, cfg, overwrite=overwrite, copy_files_from=load_dir,
                                iteration=meta.get("iteration", 0),
                                extra_meta={k: meta[k] for k in ("source", "params_dtype") if k in meta})


def hf_config_for_export(cfg: LlamaConfig, dtype: torch.dtype) -> dict:
    hf = cfg.to_hf_config()
    hf["torch_dtype"] = hf["dtype"] = str(dtype).replace("torch.", "")
    return hf


def mcore_to_hf(load_dir: str, save_dir: str, overwrite: bool = False, max_shard_bytes: int = 5 * 10**9,
                merge_lora: bool = False) -> None:
    """megatron-core checkpoint -> HF Llama, streaming one layer at a time.

    Collective when ``torch.distributed`` is initialised (every rank reads, rank 0 writes); the tool itself runs
    it in one process.
    """
    from tqdm import tqdm

    from megatron_zero.platform import mcore_fixes
    from megatron_zero.checkpointing import mcore_checkpoint
    from megatron_zero.parallel.initialize import init_process_group, is_rank0

    cfg = mcore_checkpoint.load_model_config(load_dir)
    if cfg.lora and not merge_lora:
        raise CheckpointFormatError(f"{load_dir}: the checkpoint holds LoRA adapters (rank {cfg.lora['rank']}); "
                                    f"pass --merge-lora to fold them into the exported decoder")
    check_save_dir(save_dir, overwrite)
    mcore_fixes.setup_megatron_core()
    init_process_group()
    stream = mcore_checkpoint.iter_llama_canonical(load_dir, cfg)
    if cfg.lora:
        from megatron_zero.checkpointing.lora_merge import merge_canonical

        stream, cfg = merge_canonical(stream, cfg), dataclasses.replace(cfg, lora=None)
    bar = tqdm(total=len(hf_llama.canonical_keys(cfg)), desc="exporting tensors", unit="tensor",
               disable=not is_rank0(), file=sys.stdout)
    if not is_rank0():
        for _ in stream:  # the reads are collective
            pass
        return
    with atomic_directory(save_dir, overwrite) as tmp:
        writer = ShardedSafetensorsWriter(tmp, max_shard_bytes, log=lambda m: bar.write(f"[{PROG}] {m}"))
        dtype = None
        for ckey, tensor in stream:
            dtype = dtype or tensor.dtype
            for name, t in hf_llama.from_canonical(ckey, tensor, cfg).items():
                writer.add(name, t)
            bar.update(1)
        bar.close()
        files = writer.close()
        copy_tokenizer_files(load_dir, tmp)
        write_config(tmp, hf_config_for_export(cfg, dtype))  # last: a directory with config.json is complete
    log(f"wrote {len(files)} safetensors shard(s), {writer.total_bytes / 2**20:.1f} MiB, to {save_dir}")
