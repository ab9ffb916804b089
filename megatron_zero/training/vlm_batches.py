"""Micro-batches for VLM (and text instruction) training: tokenised samples -> expanded rows + images + weights.

Two layouts of the same samples (a step always trains the ``--global-batch-size`` samples of its iteration):

* **packed** (``--pack-sequences``, the default): this DP rank's samples of the step are packed into rows of
  ``--seq-length`` positions, each row filled as full as possible (:func:`~megatron_zero.data.packing.pack_rows`,
  lengths measured after image expansion), ``--micro-batch-size`` rows per micro-batch. A micro-batch is flattened to
  megatron's THD layout ``[1, rows * seq_length]`` with ``cu_seqlens`` (one segment per sample plus each row's
  padding tail), so attention stays inside each sample (TE's THD attention on GPU,
  :class:`~megatron_zero.models.attention.SDPACoreAttention` on CPU), RoPE positions restart per sample, labels are
  shifted inside each sample and the images are spliced at their samples' placeholders. Rows keep
  ``--seq-length`` positions, so pipeline P2P shapes are static (``rows * seq_length`` x 1). The number of
  micro-batches of a step is the number of rows needed (the maximum over DP ranks; a rank with fewer rows runs
  all-padding micro-batches, which carry no loss).
* **padded** (``--no-pack-sequences``): one sample per row, right-padded to ``--seq-length``; a step is
  ``global batch / (micro batch x DP)`` micro-batches.

The token-mean loss and the paper's length-weighted loss are normalised over the whole global batch
(:mod:`megatron_zero.loss.length_weighted`), so both layouts give the same loss and gradients (tested). The
authors' released variant takes a maximum over each *micro-batch*, so it depends on the layout by definition.

The data of iteration ``i`` is a pure function of (seed, ``i``) through
:class:`~megatron_zero.data.sampler.ResumableDistributedSampler` (and packing is deterministic), so resuming
replays exactly. Each step reports its real (sample) and computed (row) positions over all DP ranks. A sample
whose image is missing or corrupt is dropped and replaced by the next loadable sample of the dataset (index + 1,
+ 2, ...), before anything is packed: still a pure function of (seed, ``i``) and the files, so the data position
stays exact on resume; the dropped samples are counted over all DP ranks (``--strict-images`` fails instead).
"""
from __future__ import annotations

import logging
from functools import partial
from typing import Callable, Iterator, Optional, Sequence

import torch

from megatron_zero.config import RunConfig
from megatron_zero.data.datasets import Sample
from megatron_zero.data.images import ImageLoadError
from megatron_zero.data.sampler import ResumableDistributedSampler
from megatron_zero.errors import DataError
from megatron_zero.data.packing import collate_packed, expand_image_placeholders as expand_packed, pack_rows
from megatron_zero.loss.length_weighted import (DEFAULT_ORD, global_length_stats, released_segments,
                                                released_token_weights, response_lengths, token_weights)
from megatron_zero.models.vlm import expand_image_placeholders
from megatron_zero.training.train_step import lm_loss_func, packed_seq_params, to_device

log = logging.getLogger(__name__)


def response_segments(loss_mask: torch.Tensor) -> torch.Tensor:
    """Response ids ``[b, s]``: each maximal run of loss-carrying tokens of a row is one response (one assistant
    turn: turns are separated by the user's tokens, which carry no loss). -1 off the mask."""
    m = loss_mask.bool()
    starts = m & ~torch.nn.functional.pad(m, (1, 0))[:, :-1]
    ids = torch.cumsum(starts.long(), dim=1) - 1
    return torch.where(m, ids, torch.full_like(ids, -1))


class StepBatches:
    """One rank's micro-batches of one step (an iterator, as megatron's schedules want) and what the training loop
    needs to know about them: how many there are, the schedule's tensor shape, and the step's real and computed
    positions summed over all data-parallel ranks."""

    def __init__(self, batches: Iterator[dict], num_microbatches: int, schedule_shape: tuple[int, int],
                 real_tokens: int, computed_tokens: int):
        self._it = iter(batches)
        self.num_microbatches = num_microbatches
        self.schedule_shape = schedule_shape  # (seq_length, micro_batch_size) for get_forward_backward_func
        self.real_tokens = real_tokens
        self.computed_tokens = computed_tokens

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        return next(self._it)


