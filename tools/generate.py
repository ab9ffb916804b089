#!/usr/bin/env python
"""Image(s) + prompt -> text with a VLM checkpoint (tools/graft.py output, a training run or its <save>/export).

    python tools/generate.py --pretrained-checkpoint ckpt/vlm_70b --prompts prompts.jsonl --output answers.jsonl
    torchrun --nproc-per-node 8 tools/generate.py --tensor-model-parallel-size 8 --bf16 ...

``--prompts`` is JSONL, one request a line: ``{"id": ..., "prompt": "...", "images": ["a.jpg", ...]}``. Each
``<image>`` in the prompt marks where an image goes; a prompt without tags gets one ``<image>\\n`` per image in
front (LLaVA's layout). The prompt is wrapped in the decoder's chat template (user turn + assistant header).
Greedy by default (``--temperature``/``--top-p`` to sample), KV-cached (megatron-core static inference context).
``--binary`` answers yes/no benchmarks by comparing the log-likelihoods of "yes" and "no" as the first answer token.
Output JSONL: ``{"id", "text"}`` (+ ``"logprob_yes"``, ``"logprob_no"`` with ``--binary``), in input order.
Exit status 2 on bad input. The logic is :mod:`megatron_zero.inference.requests` (requests, batching) and
:mod:`megatron_zero.inference.generate` (decoding); the checkpoint is found by
:func:`megatron_zero.checkpointing.resolve.resolve_checkpoint`.
"""
from __future__ import annotations

import argparse
import os
import sys

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_zero.arguments import positive_int  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    from megatron_zero import arguments

    p = arguments.ArgumentParser(description=__doc__.split("\n\n")[0])
    arguments.add_pretrained_checkpoint_arg(p, required=True, old=["--checkpoint"],
                                            help="VLM checkpoint: graft output, a training run or its export/")
    p.add_argument("--tokenizer", default=None, help="tokenizer file or directory (default: the checkpoint's decoder/)")
    p.add_argument("--chat-family", default=None, help="chat template family (default: detected from the tokenizer)")
    p.add_argument("--prompt-format", default="meta", choices=["meta", "zero"],
                   help="meta: the family's chat format; zero: the authors' Llama-3 format and image prompt")
    p.add_argument("--prompts", required=True, help="JSONL requests")
    p.add_argument("--output", default="-", help="JSONL answers ('-' = stdout)")
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--max-new-tokens", type=positive_int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--binary", action="store_true", help="answer yes/no by comparing first-token log-likelihoods")
    p.add_argument("--yes-words", default="yes,Yes", help="spellings of 'yes' for --binary")
    p.add_argument("--no-words", default="no,No", help="spellings of 'no' for --binary")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    arguments.add_precision_args(p)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    from megatron_zero.checkpointing.resolve import VLM_KINDS, load_vlm, resolve_checkpoint
    from megatron_zero.data.chat_template import chat_template_for
    from megatron_zero.data.tokenizers import load_tokenizer
    from megatron_zero.inference.generate import SamplingOptions
    from megatron_zero.inference.requests import answer_requests, read_requests, write_jsonl
    from megatron_zero.models.llama import RuntimeOptions
    from megatron_zero.parallel.initialize import destroy_parallel, initialize_parallel, is_rank0

    requests = read_requests(args.prompts)
    options = SamplingOptions(args.max_new_tokens, args.temperature, args.top_p, args.seed)
    ckpt = resolve_checkpoint(args.pretrained_checkpoint, "--pretrained-checkpoint", accept=VLM_KINDS)
    cfg = ckpt.vlm_config
    tokenizer = load_tokenizer(args.tokenizer or ckpt.tokenizer_dir or ckpt.root)
    template = chat_template_for(tokenizer, args.chat_family, image_placeholder=cfg.image_token_id,
                                 prompt_format=args.prompt_format, model_family=cfg.decoder.family)
    initialize_parallel(args.tensor_model_parallel_size, 1, seed=args.seed)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    model = load_vlm(ckpt, RuntimeOptions(tensor_model_parallel_size=args.tensor_model_parallel_size,
                                          params_dtype=dtype, bf16=args.bf16))
    results = answer_requests(model, tokenizer, template, requests, options, args.batch_size, args.binary,
                              args.yes_words.split(","), args.no_words.split(","), dtype, progress=is_rank0())
    if is_rank0():
        write_jsonl(results, args.output)
    destroy_parallel()
    return 0


if __name__ == "__main__":
    from megatron_zero.errors import run_main

    run_main(main)
