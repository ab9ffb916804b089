"""Where a training run's initial weights come from: one function per part, any supported format.

Decoder (``--decoder-load``): a VLM checkpoint (``vlm_config.json``: written by ``tools/graft.py`` and by
``pretrain_vlm``'s export, also found in a run's ``export/`` sub-directory), an HF Llama directory, or a
megatron_zero ``torch_dist`` model checkpoint (``tools/convert_checkpoint.py``).

Encoder (``--encoder-load``): a VLM checkpoint, an image-encoder checkpoint (``image_encoder.json``), or an HF
``CLIPVisionModel`` directory (CLIP tower only: the adapter and start/end embeddings start fresh).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable, Optional

import torch

from megatron_zero.models.clip_vit import ClipVisionConfig
from megatron_zero.models.llama_config import LlamaConfig
from megatron_zero.errors import UserError


class WeightSourceError(UserError, ValueError):
    """A ``--decoder-load``/``--encoder-load`` path that is not a checkpoint we can read."""


def vlm_checkpoint_dir(path: str) -> Optional[str]:
    """``path`` or ``path/export`` if it holds a VLM checkpoint."""
    from megatron_zero.models.vlm import VLM_CONFIG_FILE

    for d in (path, os.path.join(path, "export")):
        if os.path.isfile(os.path.join(d, VLM_CONFIG_FILE)):
            return d
    return None


@dataclasses.dataclass
class DecoderSource:
    cfg: LlamaConfig
    kind: str  # "canonical" (getter) or "mcore" (load straight into the model chunks)
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
        for d in decoders:
            sharding.load_canonical(d, self.getter, ps.get_tensor_model_parallel_rank(),
                                    ps.get_tensor_model_parallel_world_size(), source=self.path, skip=skip)


def resolve_decoder(path: str, flag: str = "--decoder-load") -> DecoderSource:
    if not os.path.exists(path):
        raise WeightSourceError(f"{flag} {path}: no such directory")
    vlm = vlm_checkpoint_dir(path)
    if vlm is not None:
        from megatron_zero.checkpointing.vlm_checkpoint import DECODER_DIR, load_vlm_checkpoint
        from megatron_zero.models.vlm import VLM_CONFIG_FILE, VLMConfig

        decoder_dir = os.path.join(vlm, DECODER_DIR)
        if os.path.isfile(os.path.join(decoder_dir, "checkpoint_meta.json")):  # a training run's export
            cfg = VLMConfig.load(os.path.join(vlm, VLM_CONFIG_FILE))
            return DecoderSource(cfg.decoder, "mcore", None, decoder_dir)
        cfg, _, getter = load_vlm_checkpoint(vlm)
        return DecoderSource(cfg.decoder, "canonical", getter, vlm)
    if os.path.isfile(os.path.join(path, "config.json")):
        from megatron_zero.checkpointing.vlm_checkpoint import HFDecoder

        hf = HFDecoder(path)
        return DecoderSource(hf.cfg, "canonical", hf.canonical_getter(), path)
    if os.path.isfile(os.path.join(path, "checkpoint_meta.json")):
        from megatron_zero.checkpointing import mcore_checkpoint

        return DecoderSource(mcore_checkpoint.load_model_config(path), "mcore", None, path)
    raise WeightSourceError(
        f"{flag} {path}: not a VLM checkpoint (vlm_config.json), an HF Llama directory (config.json) or a "
        f"megatron_zero model checkpoint (checkpoint_meta.json)")


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
    from megatron_zero.models.clip_vit import get_vision_preset

    if path is None:
        if vision_preset is None:
            raise WeightSourceError(f"give {flag} (a checkpoint) or --vision-model (a preset, fresh weights)")
        return EncoderSource(dataclasses.replace(get_vision_preset(vision_preset),
                                                 feature_convention=feature_convention), None)
    if not os.path.exists(path):
        raise WeightSourceError(f"{flag} {path}: no such directory")
    from megatron_zero.checkpointing import vlm_checkpoint

    vlm = vlm_checkpoint_dir(path)
    enc_dir = vlm or (path if os.path.isfile(os.path.join(path, vlm_checkpoint.ENCODER_META)) else None)
    if enc_dir is not None:
        meta, tensors = vlm_checkpoint.load_image_encoder(enc_dir)
        return EncoderSource(ClipVisionConfig.from_dict(meta["vision"]), tensors, meta["image_token_id"], enc_dir)
    cfg_file = os.path.join(path, "config.json")
    if os.path.isfile(cfg_file):
        from megatron_zero.checkpointing import hf_clip
        from megatron_zero.checkpointing.hf_reader import HFCheckpoint

        with open(cfg_file) as f:
            hf_cfg = json.load(f)
        hf_cfg = hf_cfg.get("vision_config", hf_cfg)  # a full CLIPModel config nests the tower's
        vision = ClipVisionConfig.from_hf_config(hf_cfg, feature_convention, name=os.path.basename(path.rstrip("/")))
        ckpt = HFCheckpoint(path)
        prefix = hf_clip.detect_prefix(ckpt.weight_map.keys())
        getter = hf_clip.canonical_getter(ckpt.get, vision, prefix)
        tensors = {k: getter(k) for k in hf_clip.canonical_keys(vision)}
        return EncoderSource(vision, tensors, None, path, partial=True)
    raise WeightSourceError(f"{flag} {path}: not a VLM checkpoint, an image-encoder checkpoint "
                            f"(image_encoder.json) or an HF CLIP directory (config.json)")
