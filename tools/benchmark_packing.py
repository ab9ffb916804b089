#!/usr/bin/env python
"""Padded vs packed VLM training on a LLaVA-1.5-shaped length mix: real-token fraction and real tokens/s, side by
side in one run (steps alternate). The mix and the method: megatron_zero_dev/packing_benchmark.py.

    python tools/benchmark_packing.py                     # CPU: seq 4096 / 16 = 256, 36 image positions
    python tools/benchmark_packing.py --seq-length 4096 --num-image-tokens 579 --scale 1 --hidden-size 4096 ...
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build_parser():
    from megatron_zero_dev.packing_benchmark import PackingBenchmarkConfig

    d = PackingBenchmarkConfig()
    from megatron_zero.arguments import ArgumentParser

    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name in ("seq_length", "num_image_tokens", "scale", "global_batch_size", "micro_batch_size", "num_samples",
                 "rounds", "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                 "vocab_size", "seed"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(d, name))
    p.add_argument("--output-json", default=None)
    p.add_argument("--check-goals", action="store_true",
                   help="exit 1 unless packed rows are >= 95%% real tokens and >= 2.5x padded real tokens/s")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from megatron_zero import platform
    from megatron_zero.config import ConfigError
    from megatron_zero.parallel import initialize
    from megatron_zero_dev import packing_benchmark as pb

    cfg = pb.PackingBenchmarkConfig(**{f.name: getattr(args, f.name)
                                       for f in dataclasses.fields(pb.PackingBenchmarkConfig)})
    if cfg.seq_length < 1 or cfg.global_batch_size % cfg.micro_batch_size:
        raise ConfigError(f"--global-batch-size {cfg.global_batch_size} must be a multiple of "
                          f"--micro-batch-size {cfg.micro_batch_size}")
    initialize.initialize_parallel(1, 1, seed=cfg.seed)
    mix = pb.length_mix_summary(pb.llava_length_mix(cfg.num_samples, cfg.seq_length, cfg.num_image_tokens, cfg.scale,
                                                    cfg.seed, cfg.vocab_size), cfg.num_image_tokens, cfg.seq_length)
    print(f"packing benchmark: {platform.summary()} | seq {cfg.seq_length}, {cfg.num_image_tokens} image positions "
          f"(4096/579 scaled 1/{cfg.scale}) | global batch {cfg.global_batch_size} samples, micro batch "
          f"{cfg.micro_batch_size} rows | decoder {cfg.num_layers} layers x {cfg.hidden_size}", flush=True)
    print("length mix: " + ", ".join(f"{k} {100 * v:.0f}%" for k, v in mix["kinds"].items()) +
          f" | expanded length mean {mix['mean_length']:.0f}, median {mix['p50']:.0f}, p99 {mix['p99']:.0f}, "
          f"max {mix['max']}", flush=True)
    result = pb.run_packing_benchmark(cfg, log=lambda m: print(m, flush=True))
    result["length_mix"] = mix
    print(pb.format_summary(result), flush=True)
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(result, f, indent=2)
    initialize.destroy_parallel()
    failed = pb.check_goals(result) if args.check_goals else None
    if failed:
        print(f"goal not met: {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    from megatron_zero.errors import run_main

    run_main(main)
