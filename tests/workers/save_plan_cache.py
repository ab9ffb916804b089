"""Worker for tests/test_checkpoint_timing.py, run under torchrun with 2 processes.

Repeated ``dist_save`` calls of one structure (each rank holds half of ``a``, ``b`` is replicated) reuse one
save strategy (megatron-core's cached save plan, no re-validation); a changed structure gets a new one. Every
checkpoint, synchronous or asynchronous, written with a cached plan or not, loads back with its own values.
``c`` is a view of a 4 MB storage (as every weight is a view of megatron's buffers): an asynchronous save, which
leaves views uncopied in the saving process, still writes only the view (its writer clones it).
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
    big = torch.arange(1_000_000.0) + fill
    return {"a": ShardedTensor.from_rank_offsets("a", torch.full((rows, 3), fill + me), (0, me, world)),
            "b": ShardedTensor.from_rank_offsets("b", torch.arange(4.0) + fill, replica_id=me),
            "c": ShardedTensor.from_rank_offsets("c", big[10 + me * 5:15 + me * 5], (0, me, world))}


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
        strategies.append(mcore_checkpoint._save_strategies[mcore_checkpoint._structure(state(rows, fill))])
        loaded = dist_checkpointing.load(state(rows, 0), path)
        want = state(rows, fill)
        if not all(torch.equal(loaded[k], want[k].data) for k in "abc"):
            failures.append(f"rank {dist.get_rank()}: save {i} loaded {loaded['a'].tolist()} {loaded['b'].tolist()} "
                            f"{loaded['c'].tolist()}")
        written = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
        if written > 200_000:
            failures.append(f"save {i} ({'asynchronous' if asynchronous else 'synchronous'}) wrote {written} bytes: "
                            f"a view's whole storage?")
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
