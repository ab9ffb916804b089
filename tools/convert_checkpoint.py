#!/usr/bin/env python
"""Convert checkpoints between HuggingFace and megatron-core ``torch_dist`` format, at any TP/PP.

Directions (``--source-format`` -> ``--target-format``):

* ``hf -> mcore``: one process per target model-parallel rank; each rank reads only its tensors from the HF
  safetensors shards and the ranks write one ``torch_dist`` checkpoint together::

      torchrun --nproc-per-node 4 tools/convert_checkpoint.py --source-format hf --target-format mcore \\
          --load-dir Llama-3.1-8B-Instruct --save-dir ckpt/llama8b \\
          --target-tensor-parallel-size 2 --target-pipeline-parallel-size 2

  (``--nproc-per-node`` = TP x PP; TP = PP = 1 needs no torchrun.)
* ``mcore -> mcore``: reshards to another TP/PP (launched like ``hf -> mcore``, for the target layout).
  A ``torch_dist`` checkpoint already loads at any TP/PP, so this is needed only to hand a checkpoint to
  tools that expect a given layout.
* ``mcore -> hf``: one process, no torchrun: streams the checkpoint layer by layer into size-capped
  ``model-0000k-of-0000n.safetensors`` shards + index + ``config.json`` that ``transformers`` loads unchanged.

``--model-type clip`` converts a HF ``CLIPVisionModel`` (ViT-L/14-336 layout) the same way.
Tokenizer files (``tokenizer.json``, ``tokenizer.model``, ``tokenizer_config.json`` with the chat template,
``special_tokens_map.json``, ``generation_config.json``) are carried along in both directions. Writes are
atomic. Bad input ends with a one-line error naming the file or flag (exit status 2).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import resource
import sys
from typing import Optional, Sequence

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from megatron_zero.checkpointing import hf_llama  # noqa: E402
from megatron_zero.checkpointing.hf_reader import CheckpointFormatError, HFCheckpoint  # noqa: E402
from megatron_zero.checkpointing.hf_writer import (  # noqa: E402
    SaveDirError, ShardedSafetensorsWriter, atomic_directory, check_save_dir, copy_tokenizer_files, parse_size,
    write_config,
)
from megatron_zero.checkpointing.hf_llava import LlavaExportError  # noqa: E402
from megatron_zero.checkpointing.mcore_checkpoint import CheckpointError  # noqa: E402
from megatron_zero.checkpointing.vlm_checkpoint import VLMCheckpointError  # noqa: E402
from megatron_zero.models.llama import ModelConfigError, RuntimeOptions  # noqa: E402
from megatron_zero.models.llama_config import LlamaConfig  # noqa: E402
from megatron_zero.parallel.initialize import ParallelConfigError  # noqa: E402

PROG = "convert_checkpoint.py"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
USER_ERRORS = (CheckpointFormatError, CheckpointError, SaveDirError, ModelConfigError, ParallelConfigError,
               LlavaExportError, VLMCheckpointError)
# validate()/split_layers() speak in training flags; this tool's flags say "target".
_FLAG_NAMES = {
    "--tensor-model-parallel-size": "--target-tensor-parallel-size",
    "--pipeline-stage-layers": "--target-pipeline-stage-layers",
    "pipeline-model-parallel-size": "target-pipeline-parallel-size",
}


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load-dir", required=True, help="source checkpoint directory")
    p.add_argument("--save-dir", required=True, help="target checkpoint directory (written atomically)")
    p.add_argument("--source-format", choices=("hf", "mcore", "vlm"), required=True,
                   help="vlm: a VLM checkpoint (tools/graft.py output), exported with --model-type vlm")
    p.add_argument("--target-format", choices=("hf", "mcore"), required=True)
    p.add_argument("--model-type", choices=("llama", "clip", "vlm"), default="llama",
                   help="vlm: VLM checkpoint -> HF LlavaForConditionalGeneration (LLaVA feature convention only)")
    p.add_argument("--target-tensor-parallel-size", type=int, default=1)
    p.add_argument("--target-pipeline-parallel-size", type=int, default=1)
    p.add_argument("--target-pipeline-stage-layers", type=int, nargs="+", default=None,
                   help="decoder layers per pipeline stage, for uneven splits (e.g. 10 11 11 10)")
    p.add_argument("--params-dtype", choices=("auto", *DTYPES), default="auto",
                   help="dtype of the mcore checkpoint (auto: that of the HF weights)")
    p.add_argument("--max-shard-size", type=_size, default="5GB", help="largest HF safetensors shard (e.g. 5GB, 500MB)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --save-dir")
    p.add_argument("--merge-lora", action="store_true",
                   help="(mcore -> hf) fold the checkpoint's LoRA adapters into the decoder weights")
    args = p.parse_args(argv)
    if args.source_format == args.target_format == "hf":
        p.error("--source-format hf --target-format hf: nothing to convert")
    if (args.model_type == "vlm") != (args.source_format == "vlm") or (args.model_type == "vlm"
                                                                      and args.target_format != "hf"):
        p.error("a VLM checkpoint converts only as --model-type vlm --source-format vlm --target-format hf")
    return args


def _log(msg: str) -> None:
    from megatron_zero.parallel.initialize import print_rank0

    print_rank0(f"[{PROG}] {msg}")


def _runtime_options(cfg: LlamaConfig, tp: int, pp: int, stage_layers, dtype: torch.dtype) -> RuntimeOptions:
    """Options for building the target layout (local spec: conversion needs no fused kernels)."""
    from megatron_zero.models.llama import validate

    opts = RuntimeOptions(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                          pipeline_stage_layers=stage_layers, params_dtype=dtype,
                          bf16=dtype == torch.bfloat16, use_te=False)
    try:
        validate(cfg, opts)
    except ModelConfigError as e:
        msg = str(e)
        for old, new in _FLAG_NAMES.items():
            msg = msg.replace(old, new)
        raise ModelConfigError(msg) from None
    return opts


def _check_world(tp: int, pp: int) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world % (tp * pp):
        raise ParallelConfigError(
            f"--target-tensor-parallel-size {tp} x --target-pipeline-parallel-size {pp} needs {tp * pp} processes, "
            f"but {world} were launched: run `torchrun --nproc-per-node {tp * pp} tools/{PROG} ...`"
        )


@contextlib.contextmanager
def _without_weight_init():
    """Build models without random initialisation: every weight is loaded right after, and megatron's CPU
    initialisation costs time and a temporary full-size copy of each weight (which inflates peak memory)."""
    from megatron_zero.models import llama

    make_config = llama.transformer_config

    def config(*args, **kwargs):
        c = make_config(*args, **kwargs)
        c.perform_initialization = False
        return c

    llama.transformer_config = config
    try:
        yield
    finally:
        llama.transformer_config = make_config


def _mark_tensor_parallel(model) -> None:
    """megatron-core sets a weight's tensor-parallel attributes only while initialising it; set them here."""
    from megatron.core.tensor_parallel.layers import (
        ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, set_tensor_model_parallel_attributes,
    )

    for module in model.modules():
        if isinstance(module, (ColumnParallelLinear, VocabParallelEmbedding)):
            dim = 0
        elif isinstance(module, RowParallelLinear):
            dim = 1
        else:
            continue
        weight = getattr(module, "weight", None)
        if weight is not None and not hasattr(weight, "tensor_model_parallel"):
            set_tensor_model_parallel_attributes(weight, True, dim, 1)


