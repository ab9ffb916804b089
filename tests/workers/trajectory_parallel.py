"""Worker for tests/test_trajectory.py: the TP=2/PP=2 trajectory (both metrics, a right-padded batch) equals the
transformers reference the test computed. Run under torchrun with 4 processes."""
import sys

import torch

from megatron_zero.analysis.trajectory import TrajectoryAnalyzer, pad_batch
from megatron_zero.models.llama import RuntimeOptions, build_llama_model
from megatron_zero.models.llama_config import LlamaConfig
from megatron_zero.parallel import initialize, sharding
from tests.workers.common import report_failures


def main(ref_path: str) -> int:
    from megatron.core import parallel_state as ps

    ref = torch.load(ref_path, weights_only=False)
    cfg = LlamaConfig.from_dict(ref["cfg"])
    initialize.initialize_parallel(2, 2, seed=5)
    model = build_llama_model(cfg, RuntimeOptions(tensor_model_parallel_size=2, pipeline_model_parallel_size=2))
    sharding.load_canonical(model, ref["canonical"], ps.get_tensor_model_parallel_rank(), 2)
    analyzer = TrajectoryAnalyzer(model, cfg.vocab_size)
    tokens, lengths = pad_batch(ref["sequences"])
    failures = []
    for metric, expected in ref["expected"].items():
        got = analyzer(tokens, lengths, metric)
        err = (got - expected.float()).abs().max().item()
        if not torch.allclose(got, expected.float(), rtol=2e-4, atol=1e-5):
            failures.append(f"rank {torch.distributed.get_rank()} {metric}: max abs difference {err:.3g}\n"
                            f"got {got}\nexpected {expected}")
    return report_failures(failures, "TRAJECTORY TP=2 PP=2 MATCH")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
