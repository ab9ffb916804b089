#!/usr/bin/env python
"""Run the paper's benchmark suites on megatron_zero checkpoints and tabulate them.

    python tools/evaluate.py --suite text --pretrained-checkpoint ckpt/llama-3b --compare-checkpoint ckpt/llama-3b-srgt
    torchrun --nproc-per-node 8 tools/evaluate.py --suite text --pretrained-checkpoint ckpt/llama-70b \\
        --tensor-model-parallel-size 8 --bf16
    python tools/evaluate.py --suite vlm --pretrained-checkpoint ckpt/enc_on_srgt \\
        --compare-checkpoint ckpt/enc_grafted_3b

``--suite text``: lm-evaluation-harness with Table A.5's few-shot counts and metrics (MMLU 5-shot acc, HellaSwag
10-shot acc_norm, ...; see :mod:`megatron_zero.evaluation.suites`), on any decoder checkpoint (HF Llama dir,
megatron_zero torch_dist checkpoint, VLM checkpoint used text-only). ``--suite vlm``: lmms-eval on a VLM
checkpoint, with the paper's binary yes/no prompting for its "binary" MME/POPE columns.

``--tasks`` restricts the suite (column or task names) or adds tasks of your own as ``TASK[:SHOTS[:METRIC]]``,
e.g. a task YAML reading local JSONL files in a directory given with ``--include-path``. Every task's data is
loaded before any model, and a task whose data cannot be had offline stops the run with a message saying so.

Prints the results table (rows: checkpoints, columns: benchmarks + average; with ``--compare-checkpoint`` a third row
gives the difference, the paper's side-by-side comparison) and writes ``results.json`` (scores, settings and
the harness's full metrics) and ``results.md`` to ``--output-dir``. Under torchrun every rank runs the models;
rank 0 prints and writes. Exit status 2 on bad input. The logic is :mod:`megatron_zero.evaluation`
(``compare``: per-checkpoint runs, scores, outputs).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Optional, Sequence

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build_parser() -> argparse.ArgumentParser:
    from megatron_zero import arguments

    p = arguments.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--suite", required=True, choices=["text", "vlm"])
    arguments.add_pretrained_checkpoint_arg(p, required=True, old=["--load"], help="checkpoint directory to evaluate")
    p.add_argument("--compare-checkpoint", default=None, help="a second checkpoint, tabulated side by side")
    arguments.add_deprecated_alias(p, "--compare-load", "--compare-checkpoint")
    p.add_argument("--label", default=None, help="row label of --pretrained-checkpoint (default: its directory name)")
    p.add_argument("--compare-label", default=None, help="row label of --compare-checkpoint")
    p.add_argument("--tasks", nargs="+", default=None,
                   help="suite columns/tasks to run, or custom TASK[:SHOTS[:METRIC]] (default: the whole suite)")
    p.add_argument("--include-path", action="append", default=[], help="directory of extra task YAMLs (repeatable)")
    p.add_argument("--binary-tasks", nargs="+", default=[],
                   help="VLM: also answer these tasks with the paper's binary yes/no prompting")
    p.add_argument("--limit", type=float, default=None, help="at most this many examples per task (testing only)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1, help="pipeline stages (text suite only)")
    arguments.add_deprecated_alias(p, "--tp", "--tensor-model-parallel-size")
    arguments.add_deprecated_alias(p, "--pp", "--pipeline-model-parallel-size")
    arguments.add_precision_args(p)
    p.add_argument("--tokenizer", default=None, help="tokenizer file/directory (default: the checkpoint's)")
    p.add_argument("--chat-family", default=None, help="VLM chat template family (default: from the tokenizer)")
    p.add_argument("--prompt-format", default="meta", choices=["meta", "zero"],
                   help="VLM prompts: meta (the family's chat format) or zero (the authors' Llama-3 format and image "
                        "prompt)")
    p.add_argument("--output-dir", default="eval_results", help="where results.json and results.md go")
    p.add_argument("--seed", type=int, default=1234)
    return p


def _label(path: str, given: Optional[str]) -> str:
    return given or os.path.basename(os.path.normpath(path))


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from megatron_zero.checkpointing.resolve import DECODER_KINDS, VLM_KINDS, resolve_checkpoint
    from megatron_zero.evaluation.compare import evaluate_text, evaluate_vlm, scores, write_outputs
    from megatron_zero.evaluation.suites import select
    from megatron_zero.errors import UserError
    from megatron_zero.evaluation.text_model import EvaluationError
    from megatron_zero.parallel.initialize import is_rank0

    harness = "lm_eval" if args.suite == "text" else "lmms_eval"
    try:
        __import__(harness)
    except ImportError:
        raise EvaluationError(f"the {args.suite} suite needs {harness}: pip install 'megatron_zero[eval]'") from None
    load, tp, pp, dtype = args.pretrained_checkpoint, args.tensor_model_parallel_size, \
        args.pipeline_model_parallel_size, "bf16" if args.bf16 else "fp32"
    checkpoints = {_label(load, args.label): load}
    if args.compare_checkpoint:
        compare = _label(args.compare_checkpoint, args.compare_label)
        if compare in checkpoints:
            compare += " (compare)"
        checkpoints[compare] = args.compare_checkpoint
    try:
        for path in checkpoints.values():  # before any task data is loaded
            flag = "--pretrained-checkpoint" if path == load else "--compare-checkpoint"
            if not os.path.isdir(path):
                raise EvaluationError(f"{flag} {path}: no such checkpoint directory")
            resolve_checkpoint(path, flag, accept=DECODER_KINDS if args.suite == "text" else VLM_KINDS)
        benchmarks = [dataclasses.replace(b, binary=True) if b.task in args.binary_tasks else b
                      for b in select(args.suite, args.tasks)]
        if args.suite == "text":
            from megatron_zero.evaluation.runner import load_text_tasks

            tasks = load_text_tasks(benchmarks, args.include_path)
            raw = {label: evaluate_text(path, tasks, args.limit, tp, pp, dtype, args.tokenizer,
                                        args.batch_size, args.seed) for label, path in checkpoints.items()}
        else:
            from megatron_zero.evaluation.runner import load_vlm_task_manager

            manager = load_vlm_task_manager(benchmarks, args.include_path)
            raw = {label: evaluate_vlm(path, benchmarks, manager, args.limit, tp, pp, dtype,
                                       args.tokenizer, args.chat_family, args.batch_size, args.seed,
                                       args.prompt_format)
                   for label, path in checkpoints.items()}
    except ValueError as e:  # the evaluation harnesses' bad-input errors, reported as ours
        if isinstance(e, UserError):
            raise
        raise EvaluationError(str(e)) from None
    if not is_rank0() or any(r is None for r in raw.values()):
        return 0
    rows = {label: scores(args.suite, benchmarks, r) for label, r in raw.items()}
    table = write_outputs(args.output_dir, args.suite, benchmarks, rows, raw, checkpoints)
    print(table)
    print(f"\nwrote {os.path.join(args.output_dir, 'results.json')} and results.md")
    return 0


if __name__ == "__main__":
    from megatron_zero.errors import run_main

    run_main(main)
