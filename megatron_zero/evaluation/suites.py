"""The paper's benchmark suites, encoded once, and the result tables built from harness output.

Text suite (Tables 1, 3, 5, A.2), run with lm-evaluation-harness; few-shot counts and accuracy type are Table A.5's
("norm" = the harness's length-normalised ``acc_norm``), columns in the paper's order:

    MMLU 5 acc | HellaSwag 10 norm | ARC-e 0 norm | ARC-c 25 norm | Winogrande 5 acc | PIQA 0 norm | BoolQ 0 acc |
    OpenBookQA 0 norm

VLM suite (Tables 2, 4, 6, 7, A.2; benchmarks of Section A.10), run with lmms-eval. "binary" entries are the
paper's MME/POPE variants prompted to answer yes or no (see :mod:`~megatron_zero.evaluation.vlm_adapter`).
MM-Vet, LLaVA-in-the-Wild and MMBench are scored by lmms-eval with a GPT judge (it needs its API key).
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, Optional, Sequence
from megatron_zero.errors import UserError


@dataclasses.dataclass(frozen=True)
class Benchmark:
    """One column of a results table: harness task (or group) ``task`` scored by ``metric``."""

    name: str  # column label
    task: str  # the harness's task or group name
    metric: str  # the harness's metric name (before its ",<filter>" suffix)
    num_fewshot: Optional[int] = None  # None: the task's own default
    scale: float = 1.0  # multiply the harness's value (accuracies in [0, 1] -> percent)
    binary: bool = False  # VLM: answer with the paper's binary yes/no prompting
    judge: bool = False  # VLM: lmms-eval scores it with an LLM judge (needs an API key)


TEXT_SUITE: tuple[Benchmark, ...] = (
    Benchmark("MMLU", "mmlu", "acc", 5, 100.0),
    Benchmark("HellaSwag", "hellaswag", "acc_norm", 10, 100.0),
    Benchmark("ARC-e", "arc_easy", "acc_norm", 0, 100.0),
    Benchmark("ARC-c", "arc_challenge", "acc_norm", 25, 100.0),
    Benchmark("Winogrande", "winogrande", "acc", 5, 100.0),
    Benchmark("PIQA", "piqa", "acc_norm", 0, 100.0),
    Benchmark("BoolQ", "boolq", "acc", 0, 100.0),
    Benchmark("OpenBookQA", "openbookqa", "acc_norm", 0, 100.0),
)

VLM_SUITE: tuple[Benchmark, ...] = (
    Benchmark("MME-perc (binary)", "mme", "mme_perception_score", binary=True),
    Benchmark("POPE (binary)", "pope", "pope_f1_score", scale=100.0, binary=True),
    Benchmark("SEED-Bench", "seedbench", "seed_image"),
    Benchmark("MM-Vet", "mmvet", "gpt_eval_score", judge=True),
    Benchmark("LLaVA-Wild", "llava_in_the_wild", "gpt_eval_llava_all", judge=True),
    Benchmark("MMBench-en", "mmbench_en_dev", "gpt_eval_score", judge=True),
    Benchmark("MME-perc", "mme", "mme_perception_score"),
    Benchmark("POPE", "pope", "pope_f1_score", scale=100.0),
    Benchmark("CV-Bench", "cv_bench", "cv_bench_acc"),
    Benchmark("GQA", "gqa", "exact_match", scale=100.0),
    Benchmark("VizWiz", "vizwiz_vqa_val", "exact_match", scale=100.0),
    Benchmark("TextVQA", "textvqa_val", "exact_match", scale=100.0),
    Benchmark("DocVQA", "docvqa_val", "anls", scale=100.0),
    Benchmark("ChartQA", "chartqa", "relaxed_overall", scale=100.0),
    Benchmark("InfoVQA", "infovqa_val", "anls", scale=100.0),
    Benchmark("AI2D", "ai2d", "exact_match", scale=100.0),
)

SUITES: Mapping[str, tuple[Benchmark, ...]] = {"text": TEXT_SUITE, "vlm": VLM_SUITE}


class SuiteError(UserError, ValueError):
    """A --suite/--tasks selection that names no benchmark we can run."""


def parse_task_spec(spec: str) -> Benchmark:
    """A custom benchmark from ``task[:shots[:metric]]`` (e.g. a local task YAML given with --include-path);
    defaults: the task's own few-shot count, metric ``acc``."""
    parts = spec.split(":")
    if not parts[0] or len(parts) > 3:
        raise SuiteError(f"--tasks {spec!r}: expected TASK, TASK:SHOTS or TASK:SHOTS:METRIC")
    shots = None
    if len(parts) > 1 and parts[1] != "":
        if not parts[1].isdigit():
            raise SuiteError(f"--tasks {spec!r}: the few-shot count {parts[1]!r} is not a non-negative integer")
        shots = int(parts[1])
    metric = parts[2] if len(parts) > 2 and parts[2] else "acc"
    return Benchmark(parts[0], parts[0], metric, shots)


