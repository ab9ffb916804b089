#!/usr/bin/env python
"""Import the authors' released checkpoints (facebookresearch/zero ``.pth``) -- see
:mod:`megatron_zero.checkpointing.zero_import` for the file layout and the name mapping.

The 70B encoder (trained on the surrogate of Llama-3.1-70B-Instruct with ``translators_range = range(40, 79)``)::

    python tools/import_zero_checkpoint.py --clip clip-vit-large-patch14-336 \\
        --encoder-file llama3.1-70b_surrogate-trained-encoder/ckpt_01_0004880.pth \\
        --target Llama-3.1-70B-Instruct --translator-range 40:78 --output-encoder ckpt/zero-70b-encoder
    python tools/graft.py --encoder ckpt/zero-70b-encoder --target Llama-3.1-70B-Instruct --output ckpt/vlm-70b

Their stage-1 translator into a surrogate built by ``tools/build_surrogate.py`` (to continue training here)::

    python tools/import_zero_checkpoint.py --translator-file llama3.1-70b_adapter_translator/ckpt_01_0004393.pth \\
        --surrogate llama-70b-T40-78 --output-surrogate llama-70b-T40-78-zero

Exit status 2 with a one-line error on bad input; outputs are written to a temporary directory and renamed.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PROG = "import_zero_checkpoint.py"


def build_parser() -> argparse.ArgumentParser:
    from megatron_zero.arguments import ArgumentParser

    p = ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--encoder-file", default=None, help="their stage-2 .pth (surrogate-trained encoder)")
    p.add_argument("--translator-file", default=None, help="their stage-1 .pth (adapter + translator)")
    p.add_argument("--clip", default=None, help="HF CLIP directory their encoder starts from "
                                                "(openai/clip-vit-large-patch14-336)")
    p.add_argument("--target", default=None, help="HF Llama target directory (the surrogate's provenance)")
    p.add_argument("--translator-range", action="append", default=None, metavar="S:E",
                   help="replaced layers S..E inclusive, their translators_range range(S, E+1); repeat for several")
    p.add_argument("--num-translators", type=int, default=1, help="their num_translators (per range)")
    p.add_argument("--surrogate", default=None,
                   help="HF surrogate from tools/build_surrogate.py (instead of --target/--translator-range for "
                        "the encoder's provenance; required with --output-surrogate)")
    p.add_argument("--output-encoder", default=None, help="image-encoder checkpoint directory to write")
    p.add_argument("--output-surrogate", default=None, help="surrogate directory to write, with their translator")
    p.add_argument("--image-token-id", type=int, default=128002,
                   help="image placeholder id (their <|reserved_special_token_0|> = 128002)")
    p.add_argument("--max-shard-size", default="5GB", help="(--output-surrogate) safetensors shard size")
    p.add_argument("--overwrite", action="store_true")
    return p


def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    from megatron_zero.checkpointing import zero_import

    if not (args.output_encoder or args.output_surrogate):
        p.error("give --output-encoder and/or --output-surrogate")
    if args.output_encoder and not args.clip:
        p.error("--output-encoder needs --clip (the HF CLIP directory their encoder was fine-tuned from)")
    if args.output_encoder and not (args.encoder_file or args.translator_file):
        p.error("--output-encoder needs --encoder-file and/or --translator-file")
    if args.output_surrogate and not (args.translator_file and args.surrogate):
        p.error("--output-surrogate needs --translator-file and --surrogate")
    ranges = [zero_import.parse_range(r) for r in args.translator_range or []]
    result = {}
    if args.output_encoder:
        meta = zero_import.import_encoder(
            args.clip, args.output_encoder, encoder_file=args.encoder_file, translator_file=args.translator_file,
            target=args.target, ranges=ranges, num_translators=args.num_translators, surrogate=args.surrogate,
            image_token_id=args.image_token_id, overwrite=args.overwrite)
        result["encoder"] = {"output": args.output_encoder, "trained_with": meta["trained_with"]["name"]}
    if args.output_surrogate:
        record = zero_import.import_translator(args.translator_file, args.surrogate, args.output_surrogate,
                                               args.overwrite, args.max_shard_size,
                                               log=lambda m: print(f"[{PROG}] {m}", file=sys.stderr))
        result["surrogate"] = {"output": args.output_surrogate, "layers": record["layers"]}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    from megatron_zero.errors import run_main

    run_main(main)
