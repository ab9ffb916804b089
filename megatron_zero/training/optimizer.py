"""Wrapping model chunks in megatron-core DDP and building the (distributed) optimizer.

Frozen parameters (``requires_grad=False``) get neither gradient buffers (megatron DDP only buckets
trainable parameters) nor optimizer state.
"""
from __future__ import annotations

import dataclasses

import torch

from megatron_zero.config import OptimizerConfig


@dataclasses.dataclass(frozen=True)
class OptimizerOptions(OptimizerConfig):
    """What DDP and the optimizer are built from: a run's :class:`~megatron_zero.config.OptimizerConfig` (its
    LR-schedule fields are the scheduler's) plus the parameters' precision. Built in code (tests, tools), it
    defaults to the distributed optimizer and a set ``lr``."""

    lr: float = 1e-4
    use_distributed_optimizer: bool = True
    bf16: bool = False

    @classmethod
    def from_config(cls, o: OptimizerConfig, bf16: bool) -> "OptimizerOptions":
        """From a run's optimizer section (its lr resolved) and ``--bf16``."""
        return cls(**{f.name: getattr(o, f.name) for f in dataclasses.fields(OptimizerConfig)}, bf16=bf16)


def wrap_ddp(model_chunks: list, opts: OptimizerOptions) -> list:
    """Wrap each chunk in megatron-core's DDP (gradient buffers, bucketed/overlapped reduction)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed import finalize_model_grads

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=opts.overlap_grad_reduce,
        overlap_param_gather=opts.overlap_param_gather,
        use_distributed_optimizer=opts.use_distributed_optimizer,
        check_for_nan_in_grad=False,
        bucket_size=None if not opts.overlap_grad_reduce else 40_000_000,
    )
    wrapped = []
    for i, chunk in enumerate(model_chunks):
        config = chunk.config
        # Loss is summed over tokens and divided by the global token count in finalize_model_grads, so
        # any TP/PP/DP layout and micro-batch split computes the same token-mean gradient.
        config.calculate_per_token_loss = True
        config.finalize_model_grads_func = finalize_model_grads
        wrapped.append(
            DistributedDataParallel(
                config=config, ddp_config=ddp_config, module=chunk,
                disable_bucketing=(i > 0),  # as Megatron-LM: bucket only the first virtual chunk
            )
        )
    if opts.overlap_grad_reduce:
        no_sync = [m.no_sync for m in wrapped]
        wrapped[0].config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
        grad_sync = [m.start_grad_sync for m in wrapped]
        wrapped[0].config.grad_sync_func = grad_sync[0] if len(grad_sync) == 1 else grad_sync
    return wrapped


def build_optimizer(model_chunks: list, opts: OptimizerOptions):
    """AdamW (Table A.4 defaults) over the trainable parameters, distributed over DP when requested."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    # A pipeline stage with nothing to train is normal (stage 2 freezes the decoder stages); only a model with no
    # trainable parameter on any rank is an error. megatron-core gives such a stage an optimizer without state.
    local = any(p.requires_grad for m in model_chunks for p in m.parameters())
    if not _any_rank(local):
        raise ValueError("no trainable parameters: every parameter of the model is frozen")
    config = OptimizerConfig(
        optimizer="adam",
        lr=opts.lr,
        min_lr=opts.min_lr,
        weight_decay=opts.weight_decay,
        adam_beta1=opts.adam_beta1,
        adam_beta2=opts.adam_beta2,
        adam_eps=opts.adam_eps,
        clip_grad=opts.clip_grad,
        bf16=opts.bf16,
        params_dtype=torch.bfloat16 if opts.bf16 else torch.float32,
        use_distributed_optimizer=opts.use_distributed_optimizer,
        overlap_param_gather=opts.overlap_param_gather,
    )
    optimizer = get_megatron_optimizer(config, model_chunks)
    _fused_cpu_adam(optimizer)
    return optimizer


def _fused_cpu_adam(optimizer) -> None:
    """On CPU megatron-core falls back to ``torch.optim.AdamW`` with its default per-tensor loop (eight passes over
    every parameter); switch it to torch's fused CPU kernel (one pass, the same update) before the first step.
    Several times faster on large embeddings; on GPU the TE/apex fused Adam is used as before."""
    from megatron_zero import platform

    if platform.HAVE_CUDA:
        return
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if isinstance(inner, torch.optim.AdamW) and not inner.state:
            inner.defaults.update(fused=True, foreach=False)
            for group in inner.param_groups:
                group.update(fused=True, foreach=False)


def _any_rank(flag: bool) -> bool:
    from megatron_zero.parallel.collectives import any_rank

    return any_rank(flag)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside DDP/Float16 wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model