def _build_target(cfg: LlamaConfig, opts: RuntimeOptions):
    """This rank's model for the target layout, with uninitialised weights (they are all loaded next)."""
    from megatron_zero.models.llama import build_llama_model
    from megatron_zero.parallel.initialize import initialize_parallel

    initialize_parallel(opts.tensor_model_parallel_size, opts.pipeline_model_parallel_size)
    with _without_weight_init():
        model = build_llama_model(cfg, opts)
    _mark_tensor_parallel(model)
    return model


class _Progress:
    """A tqdm bar on rank 0 around a tensor getter."""

    def __init__(self, get, total: int, desc: str):
        from tqdm import tqdm

        from megatron_zero.parallel.initialize import is_rank0

        self.get = get
        self.bar = tqdm(total=total, desc=desc, unit="tensor", disable=not is_rank0(), file=sys.stdout)

    def __call__(self, key: str) -> torch.Tensor:
        t = self.get(key)
        self.bar.update(1)
        return t


def _load_canonical(model, get, tp_rank: int, tp: int, source: str) -> None:
    """``sharding.load_canonical`` with its mismatch errors turned into one-line format errors."""
    from megatron_zero.parallel import sharding

    try:
        sharding.load_canonical(model, get, tp_rank, tp, source=source)
    except (KeyError, ValueError) as e:
        if isinstance(e, USER_ERRORS):
            raise
        raise CheckpointFormatError(e.args[0] if e.args else str(e)) from None


