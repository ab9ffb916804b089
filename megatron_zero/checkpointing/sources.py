"""Where a training run's initial weights come from: one function per part, anything the resolver reads.

Decoder (``--decoder-load``): anything :func:`megatron_zero.checkpointing.resolve.resolve_checkpoint` finds a
decoder in -- an HF Llama directory (target or surrogate), a megatron_zero ``torch_dist`` model checkpoint, a VLM
checkpoint (``tools/graft.py``), a training export (``<save>/export``) or a training run directory.

Encoder (``--encoder-load``): a VLM checkpoint, a training export or run, an image-encoder checkpoint
(``image_encoder.json``), or an HF ``CLIPVisionModel`` directory (CLIP tower only: the adapter and start/end
embeddings start fresh).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch

from megatron_zero.checkpointing.resolve import (
    DECODER_KINDS, ENCODER_KINDS, CheckpointResolveError, resolve_checkpoint,
)
from megatron_zero.models.clip_vit import ClipVisionConfig
from megatron_zero.models.llama_config import LlamaConfig


class WeightSourceError(CheckpointResolveError):
    """A ``--decoder-load``/``--encoder-load`` path that is not a checkpoint we can read."""


def _resolve(path: str, flag: str, accept):
    try:
        return resolve_checkpoint(path, flag, accept)
    except WeightSourceError:
        raise
    except ValueError as e:  # unrecognised, or a malformed file of a recognised kind
        raise WeightSourceError(str(e)) from None


@dataclasses.dataclass
class DecoderSource:
    cfg: LlamaConfig
    kind: str  # "canonical" (getter), "mcore" (a torch_dist model checkpoint) or "training" (an iter_* dir)
    getter: Optional[Callable[[str], torch.Tensor]] = None
    path: str = ""

    def load_into(self, chunks: list, skip: Optional[Callable[[str], bool]] = None) -> None:
        """Copy the weights into this rank's decoder chunks (``language_model`` of VLM chunks); tensors whose
        canonical key ``skip`` accepts are left as built (fresh LoRA adapters on a base decoder)."""
        from megatron.core import parallel_state as ps

        from megatron_zero.parallel import sharding

        decoders = [getattr(c, "language_model", c) for c in chunks]
        if self.kind == "mcore":
            from megatron_zero.checkpointing import mcore_checkpoint

            mcore_checkpoint.load_model(decoders, self.path, skip=skip)
            return
        if self.kind == "training":
            from megatron_zero.checkpointing.resolve import _load_training_weights

            _load_training_weights(decoders, self.path)
            return
        for d in decoders:
            sharding.load_canonical(d, self.getter, ps.get_tensor_model_parallel_rank(),
                                    ps.get_tensor_model_parallel_world_size(), source=self.path, skip=skip)


def resolve_decoder(path: str, flag: str = "--decoder-load") -> DecoderSource:
    from megatron_zero.checkpointing.resolve import decoder_source

    return decoder_source(_resolve(path, flag, DECODER_KINDS))


@dataclasses.dataclass
class EncoderSource:
    vision: ClipVisionConfig
    tensors: Optional[dict]  # canonical encoder tensors (None: fresh initialisation)
    image_token_id: Optional[int] = None
    path: str = ""
    partial: bool = False  # only the CLIP tower (HF CLIP): adapter/start/end embeddings are fresh

    def load_into(self, chunks: list, seed: int = 0) -> None:
        """Copy the weights into the chunk holding the encoder. With only a CLIP tower (``partial``), the adapter
        and start/end embeddings are initialised fresh from ``seed``, identically for every TP/PP layout."""
        from megatron.core import parallel_state as ps

        from megatron_zero.models.adapter import fresh_adapter_tensors
        from megatron_zero.parallel import sharding

        if self.tensors is None:
            return
        rank, size = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
        for c in chunks:
            if getattr(c, "vision", None) is None:
                continue
            if not self.partial:
                sharding.load_canonical(c.vision, self.tensors, rank, size, source=self.path)
                continue
            fresh = fresh_adapter_tensors(self.vision, c.cfg.decoder.hidden_size, seed,
                                          c.vision.adapter.linear_fc1.weight.dtype)
            tensors = {**{f"vision_model.{k}": v for k, v in self.tensors.items()}, **fresh}
            sharding.load_canonical(c.vision, tensors, rank, size, source=self.path)


def resolve_encoder(path: Optional[str], vision_preset: Optional[str] = None, feature_convention: str = "zero",
                    flag: str = "--encoder-load") -> EncoderSource:
    from megatron_zero.checkpointing.resolve import encoder_source
    from megatron_zero.models.clip_vit import get_vision_preset

    if path is None:
        if vision_preset is None:
            raise WeightSourceError(f"give {flag} (a checkpoint) or --vision-model (a preset, fresh weights)")
        return EncoderSource(dataclasses.replace(get_vision_preset(vision_preset),
                                                 feature_convention=feature_convention), None)
    ckpt = _resolve(path, flag, (*ENCODER_KINDS, "hf-clip"))
    try:
        return encoder_source(ckpt, feature_convention)
    except WeightSourceError:
        raise
    except ValueError as e:
        raise WeightSourceError(f"{flag} {path}: {e}") from None
