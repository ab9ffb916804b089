"""Worker for tests/test_trajectory.py: the TP=2/PP=2 trajectory equals the single-process one."""
import dataclasses

import torch

from megatron_zero.analysis.trajectory import parallel_trajectory_kl, trajectory_kl
from megatron_zero.models.llama import RuntimeOptions, build_llama_model
from megatron_zero.models.llama_config import get_preset
from megatron_zero.parallel import initialize, sharding
from tests.workers.common import main

CFG = dataclasses.replace(get_preset("tiny"), vocab_size=250)  # padded differently at TP=1 and TP=2


def reference(out):
    initialize.initialize_parallel(1, 1, seed=5)
    model = build_llama_model(CFG)
    canonical = sharding.gather_canonical([model], vocab_size=CFG.vocab_size)
    tokens = torch.randint(0, 250, (3, 20), generator=torch.Generator().manual_seed(2))
    single = trajectory_kl(model, tokens, CFG.vocab_size)
    same = parallel_trajectory_kl(model, tokens, CFG.vocab_size)  # the parallel code path at TP=PP=1
    assert torch.allclose(single, same, atol=1e-6), (single, same)
    torch.save({"canonical": canonical, "tokens": tokens, "kl": single}, out)


def compare(ref_path):
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    ref = torch.load(ref_path, weights_only=False)
    initialize.initialize_parallel(2, 2, seed=5)
    model = build_llama_model(CFG, RuntimeOptions(tensor_model_parallel_size=2, pipeline_model_parallel_size=2))
    sharding.load_canonical(model, ref["canonical"], ps.get_tensor_model_parallel_rank(), 2)
    kl = parallel_trajectory_kl(model, ref["tokens"], CFG.vocab_size)
    ok = True
    if dist.get_rank() == 0:
        err = (kl - ref["kl"]).abs().max().item()
        ok = err < 1e-5
        print(f"TP=2 PP=2 trajectory max abs difference {err:.3g}: {'MATCH' if ok else 'MISMATCH'}", flush=True)
    initialize.destroy_parallel()
    return 0 if ok else 1


if __name__ == "__main__":
    main(reference, compare)