# ---- Llama ------------------------------------------------------------------------------------------------
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


def hf_to_mcore(load_dir: str, save_dir: str, tp: int = 1, pp: int = 1, stage_layers=None,
                overwrite: bool = False, params_dtype: str = "auto") -> None:
    """HF Llama -> megatron-core checkpoint; every rank of a TP*PP world calls this."""
    from megatron.core import parallel_state as ps

    from megatron_zero.checkpointing import mcore_checkpoint

    reader, cfg = read_hf_llama(load_dir)
    dtype = reader.dtype("model.embed_tokens.weight") if params_dtype == "auto" else DTYPES[params_dtype]
    opts = _runtime_options(cfg, tp, pp, stage_layers, dtype)
    _check_world(tp, pp)
    check_save_dir(save_dir, overwrite)
    model = _build_target(cfg, opts)
    tp_rank = ps.get_tensor_model_parallel_rank()
    n = sum(1 for k in model.state_dict() if not k.endswith("_extra_state"))
    get = _Progress(hf_llama.canonical_getter(reader.get, cfg), n, "reading HF tensors (rank 0)")
    _load_canonical(model, get, tp_rank, tp, reader.source)
    get.bar.close()
    reader.close()
    _log(f"writing torch_dist checkpoint (TP={tp}, PP={pp}) to {save_dir}")
    mcore_checkpoint.save_model([model], save_dir, cfg, overwrite=overwrite, copy_files_from=load_dir,
                                extra_meta={"source": os.path.abspath(load_dir), "params_dtype": str(dtype)})


def mcore_to_mcore(load_dir: str, save_dir: str, tp: int = 1, pp: int = 1, stage_layers=None,
                   overwrite: bool = False) -> None:
    """Reshard a megatron-core checkpoint to another TP/PP; every rank of a TP*PP world calls this."""
    from megatron_zero.checkpointing import mcore_checkpoint

    cfg = mcore_checkpoint.load_model_config(load_dir)
    meta = mcore_checkpoint.read_meta(load_dir)
    dtype = getattr(torch, meta.get("params_dtype", "torch.float32").replace("torch.", ""))
    opts = _runtime_options(cfg, tp, pp, stage_layers, dtype)
    _check_world(tp, pp)
    check_save_dir(save_dir, overwrite)
    model = _build_target(cfg, opts)
    _log(f"loading {load_dir} (saved at TP={meta['tensor_parallel_size']}, PP={meta['pipeline_parallel_size']})")
    mcore_checkpoint.load_model([model], load_dir)
    _log(f"writing torch_dist checkpoint (TP={tp}, PP={pp}) to {save_dir}")
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

    from megatron_zero.checkpointing import mcore_checkpoint
    from megatron_zero.parallel.initialize import init_process_group, is_rank0
    from megatron_zero import platform

    cfg = mcore_checkpoint.load_model_config(load_dir)
    if cfg.lora and not merge_lora:
        raise CheckpointFormatError(f"{load_dir}: the checkpoint holds LoRA adapters (rank {cfg.lora['rank']}); "
                                    f"pass --merge-lora to fold them into the exported decoder")
    check_save_dir(save_dir, overwrite)
    platform.install_cpu_compat()
    init_process_group()
    stream = mcore_checkpoint.iter_llama_canonical(load_dir, cfg)
    if cfg.lora:
        from megatron_zero.models.lora import merge_canonical

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
    _log(f"wrote {len(files)} safetensors shard(s), {writer.total_bytes / 2**20:.1f} MiB, to {save_dir}")


