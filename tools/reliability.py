#!/usr/bin/env python
"""Reliability trials: random kill -9 / SIGUSR1 / SIGTERM interruptions of small training runs, then resume;
and bad inputs to the entry points. Prints the figures.

    python tools/reliability.py --trials 10 --workdir /tmp/reliability

Each trial picks a launcher (``megatron_zero.launcher`` or plain ``torchrun``), TP=1 or 2 (2 processes), the
distributed or plain optimizer, and an interruption (``kill -9`` of the launcher and every rank — a lost node —,
SIGUSR1 or SIGTERM to the launcher) at a random moment (also during saves: ``--save-interval 1``). The run is then
resumed to the end and its losses compared with an uninterrupted run of the same configuration.

Figures: trials, exact resumes (every iteration's loss equal to the reference), steps lost (iterations
re-computed after the resume), exit codes as documented (75 for a signal through our launcher), bad inputs tried,
clear errors (non-zero exit, one ``error:`` line, no traceback), tracebacks. The trials are :mod:`megatron_zero.reliability`.
"""
from __future__ import annotations

import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None) -> int:
    from megatron_zero.reliability import run_trials

    from megatron_zero.arguments import ArgumentParser

    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=6)
    p.add_argument("--iters", type=int, default=8, help="training iterations per run")
    p.add_argument("--workdir", default="/tmp/megatron_zero_reliability")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-bad-inputs", action="store_true")
    p.add_argument("--interruptions", default="kill9,SIGUSR1,SIGTERM", help="drawn from (comma-separated)")
    args = p.parse_args(argv)
    summary = run_trials(args.trials, args.iters, args.workdir, args.seed, not args.no_bad_inputs,
                         log=lambda msg: print(msg, flush=True), interruptions=args.interruptions.split(","))
    print(json.dumps(summary, indent=1))
    return 0 if summary["exact_resumes"] == summary["trials"] and not summary["tracebacks"] else 1


if __name__ == "__main__":
    sys.path.insert(0, REPO)
    from megatron_zero.errors import run_main

    run_main(main, prog="reliability.py")
