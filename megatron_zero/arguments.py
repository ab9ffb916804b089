"""The command-line vocabulary of every entry point and tool: Megatron-style flag groups, one parser class.

Flag names follow Megatron-LM (``--tensor-model-parallel-size``, ``--pipeline-model-parallel-size``,
``--sequence-parallel``, ``--micro-batch-size``, ``--global-batch-size``, ``--bf16``, ``--load``, ``--save``,
``--pretrained-checkpoint`` ...); data parallelism is whatever remains of the world size. Old spellings stay
accepted as deprecated aliases (:func:`add_deprecated_alias`, one warning line; the table is docs/flags.md).
:func:`parse` reads a command line once into a :class:`megatron_zero.config.RunConfig` and validates it.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Optional, Sequence

from megatron_zero.config import ConfigError, RunConfig, validate
from megatron_zero.errors import EXIT_USER_ERROR, emit_error, want_traceback


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors are one line, ``<prog>: error: <message> (see --help)``, exit 2
    (no usage dump; ``MEGATRON_ZERO_TRACEBACK=1`` prints the usage too). Sub-parsers are of this class as well."""

    def error(self, message: str):
        if want_traceback():
            self.print_usage(sys.stderr)
        emit_error(self.prog, f"{message} (see --help)")
        sys.exit(EXIT_USER_ERROR)


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


def _warn_deprecated(parser: argparse.ArgumentParser, old: str, new: str) -> None:
    print(f"{parser.prog}: warning: {old} is deprecated, use {new}", file=sys.stderr, flush=True)


class _AcceptsDeprecatedAliases:
    """Mixed into a flag's action: an old spelling (``deprecated_aliases``) warns once, then acts as the flag."""

    deprecated_aliases: dict[str, str]

    def __call__(self, parser, namespace, values, option_string=None):
        if option_string in self.deprecated_aliases:
            _warn_deprecated(parser, option_string, self.deprecated_aliases[option_string])
        super().__call__(parser, namespace, values, option_string)


def _action(parser: argparse.ArgumentParser, flag: str) -> argparse.Action:
    for action in parser._actions:
        if flag in action.option_strings:
            return action
    raise KeyError(flag)


def add_deprecated_alias(parser: argparse.ArgumentParser, old: str, new: str) -> None:
    """Accept ``old`` as a deprecated spelling of the already added flag ``new`` (the same action, so ``required``
    and the flag's type/choices hold for both; only ``new`` shows in ``--help``)."""
    target = _action(parser, new)
    if not isinstance(target, _AcceptsDeprecatedAliases):
        target.__class__ = type(f"Deprecated{type(target).__name__}", (_AcceptsDeprecatedAliases, type(target)), {})
        target.deprecated_aliases = {}
    target.deprecated_aliases[old] = new
    parser._option_string_actions[old] = target


class _DtypeAlias(argparse.Action):
    """``--dtype fp32|bf16|float32|bfloat16`` (deprecated): ``--bf16`` or nothing."""

    def __call__(self, parser, namespace, values, option_string=None):
        _warn_deprecated(parser, f"{option_string} {values}", "--bf16" if values in ("bf16", "bfloat16") else
                         "the default (fp32)")
        setattr(namespace, self.dest, values in ("bf16", "bfloat16"))


def add_precision_args(g) -> None:
    """``--bf16`` (Megatron-LM), with the deprecated ``--dtype`` spellings of older tools."""
    g.add_argument("--bf16", action="store_true", help="bf16 parameters and compute")
    g.add_argument("--dtype", dest="bf16", action=_DtypeAlias, choices=["fp32", "bf16", "float32", "bfloat16"],
                   default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def add_pretrained_checkpoint_arg(parser, *, required: bool = False, help: str, old: Sequence[str] = ()) -> None:
    """``--pretrained-checkpoint`` (Megatron-LM): model weights to read (never written), with ``old`` spellings."""
    parser.add_argument("--pretrained-checkpoint", required=required, default=None, help=help)
    for flag in old:
        add_deprecated_alias(parser, flag, "--pretrained-checkpoint")


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
    add_precision_args(g)
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
    g.add_argument("--exit-after-iters", type=int, default=None, help="stop (and save) after this many iterations")
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
    g = parser.add_argument_group("checkpoints")
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
    g = parser.add_argument_group("logging")
    g.add_argument("--log-interval", type=int, default=1)
    g.add_argument("--tensorboard-dir", default=None)
    g.add_argument("--metrics-file", default=None,
                   help="append per-iteration JSON lines (loss, lr, grad norm, tokens), written by rank 0")
    return parser


def parse(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]] = None, required: Sequence[str] = (),
          resolve: Optional[Callable[[RunConfig], RunConfig]] = None) -> RunConfig:
    """The command line as a validated :class:`RunConfig` (``required``: flags the entry point cannot do without;
    ``resolve``: fills the values that depend on other flags before validation). A bad value exits 2 with one
    line (``parser.error``). Every flag of ``parser`` must have its place in :class:`RunConfig`."""
    return _parse(parser, argv, required, resolve, strict=True)[0]


def parse_tool(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]] = None,
               required: Sequence[str] = ()) -> tuple[RunConfig, argparse.Namespace]:
    """For a tool (a CLI, not library code) that composes the shared flag groups with flags of its own: the
    validated :class:`RunConfig` of the shared flags, and the parsed command line for the tool's own."""
    return _parse(parser, argv, required, None, strict=False)


def add_checkpoint_timing_args(g) -> None:
    """How and when checkpoints are written (Megatron-LM's names): background saves, trainable-only saves,
    walltime-aware exit."""
    g.add_argument("--async-save", action="store_true",
                   help="write checkpoints in the background while training continues (megatron-core's asynchronous "
                        "dist_checkpointing); a checkpoint is published (COMPLETE, latest marker) only once durable")
    g.add_argument("--save-frozen", action="store_true",
                   help="save frozen parameters too (full checkpoints); by default a run with frozen parameters "
                        "saves only what trains and references the frozen base by its identity")
    g.add_argument("--dist-ckpt-optim-fully-reshardable", action="store_true",
                   help="save the distributed optimizer's state in megatron-core's fully_reshardable format (resumes "
                        "at any TP/PP/DP; each save copies the whole optimizer state and gathers it over DP). "
                        "Default: dp_reshardable (each rank writes its own shard as is; resumes at the same TP/PP, "
                        "any DP)")
    g.add_argument("--exit-duration-in-mins", type=float, default=None,
                   help="save a checkpoint and exit 75 (resumable) once the run has lasted this many minutes "
                        "(set it below the job's walltime; no signal needed)")
    g.add_argument("--save-interval-minutes", type=float, default=None,
                   help="also save whenever this many minutes have passed since the last save")


def _parse(parser, argv, required, resolve, strict: bool) -> tuple[RunConfig, argparse.Namespace]:
    args = parser.parse_args(argv)
    cfg = RunConfig.from_flags(vars(args), strict=strict)
    try:
        for flag in required:
            if getattr(args, flag.lstrip("-").replace("-", "_")) is None:
                raise ConfigError(f"{flag} is required")
        if resolve is not None:
            cfg = resolve(cfg)
        validate(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    except ConfigError as e:
        parser.error(str(e))
    return cfg, args
