"""Prompt requests for ``tools/generate.py``: JSONL in, answers out, with a VLM checkpoint any kind resolves to.

``--prompts`` is JSONL, one request a line: ``{"id": ..., "prompt": "...", "images": ["a.jpg", ...]}``. Each
``<image>`` in the prompt marks where an image goes; a prompt without tags gets one ``<image>\\n`` per image in
front (LLaVA's layout). Image paths are relative to the JSONL file. :func:`answer_requests` wraps each prompt in
the decoder's chat template (user turn + assistant header) and answers in batches, greedy/sampled
(:func:`~megatron_zero.inference.generate.generate`) or yes/no (:func:`~megatron_zero.inference.generate.answer_yes_no`).
"""
from __future__ import annotations

import json
import os
from typing import Optional, Sequence

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


def answer_requests(model, tokenizer, template, requests: Sequence[dict], options, batch_size: int = 8,
                    binary: bool = False, yes_words: Sequence[str] = ("yes", "Yes"),
                    no_words: Sequence[str] = ("no", "No"), dtype=None, progress: bool = True) -> list[dict]:
    """``{"id", "text"}`` per request (+ ``logprob_yes``/``logprob_no`` when ``binary``), in input order."""
    import torch
    from tqdm import tqdm

    from megatron_zero.data.chat_template import Message
    from megatron_zero.data.images import load_image
    from megatron_zero.inference.generate import answer_yes_no, generate

    cfg = model.cfg
    dtype = dtype or next(model.parameters()).dtype
    yes_ids = [tokenizer.encode(w)[0] for w in yes_words]
    no_ids = [tokenizer.encode(w)[0] for w in no_words]
    results: list[dict] = []
    for start in tqdm(range(0, len(requests), batch_size), desc="generating", disable=not progress):
        batch = requests[start:start + batch_size]
        prompts = [template.encode([Message("user", r["prompt"])], add_generation_prompt=True).input_ids for r in batch]
        images = [torch.stack([load_image(x, cfg.vision.image_size) for x in r["images"]]).to(dtype)
                  if r["images"] else None for r in batch]
        if binary:
            for r, a in zip(batch, answer_yes_no(model, prompts, images, yes_ids, no_ids)):
                results.append({"id": r["id"], "text": a.answer, "logprob_yes": a.logprob_yes,
                                "logprob_no": a.logprob_no})
        else:
            stops = set(template.stop_token_ids)
            for r, ids in zip(batch, generate(model, prompts, images, options, template.stop_token_ids)):
                results.append({"id": r["id"], "text": tokenizer.decode([t for t in ids if t not in stops])})
    return results


def write_jsonl(records: Sequence[dict], path: Optional[str]) -> None:
    """JSON lines to ``path`` ('-' or None: stdout)."""
    import sys

    out = sys.stdout if path in (None, "-") else open(path, "w")
    for rec in records:
        out.write(json.dumps(rec) + "\n")
    if out is not sys.stdout:
        out.close()
