#!/usr/bin/env python
"""GPU acceptance run: TE vs local spec, FP8 step, CUDA cross-entropy kernel, DALI GPU vs Pillow, throughput/MFU,
packed VLM stage-2 step, surrogate/target ratio -> one JSON + Markdown table; exit 1 on any mismatch.
See megatron_zero/gpu_check.py.  ``make gpu-check``; on CPU ``--dry-run`` exercises the plumbing."""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    from megatron_zero import gpu_check

    from megatron_zero.arguments import ArgumentParser

    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="tiny sizes on CPU: plumbing only, no GPU result")
    p.add_argument("--output-dir", default="gpu_check_results")
    p.add_argument("--only", default=None, help="comma-separated check names: " + ", ".join(n for n, _ in gpu_check.CHECKS))
    args = p.parse_args(argv)
    only = args.only.split(",") if args.only else None
    unknown = [n for n in only or [] if n not in dict(gpu_check.CHECKS)]
    if unknown:
        p.error(f"--only: unknown check(s) {', '.join(unknown)}")
    code = gpu_check.main(args.dry_run, args.output_dir, only)
    from megatron_zero.parallel.initialize import destroy_parallel

    destroy_parallel()
    return code


if __name__ == "__main__":
    sys.exit(main())
