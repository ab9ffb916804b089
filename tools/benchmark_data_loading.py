#!/usr/bin/env python
"""The training loader over a LLaVA JSON + image folder vs over prepared shards (tools/prepare_data.py), side by side
in one run on the same data: samples/s and files opened per 1,000 samples (counted by an audit hook on every open).
Method: megatron_zero_dev/data_loading.py; numbers: docs/data.md.

    python tools/benchmark_data_loading.py                          # 2000 images, 4 alternating rounds of 250
    python tools/benchmark_data_loading.py --num-images 500 --samples-per-round 100 --output-json out.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build_parser() -> argparse.ArgumentParser:
    from megatron_zero_dev.data_loading import DataLoadingConfig

    d = DataLoadingConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name in ("num_images", "min_side", "max_side", "samples_per_round", "rounds", "image_size", "seed"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(d, name))
    p.add_argument("--workdir", default=None, help="where the temporary data goes (default: the system's temp dir)")
    p.add_argument("--output-json", default=None)
    return p


def main(argv=None) -> int:
    from megatron_zero_dev.data_loading import DataLoadingConfig, run

    args = build_parser().parse_args(argv)
    cfg = DataLoadingConfig(**{k: v for k, v in vars(args).items() if k not in ("workdir", "output_json")})
    if cfg.samples_per_round * cfg.rounds > cfg.num_images:
        raise SystemExit(f"error: --samples-per-round x --rounds = {cfg.samples_per_round * cfg.rounds} exceeds "
                         f"--num-images {cfg.num_images} (one epoch)")
    result = run(cfg, args.workdir)
    print(json.dumps(result, indent=2))
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    from megatron_zero.errors import run_main

    run_main(main, prog="benchmark_data_loading.py")
