#!/usr/bin/env python
"""What checkpoints cost: stage-2 trainable-only bytes vs full, async-save stall vs synchronous save time (side by
side in one run), and a projection for the 70B recipe. Prints the figures as JSON.

    python tools/checkpoint_cost.py --scale 32 --reps 3 --bandwidth-gbs 10

The measurements are :mod:`megatron_zero_dev.checkpoint_cost`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None) -> int:
    from megatron_zero_dev.checkpoint_cost import run

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scale", type=int, default=32, help="divide the 70B recipe's widths by this")
    p.add_argument("--reps", type=int, default=3, help="synchronous/asynchronous saves, alternating")
    p.add_argument("--bandwidth-gbs", type=float, default=10.0, help="filesystem bandwidth for the 70B projection")
    p.add_argument("--workdir", default="/tmp/megatron_zero_checkpoint_cost")
    args = p.parse_args(argv)
    for flag in ("scale", "reps", "bandwidth_gbs"):
        if getattr(args, flag) <= 0:
            p.error(f"--{flag.replace('_', '-')} must be > 0")
    print(json.dumps(run(args.scale, args.reps, args.bandwidth_gbs, args.workdir,
                         log=lambda m: print(m, flush=True)), indent=1))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, REPO)
    from megatron_zero.errors import run_main

    run_main(main, prog="checkpoint_cost.py")
