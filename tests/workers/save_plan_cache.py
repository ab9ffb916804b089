"""Worker for tests/test_checkpoint_timing.py, run under torchrun with 2 processes.

Repeated ``dist_save`` calls of one structure (each rank holds half of ``a``, ``b`` is replicated) reuse one
save strategy (megatron-core's cached save plan, no re-validation); a changed structure gets a new one. Every
checkpoint, synchronous or asynchronous, written with a cached plan or not, loads back with its own values.
"""
import os
import sys

import torch
import torch.distributed as dist

from megatron_zero.checkpointing import mcore_checkpoint
from megatron_zero.parallel import initialize


def state(rows: int, fill: float) -> dict:
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    me, world = dist.get_rank(), dist.get_world_size()
    return {"a": ShardedTensor.from_rank_offsets("a", torch.full((rows, 3), fill + me), (0, me, world)),
            "b": ShardedTensor.from_rank_offsets("b", torch.arange(4.0) + fill, replica_id=me)}


def main(work: str) -> int:
    from megatron.core import dist_checkpointing

    initialize.initialize_parallel(1, 1, seed=1)
    failures, strategies = [], []
    for i, (rows, fill, asynchronous) in enumerate([(2, 1, False), (2, 2, True), (2, 3, False), (5, 4, True),
                                                     (5, 5, False)]):
        path = os.path.join(work, str(i))
        if dist.get_rank() == 0:
            os.makedirs(path)
        dist.barrier()
        request = mcore_checkpoint.dist_save(state(rows, fill), path, async_sharded_save=asynchronous)
        if asynchronous:
            request.execute_sync()
        dist.barrier()
        strategies.append(mcore_checkpoint._save_strategy[1])
        loaded = dist_checkpointing.load(state(rows, 0), path)
        want = state(rows, fill)
        if not (torch.equal(loaded["a"], want["a"].data) and torch.equal(loaded["b"], want["b"].data)):
            failures.append(f"rank {dist.get_rank()}: save {i} loaded {loaded['a'].tolist()} {loaded['b'].tolist()}")
    same = [strategies[i] is strategies[i - 1] for i in range(1, len(strategies))]
    if same != [True, True, False, True]:
        failures.append(f"rank {dist.get_rank()}: strategy reused {same}, expected [True, True, False, True]")
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, failures)
    failures = [f for fs in gathered for f in fs]
    if dist.get_rank() == 0:
        print("\n".join(failures) or "save plans: reused and loadable", flush=True)
    initialize.destroy_parallel()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
