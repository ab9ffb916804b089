"""One optimizer step over a global batch: megatron-core pipeline schedules + optimizer.

The loss convention is Megatron's per-token one: each micro-batch returns (sum of token losses, token
count); gradients are divided by the global token count, so the step equals the token-mean loss over the
whole global batch for every TP/PP/DP layout and micro-batch split.
"""
from __future__ import annotations

import dataclasses
import time
from functools import partial
from typing import Any, Callable, Iterator, Optional

import torch
import torch.distributed as dist

from megatron_zero import platform


@dataclasses.dataclass
class StepResult:
    loss: Optional[float]  # token-mean loss over the global batch (None off the last pipeline stage)
    num_tokens: int
    grad_norm: Optional[float]
    update_successful: bool
    # filled by the training loop's iteration (training.loop.run_iteration)
    lr: Optional[float] = None  # the learning rate this step used
    real_tokens: Optional[int] = None  # positions that belong to samples
    computed_tokens: Optional[int] = None  # positions computed (padding included)
    num_microbatches: Optional[int] = None
    # with ``time_phases``: wall seconds of forward+backward (gradients zeroed first) and of the optimizer step,
    # the device synchronised at each boundary (benchmarks; a training run does not synchronise)
    forward_backward_s: Optional[float] = None
    optimizer_s: Optional[float] = None


def lm_loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor, token_weights: Optional[torch.Tensor] = None):
    """Per-token losses [b, s] -> (weighted sum, token count, report) as the schedules expect."""
    losses = output_tensor.float()
    mask = loss_mask.float()
    weights = mask if token_weights is None else mask * token_weights.float()
    loss_sum = (losses * weights).sum()
    num_tokens = mask.sum().to(torch.int)
    report = torch.stack([loss_sum.detach(), mask.sum().detach()])
    return loss_sum, num_tokens, {"lm loss": report}


def packed_seq_params(batch: dict):
    """megatron-core ``PackedSeqParams`` (THD) of a packed micro-batch (see
    :mod:`megatron_zero.training.vlm_batches`), ``None`` for a padded one."""
    if "cu_seqlens" not in batch:
        return None
    from megatron.core.packed_seq_params import PackedSeqParams

    cu = batch["cu_seqlens"].to(platform.device(), dtype=torch.int32)
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=int(batch["max_seqlen"]),
                           max_seqlen_kv=int(batch["max_seqlen"]))


def to_device(batch: dict) -> dict:
    """``batch`` with its tensors on :func:`megatron_zero.platform.device` (data is built on the host; the model may
    be on a GPU). Tensors already there are not copied."""
    dev = platform.device()
    return {k: (v.to(dev, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def lm_forward_step(data_iterator: Iterator[dict], model) -> tuple[torch.Tensor, Callable]:
    """Forward step for a text LM batch ``{tokens, labels, loss_mask, position_ids}`` (packed rows: also
    ``cu_seqlens``/``max_seqlen``, see :mod:`megatron_zero.training.vlm_batches`)."""
    batch = to_device(next(data_iterator))
    tokens = batch["tokens"]
    position_ids = batch.get("position_ids")
    if position_ids is None:
        position_ids = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)
    output = model(tokens, position_ids, None, labels=batch["labels"], packed_seq_params=packed_seq_params(batch))
    return output, partial(lm_loss_func, batch["loss_mask"], token_weights=batch.get("token_weights"))


def _reduce_loss(losses: list[dict[str, Any]]) -> tuple[Optional[float], int]:
    from megatron.core import parallel_state as ps

    if not losses:
        return None, 0
    total = torch.stack([d["lm loss"] for d in losses]).sum(0).double()
    dist.all_reduce(total, group=ps.get_data_parallel_group())
    return (total[0] / total[1].clamp(min=1)).item(), int(total[1].item())


def train_step(
    forward_step_func: Callable,
    data_iterator,
    model_chunks: list,
    optimizer,
    num_microbatches: int,
    seq_length: int,
    micro_batch_size: int,
    forward_only: bool = False,
    time_phases: bool = False,
) -> StepResult:
    """Run forward/backward over ``num_microbatches`` micro-batches and (unless forward_only) step.

    ``time_phases``: also measure the forward+backward and optimizer phases (see :class:`StepResult`)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    clock = _synchronized_clock if time_phases else (lambda: 0.0)
    t0 = clock()
    if not forward_only:
        for m in model_chunks:
            m.zero_grad_buffer()
        optimizer.zero_grad()
    losses = get_forward_backward_func()(
        forward_step_func=forward_step_func,
        data_iterator=data_iterator,
        model=model_chunks,
        num_microbatches=num_microbatches,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
    )
    t1 = clock()
    loss, ntok = _reduce_loss(losses)
    if forward_only:
        return StepResult(loss, ntok, None, True)
    t2 = clock()
    ok, grad_norm, _ = optimizer.step()
    t3 = clock()
    return StepResult(loss, ntok, None if grad_norm is None else float(grad_norm), bool(ok),
                      forward_backward_s=t1 - t0 if time_phases else None,
                      optimizer_s=t3 - t2 if time_phases else None)


def _synchronized_clock() -> float:
    """``time.perf_counter()`` once the device has finished its queued work."""
    if platform.HAVE_CUDA:
        torch.cuda.synchronize()
    return time.perf_counter()
