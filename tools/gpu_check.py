#!/usr/bin/env python
"""GPU acceptance run -> gpu_check.json + gpu_check.md; exit 1 if a check failed. The checks and their statuses are
described in megatron_zero_dev/gpu_check.py. On the project's GPU machine run tools/device_gpu_check.sh (it
installs the carried wheels, resumes after a crash and keeps the time limit; docs/gpu.md); in NVIDIA's container
``make gpu-check``; on CPU ``--dry-run`` exercises the plumbing at tiny sizes."""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    from megatron_zero_dev import gpu_check

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="tiny sizes on CPU: plumbing only, no GPU result")
    p.add_argument("--output-dir", default="gpu_check_results")
    p.add_argument("--only", default=None, help="comma-separated check names: " + ", ".join(n for n, _ in gpu_check.CHECKS))
    p.add_argument("--resume", action="store_true",
                   help="keep the checks already in --output-dir's gpu_check.json; one left 'running' is recorded as "
                        "crashed (with --log-file's tail) and the rest run")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds: checks not started by then are recorded as 'not run'")
    p.add_argument("--previous-exit", type=int, default=None, help="with --resume: the dead process's exit status")
    p.add_argument("--log-file", default=None, help="with --resume: the dead process's log, whose tail is recorded")
    args = p.parse_args(argv)
    only = args.only.split(",") if args.only else None
    unknown = [n for n in only or [] if n not in dict(gpu_check.CHECKS)]
    if unknown:
        p.error(f"--only: unknown check(s) {', '.join(unknown)}")
    code = gpu_check.main(args.dry_run, args.output_dir, only, args.resume, args.time_budget, args.previous_exit,
                          args.log_file)
    from megatron_zero.parallel.initialize import destroy_parallel

    destroy_parallel()
    return code


if __name__ == "__main__":
    sys.exit(main())
