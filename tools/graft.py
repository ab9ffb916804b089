#!/usr/bin/env python
"""Zero-shot grafting: an image encoder trained on a surrogate + the surrogate's target decoder -> a VLM checkpoint.

    python tools/graft.py --encoder ckpt/encoder_on_srgt --target Llama-3.1-70B-Instruct --output ckpt/vlm_70b

No training and no model is built: the encoder (+adapter, start/end-of-image embeddings) and the target's HF
files are placed side by side, unchanged (see :mod:`megatron_zero.checkpointing.vlm_checkpoint` for the formats). The surrogate
provenance recorded with the encoder is checked against the target (same target, hidden size, vocabulary size,
word-embedding table, tokenizer); a mismatch is refused with every reason listed, unless ``--force``.
Exit status 2 on bad input.
"""
from __future__ import annotations

import json
import sys


def main(argv=None) -> int:
    from megatron_zero.grafting import graft

    from megatron_zero.arguments import ArgumentParser

    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--encoder", required=True,
                   help="image-encoder checkpoint (trained on a surrogate), or the training run / export / iter_* "
                        "holding it")
    p.add_argument("--target", required=True, help="target decoder: HF Llama directory (config.json + safetensors)")
    p.add_argument("--output", required=True, help="VLM checkpoint directory to write")
    p.add_argument("--force", action="store_true", help="graft even if the provenance checks fail")
    p.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    args = p.parse_args(argv)
    record = graft(args.encoder, args.target, args.output, force=args.force, overwrite=args.overwrite)
    for note in record.get("notes", []):
        print(f"graft.py: note: {note}", file=sys.stderr)
    for problem in record["problems"]:
        print(f"graft.py: warning (forced): {problem}", file=sys.stderr)
    print(json.dumps({"output": args.output, "forced": record["forced"]}))
    return 0


if __name__ == "__main__":
    from megatron_zero.errors import run_main

    run_main(main)
