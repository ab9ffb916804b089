"""The library's Trainer as the benchmarks and the GPU check use it: built once per model, its :meth:`step` timed.

Every benchmark times exactly what ``pretrain_lm``/``pretrain_vlm`` run per iteration
(:meth:`megatron_zero.training.trainer.Trainer.step`: megatron DDP, megatron's optimizer, the schedule, the LR
scheduler) on a :meth:`~megatron_zero.training.trainer.Trainer.for_steps` trainer: no run directory, the process
groups the tool set up, and a constant LR (no warm-up, no decay), so that every timed step updates at ``lr``.
"""
from __future__ import annotations

from typing import Callable, Iterator, Optional

import torch


def step_trainer(chunks: list, forward_step: Callable, make_iterator: Callable[[int], Iterator], *, steps: int,
                 seq_length: int, global_batch_size: int, micro_batch_size: int = 1, lr: float = 1e-5,
                 bf16: bool = False, distributed_optimizer: bool = True, clip_grad: float = 1.0,
                 model_config: Optional[dict] = None):
    """A built steps-only Trainer over ``chunks`` (this rank's model chunks, frozen as wanted) for ``steps``
    iterations of ``global_batch_size`` rows of ``seq_length`` in micro-batches of ``micro_batch_size``; AdamW
    (betas 0.9/0.999, eps 1e-8, no weight decay), gradient clipping at ``clip_grad``."""
    from megatron_zero.config import ModelConfig, OptimizerConfig, RunConfig, TrainingConfig
    from megatron_zero.training.trainer import Trainer

    cfg = RunConfig(
        model=ModelConfig(bf16=bf16),
        training=TrainingConfig(micro_batch_size=micro_batch_size, global_batch_size=global_batch_size,
                                seq_length=seq_length, train_iters=max(steps, 1)),
        optimizer=OptimizerConfig(lr=lr, lr_warmup_fraction=0.0, lr_decay_style="constant", clip_grad=clip_grad,
                                  use_distributed_optimizer=distributed_optimizer))
    return Trainer.for_steps(cfg).build(chunks, forward_step, make_iterator, model_config=model_config)


def alternating_token_batches(tokens: torch.Tensor, seq_length: int, global_batch_size: int,
                              micro_batch_size: int = 1, rank: int = 0, data_parallel_size: int = 1
                              ) -> Callable[[int], Iterator]:
    """``make_iterator`` over two global batches of windows of ``tokens`` (iteration ``i`` reads batch ``i % 2``):
    this rank's micro-batches."""
    from megatron_zero.data.token_windows import TokenWindows

    data = TokenWindows(tokens.numpy(), seq_length)
    return lambda i: data.iteration_microbatches(i % 2, global_batch_size, micro_batch_size, rank,
                                                 data_parallel_size)


class AssembledAhead:
    """A ``make_iterator`` whose batches are assembled before the clock starts: ``prepare(i)`` assembles iteration
    ``i``'s batch with ``make_batch`` (packing, images); the trainer's ``step(i)`` then takes it as it is."""

    def __init__(self, make_batch: Callable[[int], Iterator]):
        self.make_batch = make_batch
        self._ready: dict[int, Iterator] = {}

    def prepare(self, iteration: int) -> Iterator:
        self._ready[iteration] = self.make_batch(iteration)
        return self._ready[iteration]

    def __call__(self, iteration: int) -> Iterator:
        return self._ready.pop(iteration)
