"""CLIP vision encoders: HF ``CLIPVisionModel`` (ViT-L/14-336 layout, or a full ``CLIPModel``) <-> megatron-core
``torch_dist`` at any TP (the encoder is not pipelined). Tokenizer/processor files are carried along; writes are
atomic."""
from __future__ import annotations

import os

import torch

from megatron_zero.checkpointing.convert_common import (
    DTYPES, Progress, check_world, dtype_of, load_canonical, log, num_weights,
)
from megatron_zero.checkpointing.hf_reader import CheckpointFormatError, HFCheckpoint
from megatron_zero.checkpointing.hf_writer import (
    ShardedSafetensorsWriter, atomic_directory, check_save_dir, copy_tokenizer_files, write_config,
)
from megatron_zero.checkpointing.mcore_checkpoint import CheckpointError
from megatron_zero.models.llama import ModelConfigError


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


def build_clip(cfg, tp: int, dtype: torch.dtype):
    """This rank's CLIP tower at TP, uninitialised (every weight is loaded next)."""
    from megatron_zero.models.clip_vit import ClipVisionTransformer
    from megatron_zero.parallel.initialize import initialize_parallel

    for what, n in (("attention heads", cfg.num_attention_heads), ("ffn_hidden_size", cfg.ffn_hidden_size)):
        if n % tp:
            raise ModelConfigError(f"--target-tensor-parallel-size {tp} does not divide the encoder's {what} ({n})")
    check_world(tp, 1)
    initialize_parallel(tp, 1)
    return ClipVisionTransformer(cfg, tp, params_dtype=dtype, bf16=dtype == torch.bfloat16, use_te=False,
                                 initialize_weights=False)


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
        dtype = dtype_of(meta)
    dtype = dtype if params_dtype == "auto" else DTYPES[params_dtype]
    check_save_dir(save_dir, overwrite)
    model = build_clip(cfg, tp, dtype)
    if source_format == "hf":
        get = Progress(hf_clip.canonical_getter(reader.get, cfg, prefix), num_weights(model),
                       "reading HF tensors (rank 0)")
        load_canonical(model, get, ps.get_tensor_model_parallel_rank(), tp, reader.source)
        get.bar.close()
    else:
        mcore_checkpoint.load_model([model], load_dir)
    log(f"writing torch_dist checkpoint of the vision encoder (TP={tp}) to {save_dir}")
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
    dtype = dtype_of(meta)
    model = build_clip(cfg, 1, dtype)
    mcore_checkpoint.load_model([model], load_dir)
    if not is_rank0():
        return
    with atomic_directory(save_dir, overwrite) as tmp:
        writer = ShardedSafetensorsWriter(tmp, max_shard_bytes, log=lambda m: log(m))
        prefix = meta.get("hf_prefix", hf_clip.HF_PREFIX)  # as the source checkpoint named them
        for name, t in hf_clip.iter_hf(sharding.iter_canonical(model), cfg, prefix):
            writer.add(name, t)
        files = writer.close()
        copy_tokenizer_files(load_dir, tmp)
        dtype_name = str(dtype).replace("torch.", "")
        write_config(tmp, {"architectures": ["CLIPVisionModel"], "model_type": "clip_vision_model",
                           **cfg.to_hf_config(), "torch_dtype": dtype_name, "dtype": dtype_name})
    log(f"wrote {len(files)} safetensors shard(s), {writer.total_bytes / 2**20:.1f} MiB, to {save_dir}")