# ---- CLIP vision encoder -------------------------------------------------------------------------------------
def read_hf_clip(load_dir: str):
    """Open a HF ``CLIPVisionModel`` (or full ``CLIPModel``) checkpoint; the whole tower, all layers.

    Returns (reader, config, prefix of the tower's tensor names): ``vision_model.`` in CLIPModel checkpoints
    and those of transformers < 5, none in ``CLIPVisionModel.save_pretrained`` of transformers >= 5.
    """
    from megatron_zero.models.clip_vit import ClipVisionConfig

    reader = HFCheckpoint(load_dir)
    hf = reader.config.get("vision_config", reader.config)
    try:
        cfg = ClipVisionConfig.from_hf_config(hf, feature_convention="zero",
                                              name=os.path.basename(os.path.abspath(load_dir)))
    except (KeyError, TypeError, ValueError) as e:
        config = os.path.join(load_dir, "config.json")
        raise CheckpointFormatError(f"{config}: not a CLIP vision config ({e})") from None
    reader.validate()
    for prefix in ("vision_model.", ""):
        if prefix + "embeddings.patch_embedding.weight" in reader.weight_map:
            return reader, cfg, prefix
    raise CheckpointFormatError(f"{reader.source}: no CLIP vision tower (no 'vision_model.embeddings.patch_embedding"
                                f".weight' or 'embeddings.patch_embedding.weight')")


def _build_clip(cfg, tp: int, dtype: torch.dtype):
    from megatron_zero.models.clip_vit import ClipVisionTransformer
    from megatron_zero.parallel.initialize import initialize_parallel

    for what, n in (("attention heads", cfg.num_attention_heads), ("ffn_hidden_size", cfg.ffn_hidden_size)):
        if n % tp:
            raise ModelConfigError(f"--target-tensor-parallel-size {tp} does not divide the encoder's {what} ({n})")
    _check_world(tp, 1)
    initialize_parallel(tp, 1)
    return ClipVisionTransformer(cfg, tp, params_dtype=dtype, bf16=dtype == torch.bfloat16, use_te=False)


def clip_to_mcore(load_dir: str, save_dir: str, source_format: str = "hf", tp: int = 1, overwrite: bool = False,
                  params_dtype: str = "auto") -> None:
    """HF CLIP vision tower (or a CLIP mcore checkpoint) -> megatron-core checkpoint at TP (collective)."""
    from megatron.core import parallel_state as ps

    from megatron_zero.checkpointing import hf_clip, mcore_checkpoint
    from megatron_zero.models.clip_vit import ClipVisionConfig

    if source_format == "hf":
        reader, cfg, prefix = read_hf_clip(load_dir)
        dtype = reader.dtype(prefix + "embeddings.patch_embedding.weight")
    else:
        meta = mcore_checkpoint.read_meta(load_dir)
        prefix = meta.get("hf_prefix", hf_clip.HF_PREFIX)
        cfg = ClipVisionConfig.load(os.path.join(load_dir, mcore_checkpoint.CONFIG_FILE))
        dtype = getattr(torch, meta.get("params_dtype", "torch.float32").replace("torch.", ""))
    dtype = dtype if params_dtype == "auto" else DTYPES[params_dtype]
    check_save_dir(save_dir, overwrite)
    model = _build_clip(cfg, tp, dtype)
    if source_format == "hf":
        n = sum(1 for k in model.state_dict() if not k.endswith("_extra_state"))
        get = _Progress(hf_clip.canonical_getter(reader.get, cfg, prefix), n, "reading HF tensors (rank 0)")
        _load_canonical(model, get, ps.get_tensor_model_parallel_rank(), tp, reader.source)
        get.bar.close()
    else:
        mcore_checkpoint.load_model([model], load_dir)
    _log(f"writing torch_dist checkpoint of the vision encoder (TP={tp}) to {save_dir}")
    mcore_checkpoint.save_model([model], save_dir, cfg, model_type="clip", overwrite=overwrite,
                                copy_files_from=load_dir,
                                extra_meta={"source": os.path.abspath(load_dir), "params_dtype": str(dtype),
                                            "hf_prefix": prefix})


