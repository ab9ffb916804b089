"""Checkpoint conversion between HuggingFace and megatron-core ``torch_dist``, at any TP/PP: the dispatch
:func:`convert_checkpoint` behind ``tools/convert_checkpoint.py``.

One module per format: :mod:`~megatron_zero.checkpointing.convert_llama` (HF Llama <-> mcore, mcore -> mcore),
:mod:`~megatron_zero.checkpointing.convert_clip` (HF CLIP vision tower <-> mcore) and
:mod:`~megatron_zero.checkpointing.hf_llava` (a VLM -> HF ``LlavaForConditionalGeneration``); what they share is in
:mod:`~megatron_zero.checkpointing.convert_common`.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Optional

from megatron_zero.checkpointing import convert_clip, convert_llama
from megatron_zero.models.llama import ModelConfigError
from megatron_zero.parallel.initialize import ParallelConfigError


def convert_checkpoint(load_dir: str, save_dir: str, source_format: str, target_format: str,
                       model_type: str = "llama", tp: int = 1, pp: int = 1,
                       stage_layers: Optional[Sequence[int]] = None, params_dtype: str = "auto",
                       max_shard_bytes: int = 5 * 10**9, overwrite: bool = False, merge_lora: bool = False) -> None:
    """Convert ``load_dir`` (``source_format``: hf | mcore | vlm) to ``target_format`` (hf | mcore) in ``save_dir``.

    ``load_dir`` may be anything :func:`~megatron_zero.checkpointing.resolve.resolve_checkpoint` recognises that
    holds the requested model (e.g. a training run or its ``export`` for ``--source-format mcore``/``vlm``)."""
    from megatron_zero.checkpointing.resolve import conversion_source

    if model_type != "vlm":
        load_dir = conversion_source(load_dir, source_format, model_type)
    if target_format == "hf" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ParallelConfigError("--target-format hf runs in one process (it streams from the checkpoint); "
                                  "launch it without torchrun")
    if model_type == "vlm":
        from megatron_zero.checkpointing.hf_llava import export_hf_llava

        export_hf_llava(load_dir, save_dir, overwrite, max_shard_bytes, merge_lora=merge_lora)
    elif model_type == "clip":
        if pp != 1 or stage_layers is not None:
            raise ModelConfigError("--model-type clip: the vision encoder is not pipelined; "
                                   "--target-pipeline-parallel-size must be 1")
        if target_format == "hf":
            convert_clip.clip_mcore_to_hf(load_dir, save_dir, overwrite, max_shard_bytes)
        else:
            convert_clip.clip_to_mcore(load_dir, save_dir, source_format, tp, overwrite, params_dtype)
    elif target_format == "hf":
        convert_llama.mcore_to_hf(load_dir, save_dir, overwrite, max_shard_bytes, merge_lora=merge_lora)
    elif source_format == "hf":
        convert_llama.hf_to_mcore(load_dir, save_dir, tp, pp, stage_layers, overwrite, params_dtype)
    else:
        convert_llama.mcore_to_mcore(load_dir, save_dir, tp, pp, stage_layers, overwrite)
