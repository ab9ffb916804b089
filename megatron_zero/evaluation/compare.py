"""Evaluating checkpoints side by side (``tools/evaluate.py``): each checkpoint's model built and run through the
harness (:mod:`~megatron_zero.evaluation.runner`), its scores read with the suite's metrics, and the results table
written as ``results.json`` + ``results.md``.
"""
from __future__ import annotations

import dataclasses
import gc
import json
import os
from typing import Optional


def evaluate_text(path: str, tasks, limit: Optional[float] = None, tp: int = 1, pp: int = 1, dtype: str = "fp32",
                  tokenizer: Optional[str] = None, batch_size: int = 8, seed: int = 1234) -> Optional[dict]:
    """lm-eval results of one decoder checkpoint (any kind the resolver reads) on loaded ``tasks``; None off rank 0."""
    from megatron_zero.evaluation.lm_eval_adapter import MegatronZeroLM
    from megatron_zero.evaluation.runner import run_text

    lm = MegatronZeroLM(load=path, tp=tp, pp=pp, dtype=dtype, tokenizer=tokenizer, batch_size=batch_size, seed=seed)
    results = run_text(lm, tasks, limit)
    del lm
    gc.collect()
    return None if results is None else {"results": results["results"]}


def evaluate_vlm(path: str, benchmarks, manager, limit: Optional[float] = None, tp: int = 1, pp: int = 1,
                 dtype: str = "fp32", tokenizer: Optional[str] = None, chat_family: Optional[str] = None,
                 batch_size: int = 8, seed: int = 1234, prompt_format: str = "meta") -> Optional[dict]:
    """lmms-eval results per benchmark of one VLM checkpoint; None off rank 0."""
    from megatron_zero.evaluation.runner import run_vlm
    from megatron_zero.evaluation.vlm_adapter import MegatronZeroVLM

    if pp != 1:
        raise ValueError("--pp: the VLM suite runs the decoder on one pipeline stage (generation needs it)")
    lm = MegatronZeroVLM(load=path, tp=tp, dtype=dtype, tokenizer=tokenizer, chat_family=chat_family,
                         batch_size=batch_size, seed=seed, prompt_format=prompt_format)
    per_benchmark = run_vlm(lm, benchmarks, manager, limit)
    del lm
    gc.collect()
    if any(r is None for r in per_benchmark.values()):
        return None
    return {name: {"results": r["results"]} for name, r in per_benchmark.items()}


def scores(suite: str, benchmarks, harness: dict) -> dict:
    from megatron_zero.evaluation.suites import score

    if suite == "text":
        return {b.name: score(harness, b) for b in benchmarks}
    return {b.name: score(harness[b.name], b) for b in benchmarks}


def write_outputs(out_dir: str, suite: str, benchmarks, rows: dict, harness: dict, paths: dict) -> str:
    """``results.json`` + ``results.md``; returns the Markdown."""
    from megatron_zero.evaluation.suites import markdown_table, settings_table

    os.makedirs(out_dir, exist_ok=True)
    table = markdown_table(benchmarks, rows)
    markdown = f"# {suite} suite\n\n{table}\n\n## Settings\n\n{settings_table(benchmarks)}\n"
    record = {"suite": suite, "benchmarks": [dataclasses.asdict(b) for b in benchmarks],
              "checkpoints": {label: {"load": paths[label], "scores": rows[label], "harness": harness[label]}
                              for label in rows}}
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(record, f, indent=2, default=str)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(markdown)
    return table
