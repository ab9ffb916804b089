"""Running a suite's benchmarks through the harnesses: tasks first (fail fast on missing data), then models.

The harnesses read benchmark data from the Hugging Face Hub (cached under ``HF_DATASETS_CACHE``). Tasks are
loaded -- datasets included -- before any model is built, so a task whose data cannot be had (offline, no cache)
stops the run at once with :class:`DataUnavailableError` instead of after loading a 70B checkpoint.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

from megatron_zero.evaluation.suites import Benchmark, SuiteError
from megatron_zero.evaluation.text_model import EvaluationError

OFFLINE_HINT = ("its data is not available here (no network and not in the Hugging Face cache). Download it once "
                "where there is network access (it is cached under HF_DATASETS_CACHE / HF_HOME), or write a task "
                "YAML that reads local files and pass --include-path DIR --tasks NAME")


class DataUnavailableError(EvaluationError):
    """A benchmark whose dataset cannot be loaded."""


def _load_failure(harness: str, task: str, error: Exception) -> EvaluationError:
    if isinstance(error, KeyError):
        return SuiteError(f"{harness} has no task or group {task!r} (give its YAML directory with --include-path)")
    return DataUnavailableError(f"{harness} task {task!r}: {OFFLINE_HINT}. ({type(error).__name__}: {error})")


# ---- lm-evaluation-harness (text) -----------------------------------------------------------------------------
def load_text_tasks(benchmarks: Sequence[Benchmark], include_path: Optional[Sequence[str]] = None) -> list[Any]:
    """lm-eval Task/Group objects for ``benchmarks``, datasets loaded, few-shot counts set on every leaf task.

    When ``include_path`` holds every task, the harness's own task index (~15k YAMLs, slow to scan) is skipped."""
    from lm_eval.tasks import TaskManager

    tasks = [b.task for b in benchmarks]
    twice = sorted({t for t in tasks if tasks.count(t) > 1})
    if twice:
        raise SuiteError(f"--tasks lists {twice} more than once; run different settings of a task separately")
    paths = list(include_path or []) or None
    manager = TaskManager(include_path=paths, include_defaults=False) if paths else None
    if manager is None or not set(tasks) <= set(manager.all_tasks):
        manager = TaskManager(include_path=paths)
    objects = []
    for b in benchmarks:
        try:
            loaded = manager.load([b.task])
        except Exception as e:  # the harness raises whatever its dataset loader raised
            raise _load_failure("lm-eval", b.task, e) from None
        if b.num_fewshot is not None:
            for task in loaded["tasks"].values():
                task.set_config(key="num_fewshot", value=b.num_fewshot)
        objects.append(loaded["groups"].get(b.task) or loaded["tasks"][b.task])
    return objects


def run_text(lm, tasks: Sequence[Any], limit: Optional[float] = None, log_samples: bool = False) -> Optional[dict]:
    """The harness's results dict for ``tasks`` (from :func:`load_text_tasks`); None except on LOCAL_RANK 0."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    # the tasks are built already: an empty manager spares the harness re-scanning its ~15k task YAMLs
    return lm_eval.simple_evaluate(model=lm, tasks=list(tasks), limit=limit, log_samples=log_samples,
                                   bootstrap_iters=0, task_manager=TaskManager(include_defaults=False))


# ---- lmms-eval (VLM) --------------------------------------------------------------------------------------------
def load_vlm_task_manager(benchmarks: Sequence[Benchmark], include_path: Optional[Sequence[str]] = None):
    """An lmms-eval TaskManager, after checking that every benchmark's task and data load (the harness's own
    task index is skipped when ``include_path`` holds every task)."""
    from lmms_eval.tasks import TaskManager, get_task_dict

    paths = list(include_path or []) or None
    manager = TaskManager("WARNING", include_path=paths, include_defaults=False) if paths else None
    if manager is None or not {b.task for b in benchmarks} <= set(manager.all_tasks):
        manager = TaskManager("WARNING", include_path=paths)
    for task in dict.fromkeys(b.task for b in benchmarks):
        if task not in manager.all_tasks:
            raise _load_failure("lmms-eval", task, KeyError(task))
        try:
            get_task_dict([task], manager)
        except Exception as e:  # the harness raises whatever its dataset loader raised
            raise _load_failure("lmms-eval", task, e) from None
    return manager


def run_vlm(lm, benchmarks: Sequence[Benchmark], manager, limit: Optional[float] = None) -> dict[str, Optional[dict]]:
    """Harness results per benchmark name; binary benchmarks run with the model's binary mode on for their task."""
    from lmms_eval.evaluator import simple_evaluate

    out = {}
    for b in benchmarks:
        lm.binary_tasks = (b.task,) if b.binary else ()
        out[b.name] = simple_evaluate(model=lm, tasks=[b.task], num_fewshot=b.num_fewshot, limit=limit,
                                      task_manager=manager, bootstrap_iters=0, log_samples=False)
    return out
