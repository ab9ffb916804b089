#!/usr/bin/env python
"""Our CPU/GPU training step vs plain transformers ``LlamaForCausalLM`` on the same Llama, alternating in one run;
prints both tokens/s and the ratio. Method: megatron_zero_dev/speed_comparison.py.

    python tools/compare_speed.py                  # 4 layers, hidden 512, ffn 1536, 8/2 heads, vocab 32000,
                                                   # seq 256, batch 8, fp32, AdamW
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    from megatron_zero_dev.speed_comparison import SpeedConfig, format_result, run_comparison

    d = SpeedConfig()
    from megatron_zero.arguments import ArgumentParser

    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
              "vocab_size", "seq_length", "batch_size", "rounds", "warmup", "seed"):
        p.add_argument("--" + f.replace("_", "-"), type=int, default=getattr(d, f))
    p.add_argument("--attn-implementation", default=d.attn_implementation, choices=["eager", "sdpa"],
                   help="transformers' attention")
    p.add_argument("--distributed-optimizer", action="store_true",
                   help="ours with --use-distributed-optimizer (default: pretrain_lm's default, the plain optimizer)")
    p.add_argument("--clip-grad", type=float, default=d.clip_grad, help="both sides (0: off)")
    p.add_argument("--output-json", default=None)
    args = p.parse_args(argv)
    from megatron_zero.config import ConfigError

    cfg = SpeedConfig(**{k: v for k, v in vars(args).items() if k in SpeedConfig.__dataclass_fields__})
    if cfg.num_attention_heads % cfg.num_query_groups or cfg.hidden_size % cfg.num_attention_heads:
        raise ConfigError(f"--num-attention-heads {cfg.num_attention_heads} must divide --hidden-size "
                          f"{cfg.hidden_size} and be a multiple of --num-query-groups {cfg.num_query_groups}")
    from megatron_zero import platform
    from megatron_zero.parallel import initialize

    initialize.initialize_parallel(1, 1, seed=cfg.seed)
    print(f"compare_speed: {platform.summary()} | {cfg.num_layers} layers, hidden {cfg.hidden_size}, "
          f"ffn {cfg.ffn_hidden_size}, heads {cfg.num_attention_heads}/{cfg.num_query_groups}, vocab {cfg.vocab_size}, "
          f"seq {cfg.seq_length}, batch {cfg.batch_size}, fp32, AdamW, clip {cfg.clip_grad} | transformers "
          f"{cfg.attn_implementation} attention", flush=True)
    result = run_comparison(cfg, log=lambda m: print(m, flush=True))
    print(format_result(result), flush=True)
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(result, f, indent=2)
    initialize.destroy_parallel()
    return 0


if __name__ == "__main__":
    from megatron_zero.errors import run_main

    run_main(main)