class VLMBatches:
    """Builds this DP rank's micro-batches of any iteration (packed or one sample per row)."""

    def __init__(self, dataset, *, image_token_id: Optional[int], num_image_embeddings: int, seq_length: int,
                 pad_id: int, global_batch_size: int, micro_batch_size: int, dp_rank: int, dp_size: int, seed: int,
                 load_image: Optional[Callable[[str], torch.Tensor]] = None, loss_weighting: str = "token-mean",
                 loss_weighting_ord: float = DEFAULT_ORD, dp_group=None, strict_images: bool = False,
                 pad_to_multiple_of: int = 1, pack_sequences: bool = False, microbatch_multiple: int = 1,
                 eot_id: Optional[int] = None, loss_weighting_avg_norm: bool = False):
        self.dataset = dataset
        self.image_token_id = image_token_id
        self.num_image_embeddings = num_image_embeddings
        self.seq_length = seq_length
        self.pad_id = pad_id
        self.load_image = load_image
        self.loss_weighting = loss_weighting
        self.ord = loss_weighting_ord
        self.eot_id = eot_id
        self.avg_norm = loss_weighting_avg_norm
        if loss_weighting == "length-weighted-released" and eot_id is None:
            raise ValueError("--loss-weighting length-weighted-released needs the turn-end token id (eot_id)")
        self.dp_group = dp_group
        self.dp_size = dp_size
        self.micro_batch_size = micro_batch_size
        self.strict_images = strict_images
        self.pad_to_multiple_of = pad_to_multiple_of
        self.pack_sequences = pack_sequences
        self.microbatch_multiple = microbatch_multiple  # the interleaved schedule wants a multiple of PP
        if pack_sequences and seq_length % pad_to_multiple_of:
            raise ValueError(f"--seq-length {seq_length} must be a multiple of {pad_to_multiple_of}")
        self.skipped_samples = 0  # samples dropped on this rank for a missing/corrupt image
        self.max_replacements = 1000
        self._counted: set[int] = set()  # iterations whose drops are counted (VPP builds an iteration per chunk)
        self.sampler = ResumableDistributedSampler(len(dataset), global_batch_size, micro_batch_size, dp_rank,
                                                   dp_size, seed=seed)

    @classmethod
    def from_config(cls, dataset, cfg: RunConfig, *, pad_id: Optional[int], image_token_id: Optional[int] = None,
                    num_image_embeddings: int = 1, image_size: Optional[int] = None,
                    eot_id: Optional[int] = None, read_image=None,
                    load_image: Optional[Callable[[str], torch.Tensor]] = None) -> "VLMBatches":
        """The micro-batches a run of ``cfg`` trains on, for this rank of megatron's data-parallel group (call it
        after the process groups exist). What the model and tokenizer decide comes as arguments: the placeholder
        id and embeddings per image (``None``/1 for text-only data), the encoder's ``image_size`` (images are
        loaded only with it), the pad id and the turn-end id. ``read_image(path, image_size)`` reads an image of the
        data source (default: a file, :func:`megatron_zero.data.images.load_image`; a shard dataset's reader).
        ``load_image(path)`` instead gives the image tensors directly (in-memory images: the demo, benchmarks)."""
        from megatron.core import parallel_state as ps

        from megatron_zero.data import images

        read_image = read_image or images.load_image
        t, s, p = cfg.training, cfg.stage, cfg.parallel
        return cls(dataset, image_token_id=image_token_id, num_image_embeddings=num_image_embeddings,
                   seq_length=t.seq_length, pad_id=pad_id if pad_id is not None else 0,
                   global_batch_size=t.global_batch_size, micro_batch_size=t.micro_batch_size,
                   dp_rank=ps.get_data_parallel_rank(), dp_size=ps.get_data_parallel_world_size(), seed=t.seed,
                   load_image=load_image if load_image is not None or image_size is None else (
                       lambda path: read_image(path, image_size)),
                   loss_weighting=s.loss_weighting,
                   loss_weighting_ord=DEFAULT_ORD if s.loss_weighting_ord is None else s.loss_weighting_ord,
                   loss_weighting_avg_norm=s.loss_weighting_avg_norm, dp_group=ps.get_data_parallel_group(),
                   strict_images=cfg.data.strict_images, pad_to_multiple_of=16 if cfg.model.fp8_format else 1,
                   pack_sequences=cfg.data.pack_sequences,
                   microbatch_multiple=p.pipeline_model_parallel_size if p.virtual_pipeline_model_parallel_size else 1,
                   eot_id=eot_id)

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

    def _packed(self, samples: Sequence[Sample], rows: Sequence[Sequence[int]]):
        """``rows`` (indices into ``samples``; empty rows allowed) as an expanded batch of ``seq_length`` rows."""
        if not any(rows):
            shape = (len(rows), self.seq_length)
            n = shape[0] * shape[1]
            from megatron_zero.data.packing import ExpandedBatch

            return ExpandedBatch(torch.full(shape, self.pad_id, dtype=torch.long), torch.full(shape, -100),
                                 torch.zeros(shape, dtype=torch.bool), torch.zeros(shape, dtype=torch.bool),
                                 torch.arange(shape[1]).expand(shape).clone(), torch.full(shape, -1),
                                 torch.arange(0, n + 1, shape[1], dtype=torch.int32), shape[1], [])
        packed = collate_packed(samples, rows, self.pad_id)
        return expand_packed(packed, self.image_token_id, self.num_image_embeddings, self.pad_id, self.seq_length)

    def _resolve(self, index: int, cache: dict, dropped: list) -> int:
        """The first dataset index from ``index`` on whose images all load (into ``cache``); drops go to
        ``dropped``."""
        n = len(self.dataset)
        for k in range(min(n, self.max_replacements + 1)):
            i = (index + k) % n
            paths = self.dataset[i].image_paths
            try:
                for p in paths:
                    if p not in cache:
                        cache[p] = self.load_image(p)
                return i
            except ImageLoadError as e:
                if self.strict_images:
                    raise
                dropped.append((i, e))
        raise DataError(f"samples {index}..{index + k} (of {n}) all have missing or corrupt images; check the "
                        f"data's image paths and --image-root")

    @staticmethod
    def _images(paths: Sequence[str], cache: dict) -> Optional[torch.Tensor]:
        return torch.stack([cache[p] for p in paths]) if paths else None

    def total_skipped(self) -> int:
        """Samples dropped for bad images, summed over the DP ranks (a collective over the DP group)."""
        (total,) = self._dp_reduce([float(self.skipped_samples)], "sum")
        return int(total)

    def _dp_reduce(self, values: list[float], op: str) -> list[float]:
        """``values`` reduced (``"max"`` | ``"sum"``) over the data-parallel ranks."""
        if self.dp_group is None or self.dp_size == 1:
            return values
        from megatron_zero.parallel.collectives import all_reduce_values

        return all_reduce_values(values, op, self.dp_group)

    def iteration(self, iteration: int) -> StepBatches:
        """This rank's micro-batches of ``iteration`` (images are loaded first: a sample with a bad one is replaced
        before anything is packed or counted)."""
        cache: dict = {}  # path -> image tensor, loaded while choosing the samples
        dropped: list = []
        index_groups = [[self._resolve(i, cache, dropped) for i in idx] for idx in self._indices(iteration)]
        if iteration not in self._counted:
            self._counted.add(iteration)
            for i, e in dropped:
                self.skipped_samples += 1
                log.warning("%s: sample %d dropped and replaced by the next one (%d dropped on this rank so far)",
                            e, i, self.skipped_samples)
        groups = [[self.dataset[i] for i in idx] for idx in index_groups]
        mbs, seq = self.micro_batch_size, self.seq_length
        if self.pack_sequences:
            samples = [s for g in groups for s in g]
            indices = [i for idx in index_groups for i in idx]
            rows = pack_rows([s.expanded_length(self.num_image_embeddings) for s in samples], seq)
            local = -(-len(rows) // mbs)
            (n_mb,) = self._dp_reduce([float(local)], "max")
            n_mb = int(n_mb)
            n_mb = -(-n_mb // self.microbatch_multiple) * self.microbatch_multiple
            rows = rows + [[] for _ in range(n_mb * mbs - len(rows))]
            mb_rows = [rows[k * mbs:(k + 1) * mbs] for k in range(n_mb)]
            expanded = [self._packed(samples, r) for r in mb_rows]
            sample_index = [[[indices[i] for i in row] for row in r] for r in mb_rows]
            paths = [e.image_paths for e in expanded]
            shape = (mbs * seq, 1)
        else:
            expanded = [self._tokens(g) for g in groups]
            sample_index = [[[i] for i in idx] for idx in index_groups]
            paths = [[p for s in g for p in s.image_paths] for g in groups]
            n_mb = len(expanded)
            shape = (seq, mbs)
        real_local = sum(int((e.segment_ids >= 0).sum()) for e in expanded)
        (real,) = self._dp_reduce([float(real_local)], "sum")
        computed = n_mb * mbs * seq * self.dp_size
        stats = None
        released = None
        if self.loss_weighting == "length-weighted-released":  # their segments, per-micro-step statistics
            segs = [released_segments(e.labels, e.loss_mask, e.segment_ids, e.image_mask, self.eot_id)
                    for e in expanded]
            released = released_token_weights(segs, self.ord, self.avg_norm, group=self.dp_group)
        elif self.loss_weighting != "token-mean":
            local = [response_lengths(e.loss_mask, response_segments(e.loss_mask))[0] for e in expanded]
            stats = global_length_stats(local, self.loss_weighting, self.ord, group=self.dp_group)

        def build():
            for k, (e, idx, image_paths) in enumerate(zip(expanded, sample_index, paths)):
                # the dataset index of the sample at every position (-1: padding)
                table = torch.tensor([-1] + [i for row in idx for i in row])
                offsets = torch.tensor([0] + [len(row) for row in idx]).cumsum(0)[:-1]
                seg = e.segment_ids
                position_sample = table[torch.where(seg >= 0, seg + offsets[:, None] + 1, 0)]
                weights = released[k] if released is not None else None
                if stats is not None:
                    weights = token_weights(e.loss_mask, response_segments(e.loss_mask), stats)
                batch = {
                    "tokens": e.input_ids, "labels": e.labels.clamp(min=0), "loss_mask": e.loss_mask.float(),
                    "image_mask": e.image_mask, "position_ids": e.position_ids, "sample_index": position_sample,
                    "token_weights": weights,
                }
                if self.pack_sequences:
                    batch = {k: (v.reshape(1, -1) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
                    batch["cu_seqlens"] = e.cu_seqlens
                    batch["max_seqlen"] = e.max_seqlen
                else:
                    batch["position_ids"] = torch.arange(seq).unsqueeze(0).expand_as(e.input_ids)
                batch["images"] = self._images(image_paths, cache)
                if batch["token_weights"] is None:
                    del batch["token_weights"]
                yield to_device(batch)

        return StepBatches(build(), n_mb, shape, int(real), computed)


def vlm_forward_step(data_iterator, model):
    """megatron schedule forward step for the VLM (per-token loss convention, optional length weights)."""
    b = next(data_iterator)
    out = model(b["tokens"], b["position_ids"], None, images=b["images"], image_mask=b["image_mask"],
                labels=b["labels"], packed_seq_params=packed_seq_params(b))
    return out, partial(lm_loss_func, b["loss_mask"], token_weights=b.get("token_weights"))
