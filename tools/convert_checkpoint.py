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

The conversions are library functions (:mod:`megatron_zero.checkpointing.convert`, ``convert_llama``,
``convert_clip``, ``hf_llava``); this is their command line.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from megatron_zero.arguments import positive_int  # noqa: E402
from megatron_zero.checkpointing.convert import convert_checkpoint  # noqa: E402
from megatron_zero.checkpointing.convert_common import DTYPES, PROG, log, peak_rss_mb  # noqa: E402
from megatron_zero.checkpointing.hf_writer import parse_size  # noqa: E402


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    from megatron_zero.arguments import ArgumentParser

    p = ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load-dir", required=True, help="source checkpoint directory")
    p.add_argument("--save-dir", required=True, help="target checkpoint directory (written atomically)")
    p.add_argument("--source-format", choices=("hf", "mcore", "vlm"), required=True,
                   help="vlm: a VLM checkpoint (tools/graft.py output), exported with --model-type vlm")
    p.add_argument("--target-format", choices=("hf", "mcore"), required=True)
    p.add_argument("--model-type", choices=("llama", "clip", "vlm"), default="llama",
                   help="vlm: VLM checkpoint -> HF LlavaForConditionalGeneration (LLaVA feature convention only)")
    p.add_argument("--target-tensor-parallel-size", type=positive_int, default=1)
    p.add_argument("--target-pipeline-parallel-size", type=positive_int, default=1)
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


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    start_rss = peak_rss_mb()
    convert_checkpoint(args.load_dir, args.save_dir, args.source_format, args.target_format, args.model_type,
                       args.target_tensor_parallel_size, args.target_pipeline_parallel_size,
                       args.target_pipeline_stage_layers, args.params_dtype, args.max_shard_size, args.overwrite,
                       merge_lora=args.merge_lora)
    peaks = [peak_rss_mb()]
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        peaks = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(peaks, peak_rss_mb())
    log(f"done: {args.source_format} -> {args.target_format} in {args.save_dir}; peak RSS {max(peaks):.0f} MB "
        f"(largest of {len(peaks)} process(es); {start_rss:.0f} MB before conversion)")
    return 0


if __name__ == "__main__":
    from megatron_zero.errors import run_main

    run_main(main)
