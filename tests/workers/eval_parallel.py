"""Worker for tests/test_evaluation.py: the real lm-eval harness on a local task, under TP=2 and then PP=2.

Usage: torchrun --nproc-per-node 2 eval_parallel.py CHECKPOINT TASK_DIR OUT_PREFIX
Writes OUT_PREFIX.tp2.json and OUT_PREFIX.pp2.json (from LOCAL_RANK 0): {task: [per-sample responses]}.
"""
import json
import os
import sys


def evaluate(load: str, task_dir: str, model_args: str):
    import lm_eval
    from lm_eval.tasks import TaskManager

    import megatron_zero.evaluation.lm_eval_adapter  # noqa: F401  (registers "megatron_zero")

    tasks = TaskManager(include_path=task_dir, include_defaults=False)
    return lm_eval.simple_evaluate(model="megatron_zero", model_args=f"load={load},{model_args}",
                                   tasks=["tiny_mc", "tiny_rolling", "tiny_gen"], task_manager=tasks,
                                   log_samples=True, bootstrap_iters=0)


def main() -> None:
    load, task_dir, out_prefix = sys.argv[1:4]
    for name, model_args in (("tp2", "tp=2,batch_size=2"), ("pp2", "pp=2,batch_size=3")):
        results = evaluate(load, task_dir, model_args)
        if os.environ.get("LOCAL_RANK", "0") == "0":
            samples = {task: [s["resps"] for s in sorted(rows, key=lambda s: s["doc_id"])]
                       for task, rows in results["samples"].items()}
            with open(f"{out_prefix}.{name}.json", "w") as f:
                json.dump(samples, f)
        else:
            assert results is None, "only LOCAL_RANK 0 may receive the harness's results"
    from megatron_zero.parallel.initialize import destroy_parallel

    destroy_parallel()


if __name__ == "__main__":
    main()