def clip_mcore_to_hf(load_dir: str, save_dir: str, overwrite: bool = False, max_shard_bytes: int = 5 * 10**9) -> None:
    """CLIP mcore checkpoint -> HF ``CLIPVisionModel`` (the encoder, ~0.3B parameters, is loaded whole at TP=1)."""
    from megatron_zero.checkpointing import hf_clip, mcore_checkpoint
    from megatron_zero.models.clip_vit import ClipVisionConfig
    from megatron_zero.parallel import sharding
    from megatron_zero.parallel.initialize import is_rank0

    meta = mcore_checkpoint.read_meta(load_dir)
    if meta.get("model_type") != "clip":
        raise CheckpointError(f"--load-dir {load_dir}: holds a {meta.get('model_type')!r} model, not 'clip'")
    cfg = ClipVisionConfig.load(os.path.join(load_dir, mcore_checkpoint.CONFIG_FILE))
    check_save_dir(save_dir, overwrite)
    dtype = getattr(torch, meta.get("params_dtype", "torch.float32").replace("torch.", ""))
    model = _build_clip(cfg, 1, dtype)
    mcore_checkpoint.load_model([model], load_dir)
    if not is_rank0():
        return
    with atomic_directory(save_dir, overwrite) as tmp:
        writer = ShardedSafetensorsWriter(tmp, max_shard_bytes, log=lambda m: _log(m))
        prefix = meta.get("hf_prefix", hf_clip.HF_PREFIX)  # as the source checkpoint named them
        for name, t in hf_clip.iter_hf(sharding.iter_canonical(model), cfg, prefix):
            writer.add(name, t)
        files = writer.close()
        copy_tokenizer_files(load_dir, tmp)
        dtype_name = str(dtype).replace("torch.", "")
        write_config(tmp, {"architectures": ["CLIPVisionModel"], "model_type": "clip_vision_model",
                           **cfg.to_hf_config(), "torch_dtype": dtype_name, "dtype": dtype_name})
    _log(f"wrote {len(files)} safetensors shard(s), {writer.total_bytes / 2**20:.1f} MiB, to {save_dir}")


# ---- entry point --------------------------------------------------------------------------------------------
def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (MB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def convert(args: argparse.Namespace) -> None:
    tp, pp, layers = args.target_tensor_parallel_size, args.target_pipeline_parallel_size, \
        args.target_pipeline_stage_layers
    if args.target_format == "hf" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ParallelConfigError("--target-format hf runs in one process (it streams from the checkpoint); "
                                  "launch it without torchrun")
    if args.model_type == "vlm":
        from megatron_zero.checkpointing.hf_llava import export_hf_llava

        export_hf_llava(args.load_dir, args.save_dir, args.overwrite, args.max_shard_size)
    elif args.model_type == "clip":
        if pp != 1 or layers is not None:
            raise ModelConfigError("--model-type clip: the vision encoder is not pipelined; "
                                   "--target-pipeline-parallel-size must be 1")
        if args.target_format == "hf":
            clip_mcore_to_hf(args.load_dir, args.save_dir, args.overwrite, args.max_shard_size)
        else:
            clip_to_mcore(args.load_dir, args.save_dir, args.source_format, tp, args.overwrite, args.params_dtype)
    elif args.target_format == "hf":
        mcore_to_hf(args.load_dir, args.save_dir, args.overwrite, args.max_shard_size, merge_lora=args.merge_lora)
    elif args.source_format == "hf":
        hf_to_mcore(args.load_dir, args.save_dir, tp, pp, layers, args.overwrite, args.params_dtype)
    else:
        mcore_to_mcore(args.load_dir, args.save_dir, tp, pp, layers, args.overwrite)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        start_rss = peak_rss_mb()
        convert(args)
    except USER_ERRORS as e:
        print(f"{PROG}: error: {e}", file=sys.stderr, flush=True)
        return 2
    peaks = [peak_rss_mb()]
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        peaks = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(peaks, peak_rss_mb())
    _log(f"done: {args.source_format} -> {args.target_format} in {args.save_dir}; peak RSS {max(peaks):.0f} MB "
         f"(largest of {len(peaks)} process(es); {start_rss:.0f} MB before conversion)")
    return 0


if __name__ == "__main__":
    from megatron_zero.errors import run_main

    run_main(main)
