#!/usr/bin/env python
"""Build the surrogate T(a, b) of a target LLM (paper Sec. 1.2): keep layers 0..a-1, a translator copied from
layer a, drop a+1..b, keep b+1..L-1.

    python tools/build_surrogate.py --load-dir Llama-3.1-70B-Instruct --save-dir llama-70b-T40-78 \\
        --translator-start 40 --translator-end 78
    python tools/build_surrogate.py --load-dir ... --save-dir ... --from-trajectory outputs/trajectory.json

``--from-trajectory`` takes ``a`` from ``tools/analyze_trajectory.py``'s ``trajectory.json``; ``b`` defaults to L-2.

Input: an HF Llama checkpoint directory (output: an HF checkpoint ``transformers`` loads, streamed tensor by
tensor with the layer indices renamed, the target's dtype and tokenizer files kept; one process) or a
megatron_zero sharded ``torch_dist`` checkpoint (output: sharded, the *pipeline-stage pruner*)::

    torchrun --nproc-per-node 4 tools/build_surrogate.py --load-dir ckpt-70b-pp8 --save-dir ckpt-T40-78 \
        --translator-start 40 --target-pipeline-parallel-size 4 [--target-pipeline-stage-layers 12 10 10 10]

where the surrogate is built directly over the fewer stages and each rank reads only the pieces of the kept layers
it holds. The output config records the provenance (``LlamaConfig.surrogate``: target, a, b, translator index,
layer map, architecture/tokenizer hashes, the layers stage 1 trains) that training and grafting rely on. Prints
target/surrogate parameter counts and the expected compute ratio. The builders are
:func:`megatron_zero.surrogate.build_surrogate_checkpoint` and its HF / sharded variants.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PROG = "build_surrogate"


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    from megatron_zero.arguments import ArgumentParser

    p = ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load-dir", required=True, help="target checkpoint (HF Llama dir or megatron_zero checkpoint)")
    p.add_argument("--save-dir", required=True)
    p.add_argument("--translator-start", type=int, default=None, help="a: the translator is a copy of layer a")
    p.add_argument("--translator-end", type=int, default=None, help="b: layers a+1..b are dropped (default L-2)")
    p.add_argument("--from-trajectory", default=None, help="trajectory.json: a = its transition layer")
    p.add_argument("--translator-range", action="append", default=None, metavar="S:E",
                   help="replace layers S..E (inclusive) by translators; repeat for several ranges (the authors' "
                        "translators_range)")
    p.add_argument("--num-translators", type=int, default=1,
                   help="translators per range: layers S, S+2, ... (the authors' num_translators)")
    p.add_argument("--control-unfreeze-early", action="store_true",
                   help="record the T* control: stage 1 also trains every other layer before the translator")
    p.add_argument("--max-shard-size", default="5GB", help="(HF output) safetensors shard size")
    p.add_argument("--overwrite", action="store_true")
    g = p.add_argument_group("sharded (torch_dist) input; run under torchrun with TP x PP processes")
    g.add_argument("--target-pipeline-parallel-size", type=int, default=None,
                   help="pipeline stages the surrogate is partitioned over (default 1)")
    g.add_argument("--target-pipeline-stage-layers", type=int, nargs="+", default=None,
                   help="surrogate layers per stage, e.g. 22 20 (default: even split)")
    g.add_argument("--tensor-model-parallel-size", type=int, default=None,
                   help="TP of the build processes (splits the reads; the output is layout-independent)")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    from megatron_zero.errors import UserError
    from megatron_zero.surrogate import SurrogateError, build_surrogate_checkpoint

    layout = {"pp": args.target_pipeline_parallel_size, "stage_layers": args.target_pipeline_stage_layers,
              "tp": args.tensor_model_parallel_size}
    try:
        build_surrogate_checkpoint(args.load_dir, args.save_dir, sharded_layout=layout,
                                   log=lambda m: print(f"[{PROG}] {m}"), translator_start=args.translator_start,
                                   translator_end=args.translator_end, from_trajectory=args.from_trajectory,
                                   control_unfreeze_early=args.control_unfreeze_early,
                                   translator_ranges=args.translator_range, num_translators=args.num_translators,
                                   max_shard_size=args.max_shard_size, overwrite=args.overwrite)
    except (ValueError, KeyError) as e:  # a checkpoint that lacks what a surrogate needs: bad input too
        if isinstance(e, UserError):
            raise
        raise SurrogateError(str(e)) from None
    return 0


if __name__ == "__main__":
    from megatron_zero.errors import run_main

    run_main(main)
