"""Micro-batches for VLM training: tokenised samples -> expanded rows + images + loss weights.

One sample per row, right-padded to ``--seq-length`` (static pipeline shapes; a multiple of 16 with FP8).
Samples are not packed together here: megatron-core's local attention cannot keep packed samples apart, and
its RoPE ignores per-sample positions (packing belongs with TE's THD attention and ``packed_seq_params``).

The data of iteration ``i`` is a pure function of (seed, ``i``) through
:class:`~megatron_zero.data.sampler.ResumableDistributedSampler`, so resuming replays exactly. A sample whose
image is missing or corrupt is dropped and replaced by the next loadable sample of the dataset (index + 1, + 2,
...): still a pure function of (seed, ``i``) and the files, so the data position stays exact on resume; the
dropped samples are counted over all DP ranks (``--strict-images`` fails instead).
Before the micro-batch loop, the response lengths of the whole global batch (all micro-batches, all DP ranks)
give the length-weighted loss its statistics (A.11).
"""
from __future__ import annotations

import logging
from typing import Callable, Iterator, Optional, Sequence

import torch

from megatron_zero import platform
from megatron_zero.data.datasets import Sample
from megatron_zero.data.images import ImageLoadError
from megatron_zero.data.sampler import ResumableDistributedSampler
from megatron_zero.errors import DataError
from megatron_zero.loss.length_weighted import DEFAULT_ORD, global_length_stats, response_lengths, token_weights
from megatron_zero.models.vlm import expand_image_placeholders

log = logging.getLogger(__name__)


def response_segments(loss_mask: torch.Tensor) -> torch.Tensor:
    """Response ids ``[b, s]``: each maximal run of loss-carrying tokens of a row is one response (one assistant
    turn: turns are separated by the user's tokens, which carry no loss). -1 off the mask."""
    m = loss_mask.bool()
    starts = m & ~torch.nn.functional.pad(m, (1, 0))[:, :-1]
    ids = torch.cumsum(starts.long(), dim=1) - 1
    return torch.where(m, ids, torch.full_like(ids, -1))


class VLMBatches:
    """Builds this DP rank's micro-batches of any iteration."""

    def __init__(self, dataset, *, image_token_id: int, num_image_embeddings: int, seq_length: int, pad_id: int,
                 global_batch_size: int, micro_batch_size: int, dp_rank: int, dp_size: int, seed: int,
                 load_image: Callable[[str], torch.Tensor], loss_weighting: str = "token-mean",
                 loss_weighting_ord: float = DEFAULT_ORD, dp_group=None, strict_images: bool = False,
                 pad_to_multiple_of: int = 1):
        self.dataset = dataset
        self.image_token_id = image_token_id
        self.num_image_embeddings = num_image_embeddings
        self.seq_length = seq_length
        self.pad_id = pad_id
        self.load_image = load_image
        self.loss_weighting = loss_weighting
        self.ord = loss_weighting_ord
        self.dp_group = dp_group
        self.strict_images = strict_images
        self.pad_to_multiple_of = pad_to_multiple_of
        self.skipped_samples = 0  # samples dropped on this rank for a missing/corrupt image
        self.max_replacements = 1000
        self.sampler = ResumableDistributedSampler(len(dataset), global_batch_size, micro_batch_size, dp_rank,
                                                   dp_size, seed=seed)

    def _indices(self, iteration: int) -> list[list[int]]:
        """Dataset indices of this rank's micro-batches of ``iteration`` (epochs wrap around)."""
        s = self.sampler
        epoch, step = divmod(iteration, s.steps_per_epoch)
        s.load_state_dict({**s.state_dict(), "epoch": epoch, "consumed_samples": step * s.global_batch_size})
        it = iter(s)
        return [next(it) for _ in range(s.micro_batches_per_step)]

    def _tokens(self, samples: Sequence[Sample]):
        ids = [s.input_ids.tolist() for s in samples]
        labels, masks = [], []
        for s in samples:  # shift: position i predicts token i+1
            lab = s.input_ids[1:].tolist() + [self.pad_id]
            msk = s.loss_mask[1:].tolist() + [False]
            labels.append([t if m else -100 for t, m in zip(lab, msk)])
            masks.append(msk)
        return expand_image_placeholders(ids, labels, masks, self.image_token_id, self.num_image_embeddings,
                                         self.seq_length, self.pad_id, self.pad_to_multiple_of)

    def _load_sample(self, index: int) -> tuple[Sample, list[torch.Tensor]]:
        """The first sample from ``index`` on whose images all load, and its images (dropped ones are counted)."""
        n = len(self.dataset)
        for k in range(min(n, self.max_replacements + 1)):
            i = (index + k) % n
            sample = self.dataset[i]
            try:
                return sample, [self.load_image(p) for p in sample.image_paths]
            except ImageLoadError as e:
                if self.strict_images:
                    raise
                self.skipped_samples += 1
                log.warning("%s: sample %d dropped and replaced by the next one (%d dropped on this rank so far)",
                            e, i, self.skipped_samples)
        raise DataError(f"samples {index}..{index + k} (of {n}) all have missing or corrupt images; check the "
                        f"data's image paths and --image-root")

    def total_skipped(self) -> int:
        """Samples dropped for bad images, summed over the DP ranks (a collective over the DP group)."""
        import torch.distributed as dist

        count = torch.tensor([self.skipped_samples], dtype=torch.int64)
        if dist.is_initialized() and dist.get_world_size(self.dp_group) > 1:
            dist.all_reduce(count, group=self.dp_group)
        return int(count.item())

    def iteration(self, iteration: int) -> Iterator[dict]:
        """This rank's micro-batches of ``iteration`` (the images are loaded first: a sample with a bad one is
        replaced before the token tensors and the length statistics are built)."""
        loaded = [[self._load_sample(i) for i in idx] for idx in self._indices(iteration)]
        groups = [[sample for sample, _ in g] for g in loaded]
        images = [[im for _, ims in g for im in ims] for g in loaded]
        expanded = [self._tokens(g) for g in groups]
        stats = None
        if self.loss_weighting != "token-mean":
            local = [response_lengths(e.loss_mask, response_segments(e.loss_mask))[0] for e in expanded]
            stats = global_length_stats(local, self.loss_weighting, self.ord, group=self.dp_group)
        for ims, e in zip(images, expanded):
            batch = {
                "tokens": e.input_ids, "labels": e.labels.clamp(min=0), "loss_mask": e.loss_mask.float(),
                "image_mask": e.image_mask, "images": torch.stack(ims) if ims else None,
                "position_ids": torch.arange(e.input_ids.shape[1]).unsqueeze(0).expand_as(e.input_ids),
            }
            if stats is not None:
                batch["token_weights"] = token_weights(e.loss_mask, response_segments(e.loss_mask), stats)
            dev = platform.device()
            yield {k: (v.to(dev, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def vlm_forward_step(data_iterator, model):
    """megatron schedule forward step for the VLM (per-token loss convention, optional length weights)."""
    from functools import partial

    from megatron_zero.training.train_step import lm_loss_func

    b = next(data_iterator)
    out = model(b["tokens"], b["position_ids"], None, images=b["images"], image_mask=b["image_mask"],
                labels=b["labels"])
    return out, partial(lm_loss_func, b["loss_mask"], token_weights=b.get("token_weights"))
