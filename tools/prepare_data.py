#!/usr/bin/env python
"""LLaVA-1.5 JSON + image folder -> a sharded megatron-energon WebDataset that ``pretrain_vlm --data-path`` reads.

    python tools/prepare_data.py --data-path llava.json --image-root images/ --output-dir shards/
    python -m megatron_zero.training.pretrain_vlm ... --data-path shards/        # no --image-root

Size-bounded tar shards with index files, every distinct image stored once, indexed by Energon's own prepare step
(``.nv-meta/``); an interrupted run resumes when started again with the same arguments. Layout and reader:
megatron_zero/data/shards.py; usage and numbers: docs/data.md.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build_parser() -> argparse.ArgumentParser:
    from megatron_zero.data.shards import DEFAULT_MAX_SHARD_BYTES

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-path", required=True, help="LLaVA-1.5 JSON")
    p.add_argument("--image-root", default=None, help="directory the JSON's image paths are relative to "
                                                      "(default: the JSON's directory)")
    p.add_argument("--output-dir", required=True, help="new (or interrupted) output directory")
    p.add_argument("--max-shard-bytes", type=int, default=DEFAULT_MAX_SHARD_BYTES,
                   help=f"upper bound on a shard's size (default {DEFAULT_MAX_SHARD_BYTES}: 1 GiB)")
    p.add_argument("--workers", type=int, default=4, help="processes of Energon's indexing step")
    return p


def main(argv=None) -> int:
    from megatron_zero.data.shards import prepare_shards

    args = build_parser().parse_args(argv)
    summary = prepare_shards(args.data_path, args.image_root, args.output_dir, args.max_shard_bytes, args.workers)
    print(f"prepared {args.output_dir}: {summary['records']} records, {summary['images']} distinct images, "
          f"{summary['conversation_shards']} conversation + {summary['image_shards']} image shards, "
          f"{summary['bytes'] / 2**20:.1f} MiB; train with --data-path {args.output_dir}")
    return 0


if __name__ == "__main__":
    from megatron_zero.errors import run_main

    run_main(main, prog="prepare_data.py")
