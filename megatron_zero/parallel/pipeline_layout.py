"""Partitioning decoder layers over pipeline stages, including uneven splits.

Surrogates have odd layer counts (T(40,78) of Llama-3.1-70B keeps 42 layers), so the split must accept any
count: by default layers are spread as evenly as possible with the *first* stages taking the remainder
(the first stage also runs the vision encoder and embeddings, the last one the output layer and loss; users
who want it the other way give an explicit list with ``--pipeline-stage-layers``).
"""
from __future__ import annotations

from typing import Optional, Sequence


def split_layers(
    num_layers: int,
    pipeline_size: int,
    stage_layers: Optional[Sequence[int]] = None,
    virtual_size: int = 1,
) -> list[int]:
    """Number of decoder layers on each (virtual) stage, in layer order (``pipeline_size * virtual_size`` entries)."""
    chunks = pipeline_size * virtual_size
    if stage_layers is not None:
        stage_layers = [int(x) for x in stage_layers]
        if len(stage_layers) != chunks:
            raise ValueError(
                f"--pipeline-stage-layers lists {len(stage_layers)} stages but the pipeline has {chunks} "
                f"(pipeline-model-parallel-size {pipeline_size} x virtual {virtual_size})"
            )
        if any(n < 0 for n in stage_layers) or sum(stage_layers) != num_layers:
            raise ValueError(
                f"--pipeline-stage-layers {stage_layers} must be non-negative and sum to the model's "
                f"{num_layers} layers (sums to {sum(stage_layers)})"
            )
        return stage_layers
    if num_layers < chunks:
        raise ValueError(
            f"cannot split {num_layers} decoder layers over {chunks} pipeline stages "
            f"(pipeline-model-parallel-size {pipeline_size} x virtual {virtual_size}); use fewer stages"
        )
    base, rem = divmod(num_layers, chunks)
    return [base + (1 if i < rem else 0) for i in range(chunks)]


def megatron_layout(stage_layers: Sequence[int]) -> list[list[str]]:
    """megatron-core ``pipeline_model_parallel_layout`` (list form) for a per-stage layer list."""
    layout = [["decoder"] * n for n in stage_layers]
    layout[0].insert(0, "embedding")
    layout[-1].append("loss")
    return layout
