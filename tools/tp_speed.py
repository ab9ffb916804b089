#!/usr/bin/env python
"""TP=2 on CPU (2 processes) vs TP=1 (1 process), the same tiny pretrain_lm run, alternating; prints the step
times and their ratio per round. Method: megatron_zero_dev/tp_speed.py.

    python tools/tp_speed.py                 # tiny, seq 128, global batch 16, micro-batch 1, 3 rounds
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    from megatron_zero_dev.tp_speed import TPSpeedConfig, run_pairs

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(TPSpeedConfig):
        p.add_argument("--" + f.name.replace("_", "-"), type=int if f.type == "int" else str, default=f.default)
    args = p.parse_args(argv)
    cfg = TPSpeedConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TPSpeedConfig)})
    res = run_pairs(cfg)
    load = ", ".join(f"{x:.1f}" for x in res["load_average"])
    print(f"TP=2 / TP=1 step time: median ratio {res['median_ratio']:.2f} over {cfg.rounds} alternating rounds "
          f"({res['cpus']} CPUs, load average {load}: on a shared machine the ratios are noisy)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
