"""Benchmark the image loaders and the fused weighted cross-entropy.

1. Images/s of the Pillow loader, the DALI CPU pipeline and (with CUDA) the DALI GPU pipeline, on ``--images``
   generated JPEGs (random sizes around 640 x 480, smooth content) preprocessed to 336 x 336.
2. Time (forward + backward) and peak memory of the weighted cross-entropy at Llama-3's vocabulary (128256):
   the compiled kernel (``--build-dir`` JIT CPU build, or the setup.py build), the chunked PyTorch path, and the
   naive ``log_softmax`` + ``gather``. Peak memory is ``torch.cuda.max_memory_allocated`` on GPU, and on CPU the
   process's peak RSS growth (``/proc/self/status`` VmHWM, which only grows, so each method runs in its own
   subprocess).

    python tools/benchmark_data_loss.py --images 64 --tokens 512

The benchmarks are :mod:`megatron_zero_dev.benchmark_data_loss`.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_zero import platform  # noqa: E402
from megatron_zero_dev.benchmark_data_loss import (  # noqa: E402
    LLAMA3_VOCAB, bench_images, bench_loss, run_loss_method,
)


def main() -> None:
    from megatron_zero.arguments import ArgumentParser

    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64, help="number of generated JPEGs")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2, help="Pillow DataLoader workers / DALI threads")
    parser.add_argument("--tokens", type=int, default=512, help="rows of the loss benchmark")
    parser.add_argument("--vocab", type=int, default=LLAMA3_VOCAB)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--build-dir", default="/tmp/megatron_zero_build/weighted_ce_cpu",
                        help="cache of the JIT-built CPU kernel")
    parser.add_argument("--loss-method", help=argparse.SUPPRESS)  # internal: run one loss method, print JSON
    args = parser.parse_args()

    if args.loss_method:
        print(json.dumps(run_loss_method(args.loss_method, args.tokens, args.vocab, args.dtype, args.repeats,
                                         args.build_dir)))
        return
    print(platform.summary())
    report = {
        "images_per_second": bench_images(args.images, args.batch_size, args.workers),
        f"loss_{args.tokens}x{args.vocab}_{args.dtype}": bench_loss(
            args.tokens, args.vocab, args.dtype, args.repeats, args.build_dir
        ),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    from megatron_zero.errors import run_main

    run_main(main)
