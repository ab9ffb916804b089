"""The layout-equivalence workers of tests/test_parallel_equivalence.py, tests/test_vlm.py and
tests/test_packing_training.py in one process (``reference``: a world of one writes every reference) and one
4-process torchrun launch (``compare``): a launch costs ~10 s of CPU per rank (torch + megatron-core imports)
before any check runs, so the three share one.

    layout_checks.py reference|compare NAME=PATH...   (NAME: parallel, vlm, packed; run in the order given)

Each worker runs exactly as alone (its own ``checked ...`` lines and ``... MATCH`` message, printed by rank 0),
then ``WORKER NAME rc=N``; the exit code is non-zero when any worker failed.
"""
import argparse
import sys

from megatron_zero.parallel import initialize
from tests.workers import packed_equivalence, parallel_equivalence, vlm_parallel

WORKERS = {"parallel": parallel_equivalence, "vlm": vlm_parallel, "packed": packed_equivalence}


def _keep_world() -> None:
    """Between workers only megatron's model-parallel groups go; the process group stays for the next one."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["reference", "compare"])
    p.add_argument("refs", nargs="+", metavar="NAME=PATH")
    a = p.parse_args()
    full_destroy, initialize.destroy_parallel = initialize.destroy_parallel, _keep_world
    import torch.distributed as dist

    rc = 0
    for item in a.refs:
        name, path = item.split("=", 1)
        code = getattr(WORKERS[name], a.mode)(path) or 0
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(f"WORKER {name} rc={code}", flush=True)
        rc |= code
    full_destroy()
    return rc


if __name__ == "__main__":
    sys.exit(main())
