#!/usr/bin/env python
"""Image(s) + prompt -> text with a VLM checkpoint (e.g. from tools/graft.py).

    python tools/generate.py --checkpoint ckpt/vlm_70b --prompts prompts.jsonl --output answers.jsonl
    torchrun --nproc-per-node 8 tools/generate.py --tensor-model-parallel-size 8 --bf16 ...

``--prompts`` is JSONL, one request a line: ``{"id": ..., "prompt": "...", "images": ["a.jpg", ...]}``. Each
``<image>`` in the prompt marks where an image goes; a prompt without tags gets one ``<image>\\n`` per image in
front (LLaVA's layout). The prompt is wrapped in the decoder's chat template (user turn + assistant header).
Greedy by default (``--temperature``/``--top-p`` to sample), KV-cached (megatron-core static inference context).
``--binary`` answers yes/no benchmarks by comparing the log-likelihoods of "yes" and "no" as the first answer token.
Output JSONL: ``{"id", "text"}`` (+ ``"logprob_yes"``, ``"logprob_no"`` with ``--binary``), in input order.
Exit status 2 on bad input.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from megatron_zero.arguments import positive_int
from megatron_zero.errors import UserError


class RequestError(UserError, ValueError):
    pass


def read_requests(path: str) -> list[dict]:
    requests = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise RequestError(f"{path}:{n}: not valid JSON ({e})") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str):
                raise RequestError(f"{path}:{n}: expected an object with a string 'prompt'")
            images = rec.get("images", [])
            if not isinstance(images, list) or not all(isinstance(x, str) for x in images):
                raise RequestError(f"{path}:{n}: 'images' must be a list of file paths")
            prompt = rec["prompt"]
            tags = prompt.count("<image>")
            if tags == 0 and images:
                prompt = "<image>\n" * len(images) + prompt
            elif tags != len(images):
                raise RequestError(f"{path}:{n}: the prompt has {tags} <image> tags but {len(images)} images")
            base = os.path.dirname(os.path.abspath(path))
            requests.append({"id": rec.get("id", n), "prompt": prompt,
                             "images": [x if os.path.isabs(x) else os.path.join(base, x) for x in images]})
    if not requests:
        raise RequestError(f"{path}: no requests")
    return requests


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="VLM checkpoint directory (vlm_config.json, encoder, decoder/)")
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
    p.add_argument("--bf16", action="store_true")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    import torch
    from tqdm import tqdm

    from megatron_zero.data.chat_template import Message, chat_template_for
    from megatron_zero.data.images import load_image
    from megatron_zero.data.tokenizers import load_tokenizer
    from megatron_zero.inference.generate import SamplingOptions, answer_yes_no, generate
    from megatron_zero.checkpointing.vlm_checkpoint import DECODER_DIR, VLMCheckpointError, load_vlm_checkpoint
    from megatron_zero.models.llama import RuntimeOptions
    from megatron_zero.models.vlm import build_vlm, load_vlm_canonical
    from megatron_zero.parallel.initialize import destroy_parallel, initialize_parallel, is_rank0

    try:
        requests = read_requests(args.prompts)
        options = SamplingOptions(args.max_new_tokens, args.temperature, args.top_p, args.seed)
        cfg, encoder, decoder = load_vlm_checkpoint(args.checkpoint)
        tokenizer = load_tokenizer(args.tokenizer or os.path.join(args.checkpoint, DECODER_DIR))
        template = chat_template_for(tokenizer, args.chat_family, image_placeholder=cfg.image_token_id,
                                     prompt_format=args.prompt_format)
    except (RequestError, VLMCheckpointError, ValueError, FileNotFoundError) as e:
        print(f"generate.py: error: {e}", file=sys.stderr)
        return 2
    initialize_parallel(args.tensor_model_parallel_size, 1, seed=args.seed)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    model = build_vlm(cfg, RuntimeOptions(tensor_model_parallel_size=args.tensor_model_parallel_size,
                                          params_dtype=dtype, bf16=args.bf16, initialize_weights=False))
    load_vlm_canonical(model, encoder, decoder, source=args.checkpoint)
    yes_ids = [tokenizer.encode(w)[0] for w in args.yes_words.split(",")]
    no_ids = [tokenizer.encode(w)[0] for w in args.no_words.split(",")]
    results = []
    batches = range(0, len(requests), args.batch_size)
    for start in tqdm(batches, desc="generating", disable=not is_rank0()):
        batch = requests[start:start + args.batch_size]
        prompts = [template.encode([Message("user", r["prompt"])], add_generation_prompt=True).input_ids for r in batch]
        images = [torch.stack([load_image(x, cfg.vision.image_size) for x in r["images"]]).to(dtype)
                  if r["images"] else None for r in batch]
        if args.binary:
            for r, a in zip(batch, answer_yes_no(model, prompts, images, yes_ids, no_ids)):
                results.append({"id": r["id"], "text": a.answer, "logprob_yes": a.logprob_yes, "logprob_no": a.logprob_no})
        else:
            stops = set(template.stop_token_ids)
            for r, ids in zip(batch, generate(model, prompts, images, options, template.stop_token_ids)):
                results.append({"id": r["id"], "text": tokenizer.decode([t for t in ids if t not in stops])})
    if is_rank0():
        out = sys.stdout if args.output == "-" else open(args.output, "w")
        for rec in results:
            out.write(json.dumps(rec) + "\n")
        if out is not sys.stdout:
            out.close()
    destroy_parallel()
    return 0


if __name__ == "__main__":
    from megatron_zero.errors import run_main

    run_main(main)
