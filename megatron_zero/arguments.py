"""Megatron-style command-line flags, grouped so every tool composes the groups it needs.

Flag names follow Megatron-LM (``--tensor-model-parallel-size``, ``--pipeline-model-parallel-size``,
``--sequence-parallel``, ``--micro-batch-size``, ``--global-batch-size``, ``--bf16`` ...); data parallelism is
whatever remains of the world size. :func:`validate_args` turns bad combinations into a one-line
``parser.error`` naming the flag.
"""
from __future__ import annotations

import argparse
from typing import Optional, Sequence


def positive_int(text: str) -> int:
    """argparse ``type=``: an integer >= 1 (``--batch-size 0`` is refused as an argument error)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of integers, got {text!r}") from None


def add_parallel_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = parser.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1, help="TP degree")
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1, help="PP degree")
    g.add_argument("--virtual-pipeline-model-parallel-size", type=int, default=None,
                   help="model chunks per pipeline rank (interleaved 1F1B schedule)")
    g.add_argument("--pipeline-stage-layers", type=_int_list, default=None,
                   help="explicit decoder layers per (virtual) pipeline stage, e.g. 11,11,10,10")
    g.add_argument("--sequence-parallel", action="store_true", help="sequence parallelism (needs TP > 1)")
    g.add_argument("--seed", type=int, default=1234)
    return parser


def add_model_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = parser.add_argument_group("model")
    g.add_argument("--model", default=None,
                   help="model preset name, model_config.json, or a checkpoint directory holding one")
    g.add_argument("--bf16", action="store_true", help="bf16 parameters and compute")
    g.add_argument("--fp8-format", choices=["e4m3", "hybrid"], default=None,
                   help="FP8 compute with Transformer Engine (GPU only)")
    g.add_argument("--fp8-recipe", choices=["delayed", "tensorwise", "mxfp8", "blockwise"], default="delayed")
    g.add_argument("--transformer-impl", choices=["auto", "te", "local"], default="auto",
                   help="layer implementation: Transformer Engine (GPU) or megatron-core local modules")
    g.add_argument("--recompute-activations", action="store_true", help="full-layer activation recomputation")
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    return parser


def add_training_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = parser.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int, default=1)
    g.add_argument("--global-batch-size", type=int, default=None, help="default: micro batch x DP")
    g.add_argument("--seq-length", type=int, default=2048)
    g.add_argument("--train-iters", type=int, default=None)
    g.add_argument("--lr", type=float, default=1e-4)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-warmup-fraction", type=float, default=0.03)
    g.add_argument("--lr-decay-style", choices=["cosine", "linear", "constant"], default="cosine")
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.999)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--use-distributed-optimizer", action="store_true")
    g.add_argument("--overlap-grad-reduce", action="store_true")
    g.add_argument("--overlap-param-gather", action="store_true")
    g.add_argument("--log-interval", type=int, default=1)
    g.add_argument("--save", default=None, help="checkpoint directory to save into")
    g.add_argument("--load", default=None, help="checkpoint directory to resume from")
    g.add_argument("--save-interval", type=int, default=None)
    g.add_argument("--keep-last-checkpoints", type=int, default=2)
    g.add_argument("--overwrite", action="store_true",
                   help="start from scratch into a --save directory holding another run's checkpoints (deletes "
                        "them); without it such a run is refused (resuming with --load <save> needs no flag)")
    g.add_argument("--checkpoint-verify", choices=["hash", "size"], default="hash",
                   help="on resume, check every checkpoint file against the SHA-256 (hash) or only the size "
                        "(size: for huge checkpoints) recorded when it was saved")
    add_checkpoint_timing_args(g)
    g.add_argument("--tensorboard-dir", default=None)
    return parser


def add_checkpoint_timing_args(g) -> None:
    """How and when checkpoints are written (Megatron-LM's names): background saves, trainable-only saves,
    walltime-aware exit."""
    g.add_argument("--async-save", action="store_true",
                   help="write checkpoints in the background while training continues (megatron-core's asynchronous "
                        "dist_checkpointing); a checkpoint is published (COMPLETE, latest marker) only once durable")
    g.add_argument("--save-frozen", action="store_true",
                   help="save frozen parameters too (full checkpoints); by default a run with frozen parameters "
                        "saves only what trains and references the frozen base by its identity")
    g.add_argument("--exit-duration-in-mins", type=float, default=None,
                   help="save a checkpoint and exit 75 (resumable) once the run has lasted this many minutes "
                        "(set it below the job's walltime; no signal needed)")
    g.add_argument("--save-interval-minutes", type=float, default=None,
                   help="also save whenever this many minutes have passed since the last save")


def validate_args(parser: argparse.ArgumentParser, args: argparse.Namespace, world_size: Optional[int] = None) -> None:
    """Check flag combinations that don't need the model; errors name the flag."""
    for flag in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "micro_batch_size", "seq_length",
                 "log_interval"):
        if getattr(args, flag, 1) is not None and getattr(args, flag, 1) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1")
    for flag in ("exit_duration_in_mins", "save_interval_minutes"):
        if getattr(args, flag, None) is not None and getattr(args, flag) <= 0:
            parser.error(f"--{flag.replace('_', '-')} must be > 0, got {getattr(args, flag)}")
    for flag in ("global_batch_size", "train_iters", "save_interval", "keep_last_checkpoints"):
        if getattr(args, flag, None) is not None and getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if getattr(args, "sequence_parallel", False) and args.tensor_model_parallel_size == 1:
        parser.error("--sequence-parallel needs --tensor-model-parallel-size > 1")
    vpp = getattr(args, "virtual_pipeline_model_parallel_size", None)
    if vpp is not None and (vpp < 1 or args.pipeline_model_parallel_size == 1):
        parser.error("--virtual-pipeline-model-parallel-size needs --pipeline-model-parallel-size > 1")
    if world_size is not None:
        mp = args.tensor_model_parallel_size * args.pipeline_model_parallel_size
        if world_size % mp:
            parser.error(
                f"world size {world_size} is not divisible by --tensor-model-parallel-size x "
                f"--pipeline-model-parallel-size = {mp}"
            )
        dp = world_size // mp
        gbs = getattr(args, "global_batch_size", None)
        mbs = getattr(args, "micro_batch_size", None)
        if gbs is not None and mbs is not None and gbs % (mbs * dp):
            parser.error(
                f"--global-batch-size {gbs} is not divisible by --micro-batch-size {mbs} x data-parallel size {dp}"
            )


def parse(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    import os

    args = parser.parse_args(argv)
    validate_args(parser, args, int(os.environ.get("WORLD_SIZE", "1")))
    return args
