"""Deterministic, resumable data-parallel sampler.

Each epoch is one seeded permutation of the dataset (``seed`` and ``epoch`` fix it), cut into global batches of
``global_batch_size`` samples; the tail that does not fill a global batch is left out of that epoch (the next
epoch's permutation differs). Within global batch ``b``, DP rank ``r`` owns the contiguous slice
``[b*G + r*G/dp, b*G + (r+1)*G/dp)`` of the permutation and walks it in micro-batches of ``micro_batch_size``,
so the ranks see disjoint samples and together cover every sample of the batch once.

The position is the number of samples consumed in the current epoch by all ranks together. It advances as each
micro-batch is handed out, so :meth:`state_dict` taken after a training step resumes with the next unseen
sample. (A ``DataLoader`` with workers fetches ahead of training: save the state that belongs to the last
micro-batch trained on, not the loader's.) The state survives a change of DP size or micro-batch size as long
as the position is a whole number of the new step's micro-batches (always true at global-batch boundaries).
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np

__all__ = ["ResumableDistributedSampler"]


class ResumableDistributedSampler:
    """Yields this DP rank's micro-batches (lists of dataset indices) for the rest of the current epoch."""

    def __init__(self, num_samples: int, global_batch_size: int, micro_batch_size: int, dp_rank: int = 0,
                 dp_size: int = 1, seed: int = 0, shuffle: bool = True, epoch: int = 0):
        if global_batch_size % (micro_batch_size * dp_size):
            raise ValueError(f"global_batch_size={global_batch_size} must be divisible by "
                             f"micro_batch_size * dp_size = {micro_batch_size} * {dp_size}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} outside [0, dp_size={dp_size})")
        if num_samples < global_batch_size:
            raise ValueError(f"dataset of {num_samples} samples is smaller than one global batch "
                             f"({global_batch_size})")
        self.num_samples = num_samples
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = epoch
        self.consumed_samples = 0  # in the current epoch, over all DP ranks

    @property
    def steps_per_epoch(self) -> int:
        return self.num_samples // self.global_batch_size

    @property
    def micro_batches_per_step(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.dp_size)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The dataset indices of ``epoch`` in visiting order."""
        if not self.shuffle:
            return np.arange(self.num_samples)
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)

    def __iter__(self) -> Iterator[list[int]]:
        order = self.epoch_order(self.epoch)
        per_rank = self.global_batch_size // self.dp_size
        end = self.steps_per_epoch * self.global_batch_size
        while self.consumed_samples < end:
            batch, within = divmod(self.consumed_samples, self.global_batch_size)
            micro = within // (self.micro_batch_size * self.dp_size)
            lo = batch * self.global_batch_size + self.dp_rank * per_rank + micro * self.micro_batch_size
            self.consumed_samples += self.micro_batch_size * self.dp_size
            yield order[lo : lo + self.micro_batch_size].tolist()
        self.epoch += 1
        self.consumed_samples = 0

    def __len__(self) -> int:
        """Micro-batches this rank has left in the current epoch."""
        left = self.steps_per_epoch * self.global_batch_size - self.consumed_samples
        return left // (self.micro_batch_size * self.dp_size)

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "consumed_samples": self.consumed_samples,
            "num_samples": self.num_samples,
            "global_batch_size": self.global_batch_size,
            "seed": self.seed,
            "shuffle": self.shuffle,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state``; the dataset, global batch, seed and shuffling must be the ones it was saved with."""
        for key in ("num_samples", "global_batch_size", "seed", "shuffle"):
            if state[key] != getattr(self, key):
                raise ValueError(f"sampler state was saved with {key}={state[key]!r}, but this run has "
                                 f"{key}={getattr(self, key)!r}; resuming would not continue the same sample order")
        step = self.micro_batch_size * self.dp_size
        if state["consumed_samples"] % step:
            raise ValueError(f"saved position {state['consumed_samples']} is not a multiple of micro_batch_size * "
                             f"dp_size = {step}; resume at a global-batch boundary to change these")
        self.epoch = int(state["epoch"])
        self.consumed_samples = int(state["consumed_samples"])