def select(suite: str, tasks: Optional[Sequence[str]] = None) -> list[Benchmark]:
    """The suite's benchmarks, or those named in ``tasks``: a suite column name, a suite task name (all of its
    columns), or a custom ``task[:shots[:metric]]``."""
    if suite not in SUITES:
        raise SuiteError(f"--suite {suite!r}: expected one of {sorted(SUITES)}")
    benchmarks = SUITES[suite]
    if not tasks:
        return list(benchmarks)
    chosen: list[Benchmark] = []
    for spec in tasks:
        known = [b for b in benchmarks if spec in (b.name, b.task)]
        chosen += known or [parse_task_spec(spec)]
    return chosen


def score(results: Mapping, benchmark: Benchmark) -> Optional[float]:
    """The benchmark's number from a harness ``results`` dict (``results["results"][task]["metric,filter"]``),
    scaled; None when the harness did not report it."""
    row = results.get("results", {}).get(benchmark.task, {})
    for key, value in row.items():
        if key.split(",")[0] == benchmark.metric and isinstance(value, (int, float)):
            return float(value) * benchmark.scale
    return None


def _fmt(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2f}"


def markdown_table(benchmarks: Sequence[Benchmark], rows: Mapping[str, Mapping[str, Optional[float]]],
                   delta: bool = True) -> str:
    """Rows = checkpoints, columns = benchmarks + their average (as the paper's tables). With two rows and
    ``delta``, a third row gives second minus first."""
    names = [b.name for b in benchmarks]
    table = {label: dict(scores) for label, scores in rows.items()}
    for scores in table.values():
        values = [scores.get(n) for n in names]
        scores["avg."] = sum(values) / len(values) if values and all(v is not None for v in values) else None
    if delta and len(table) == 2:
        (a_label, a), (b_label, b) = table.items()
        table[f"Δ ({b_label} − {a_label})"] = {n: None if a.get(n) is None or b.get(n) is None else b[n] - a[n]
                                                for n in names + ["avg."]}
    header = ["checkpoint"] + names + ["avg."]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, scores in table.items():
        lines.append("| " + " | ".join([label] + [_fmt(scores.get(n)) for n in names + ["avg."]]) + " |")
    return "\n".join(lines)


def settings_table(benchmarks: Sequence[Benchmark]) -> str:
    """The few-shot count and metric of each benchmark (Table A.5 for the text suite)."""
    lines = ["| benchmark | harness task | shots | metric |", "|---|---|---|---|"]
    for b in benchmarks:
        shots = "default" if b.num_fewshot is None else str(b.num_fewshot)
        metric = b.metric + (" (binary yes/no)" if b.binary else "") + (" (LLM judge)" if b.judge else "")
        lines.append(f"| {b.name} | {b.task} | {shots} | {metric} |")
    return "\n".join(lines)
