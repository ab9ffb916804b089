"""The parts every checkpoint conversion shares (flags' names in errors, dtypes, progress, world-size check).

The dispatch is :mod:`~megatron_zero.checkpointing.convert`; one module per format: :mod:`~megatron_zero.checkpointing.convert_llama` (HF Llama <-> mcore, mcore -> mcore),
:mod:`~megatron_zero.checkpointing.convert_clip` (HF CLIP vision tower <-> mcore) and
:mod:`~megatron_zero.checkpointing.hf_llava` (a VLM -> HF ``LlavaForConditionalGeneration``). Models for the target
layout are built with ``RuntimeOptions(initialize_weights=False)``: every weight is loaded right after.

Error messages name ``tools/convert_checkpoint.py``'s flags (``--target-tensor-parallel-size`` ...); every error a
user can cause is one of :data:`USER_ERRORS`.
"""
from __future__ import annotations

import os
import resource
import sys
from collections.abc import Callable

import torch

from megatron_zero.checkpointing.hf_llava import LlavaExportError
from megatron_zero.checkpointing.hf_reader import CheckpointFormatError
from megatron_zero.checkpointing.hf_writer import SaveDirError
from megatron_zero.checkpointing.mcore_checkpoint import CheckpointError
from megatron_zero.checkpointing.resolve import CheckpointResolveError
from megatron_zero.checkpointing.vlm_checkpoint import VLMCheckpointError
from megatron_zero.models.llama import ModelConfigError, RuntimeOptions
from megatron_zero.models.llama_config import LlamaConfig
from megatron_zero.parallel.initialize import ParallelConfigError

PROG = "convert_checkpoint.py"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
USER_ERRORS = (CheckpointFormatError, CheckpointError, SaveDirError, ModelConfigError, ParallelConfigError,
               LlavaExportError, VLMCheckpointError, CheckpointResolveError)
# validate()/split_layers() speak in training flags; the conversion flags say "target".
_FLAG_NAMES = {
    "--tensor-model-parallel-size": "--target-tensor-parallel-size",
    "--pipeline-stage-layers": "--target-pipeline-stage-layers",
    "pipeline-model-parallel-size": "target-pipeline-parallel-size",
}


def log(msg: str) -> None:
    from megatron_zero.parallel.initialize import print_rank0

    print_rank0(f"[{PROG}] {msg}")


def dtype_of(meta: dict) -> torch.dtype:
    """The parameter dtype recorded in a megatron_zero checkpoint's metadata (default fp32)."""
    return getattr(torch, meta.get("params_dtype", "torch.float32").replace("torch.", ""))


def target_runtime_options(cfg: LlamaConfig, tp: int, pp: int, stage_layers, dtype: torch.dtype) -> RuntimeOptions:
    """Options for building the target layout: local spec (conversion needs no fused kernels), no random init."""
    from megatron_zero.models.llama import validate

    opts = RuntimeOptions(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                          pipeline_stage_layers=stage_layers, params_dtype=dtype,
                          bf16=dtype == torch.bfloat16, use_te=False, initialize_weights=False)
    try:
        validate(cfg, opts)
    except ModelConfigError as e:
        msg = str(e)
        for old, new in _FLAG_NAMES.items():
            msg = msg.replace(old, new)
        raise ModelConfigError(msg) from None
    return opts


def check_world(tp: int, pp: int) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world % (tp * pp):
        raise ParallelConfigError(
            f"--target-tensor-parallel-size {tp} x --target-pipeline-parallel-size {pp} needs {tp * pp} processes, "
            f"but {world} were launched: run `torchrun --nproc-per-node {tp * pp} tools/{PROG} ...`"
        )


class Progress:
    """A tqdm bar on rank 0 around a tensor getter."""

    def __init__(self, get: Callable[[str], torch.Tensor], total: int, desc: str):
        from tqdm import tqdm

        from megatron_zero.parallel.initialize import is_rank0

        self.get = get
        self.bar = tqdm(total=total, desc=desc, unit="tensor", disable=not is_rank0(), file=sys.stdout)

    def __call__(self, key: str) -> torch.Tensor:
        t = self.get(key)
        self.bar.update(1)
        return t


def load_canonical(model, get, tp_rank: int, tp: int, source: str) -> None:
    """``sharding.load_canonical`` with its mismatch errors turned into one-line format errors."""
    from megatron_zero.parallel import sharding

    try:
        sharding.load_canonical(model, get, tp_rank, tp, source=source)
    except (KeyError, ValueError) as e:
        if isinstance(e, USER_ERRORS):
            raise
        raise CheckpointFormatError(e.args[0] if e.args else str(e)) from None


def num_weights(model) -> int:
    return sum(1 for k in model.state_dict() if not k.endswith("_extra_state"))


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (MB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
