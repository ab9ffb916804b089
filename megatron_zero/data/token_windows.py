"""Language-model pretraining data: a token stream cut into fixed windows, addressed by global sample index.

Sample ``i`` of the training stream is window ``perm[i % n]`` (a seeded permutation per epoch), so the data
of any iteration is a pure function of (seed, iteration): resuming a run replays exactly the same batches,
and every data-parallel rank takes its contiguous share of each global batch.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch


class TokenWindows:
    def __init__(self, tokens: Sequence[int] | np.ndarray, seq_length: int, seed: int = 0):
        self.tokens = np.asarray(tokens, dtype=np.int64)
        self.seq_length = seq_length
        self.num_windows = (len(self.tokens) - 1) // seq_length
        if self.num_windows < 1:
            raise ValueError(f"corpus of {len(self.tokens)} tokens is shorter than one window of {seq_length + 1}")
        self.seed = seed

    def _window(self, sample: int) -> np.ndarray:
        epoch, idx = divmod(sample, self.num_windows)
        perm = np.random.default_rng(self.seed + epoch).permutation(self.num_windows)
        start = int(perm[idx]) * self.seq_length
        return self.tokens[start:start + self.seq_length + 1]

    def batch(self, samples: Sequence[int]) -> dict[str, torch.Tensor]:
        w = torch.from_numpy(np.stack([self._window(s) for s in samples]))
        return {"tokens": w[:, :-1], "labels": w[:, 1:], "loss_mask": torch.ones(len(samples), self.seq_length)}

    def iteration_microbatches(self, iteration: int, global_batch: int, micro_batch: int, dp_rank: int,
                               dp_size: int) -> Iterator[dict[str, torch.Tensor]]:
        """This DP rank's micro-batches of global batch number ``iteration``."""
        per_rank = global_batch // dp_size
        first = iteration * global_batch + dp_rank * per_rank
        for s in range(first, first + per_rank, micro_batch):
            yield self.batch(range(s, s + micro_batch))
