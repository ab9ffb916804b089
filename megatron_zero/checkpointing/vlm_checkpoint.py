"""VLM-side checkpoint files: image-encoder checkpoints, VLM checkpoints (graft output, training exports), HF
Llama decoder directories read lazily, and the decoder identity an encoder records.

On-disk formats (plain files, readable without this package):

* **Image-encoder checkpoint** (a directory)::

      image_encoder.safetensors   canonical ImageEncoder tensors (vision_model.*, adapter.*, image_*_embedding)
      image_encoder.json          {"format", "vision": ClipVisionConfig, "decoder_hidden_size", "image_token_id",
                                   "trained_with": decoder identity (below)}

  ``trained_with`` identifies the decoder the encoder was trained with: its name, hidden size, vocabulary
  size, number of layers, the surrogate provenance (``LlamaConfig.surrogate``: ``target``, ``a``, ``b``, ...),
  a fingerprint of its word-embedding table (SHA-256 of 1024 evenly spaced rows in float32 -- a surrogate
  inherits its target's embeddings, so equal fingerprints mean same vocabulary *and* same embedding space)
  and, when known, a hash of the tokenizer files.

* **VLM checkpoint** (what :func:`megatron_zero.grafting.graft` writes, and ``pretrain_vlm``'s ``<save>/export``)::

      vlm_config.json             VLMConfig (+ a "graft" record: sources, checks, forced)
      image_encoder.safetensors   the image encoder (copied byte for byte by grafting)
      image_encoder.json
      decoder/                    graft: the target decoder's HF Llama files (config.json, *.safetensors[, index],
                                  tokenizer files), hard-linked when possible, else copied: bit-identical;
                                  training export: a megatron_zero torch_dist model checkpoint

Writes go to a temporary directory next to the output, renamed into place with ``os.replace`` once complete.
Which of these a path is (and everything else a user may hold) is decided by
:func:`megatron_zero.checkpointing.resolve.resolve_checkpoint`.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from typing import Callable, Mapping, Optional

import torch

from megatron_zero.checkpointing import hf_llama
from megatron_zero.checkpointing.hf_writer import atomic_directory
from megatron_zero.models.clip_vit import ClipVisionConfig
from megatron_zero.models.llama_config import LlamaConfig
from megatron_zero.models.vlm import VLM_CONFIG_FILE, VLMConfig
from megatron_zero.errors import UserError

ENCODER_FORMAT = "megatron_zero.image_encoder/1"
ENCODER_TENSORS = "image_encoder.safetensors"
ENCODER_META = "image_encoder.json"
DECODER_DIR = "decoder"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer.tiktoken")
_DECODER_FILE_SUFFIXES = (".safetensors", ".safetensors.index.json")
_DECODER_FILES = ("config.json", "generation_config.json", "tokenizer_config.json", "special_tokens_map.json",
                  *TOKENIZER_FILES)


class VLMCheckpointError(UserError, ValueError):
    """An image-encoder / VLM / HF decoder checkpoint that is missing or malformed."""


# ---------------------------------------------------------------------------------------------------------
# Identities
# ---------------------------------------------------------------------------------------------------------
def embedding_fingerprint(embedding: torch.Tensor) -> str:
    """SHA-256 of 1024 evenly spaced rows of a ``[vocab, hidden]`` embedding table, in float32."""
    rows = torch.linspace(0, embedding.shape[0] - 1, min(embedding.shape[0], 1024)).round().long()
    data = embedding.detach()[rows].float().cpu().contiguous().numpy().tobytes()
    return hashlib.sha256(data + repr(tuple(embedding.shape)).encode()).hexdigest()


def tokenizer_hash(directory: str) -> Optional[str]:
    """SHA-256 over the tokenizer files found in ``directory`` (None when there are none)."""
    h = hashlib.sha256()
    found = False
    for name in TOKENIZER_FILES:
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            found = True
            h.update(name.encode())
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest() if found else None


def decoder_identity(cfg: LlamaConfig, embedding: torch.Tensor, tokenizer_sha: Optional[str] = None,
                     source: Optional[str] = None) -> dict:
    """What an encoder checkpoint records about the decoder it was trained with."""
    return {"name": cfg.name, "source": source, "hidden_size": cfg.hidden_size, "vocab_size": cfg.vocab_size,
            "num_layers": cfg.num_layers, "surrogate": cfg.surrogate,
            "embedding_fingerprint": embedding_fingerprint(embedding), "tokenizer_hash": tokenizer_sha}


# ---------------------------------------------------------------------------------------------------------
# Atomic directory writes
# ---------------------------------------------------------------------------------------------------------
def _atomic_dir(path: str, fill: Callable[[str], None], overwrite: bool) -> None:
    """Write a directory atomically (temp dir, then rename; see ``hf_writer.atomic_directory``)."""
    with atomic_directory(path, overwrite) as tmp:
        fill(tmp)


def _write_json(path: str, obj: dict) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)


# ---------------------------------------------------------------------------------------------------------
# Image-encoder checkpoints
# ---------------------------------------------------------------------------------------------------------
def save_image_encoder(path: str, encoder_state: Mapping[str, torch.Tensor], vision_cfg: ClipVisionConfig,
                       image_token_id: int, trained_with: dict, overwrite: bool = False) -> None:
    """Write an image-encoder checkpoint (see the module docstring)."""
    from safetensors.torch import save_file

    hidden = encoder_state["adapter.linear_fc2.weight"].shape[0]
    if hidden != trained_with["hidden_size"]:
        raise VLMCheckpointError(f"adapter output size {hidden} != hidden size {trained_with['hidden_size']} of the "
                            f"decoder it was trained with")
    meta = {"format": ENCODER_FORMAT, "vision": vision_cfg.to_dict(), "decoder_hidden_size": hidden,
            "image_token_id": int(image_token_id), "trained_with": trained_with}

    def fill(tmp: str) -> None:
        save_file({k: v.detach().cpu().contiguous() for k, v in encoder_state.items()},
                  os.path.join(tmp, ENCODER_TENSORS), metadata={"format": ENCODER_FORMAT})
        _write_json(os.path.join(tmp, ENCODER_META), meta)

    _atomic_dir(path, fill, overwrite)


def save_image_encoder_from_model(path: str, model, tokenizer_sha: Optional[str] = None,
                                  overwrite: bool = True) -> None:
    """Write the image-encoder checkpoint of a live (first-stage) VLM chunk, recording its decoder's identity.

    Collective over the tensor-parallel group (TP pieces are gathered); the first data-parallel, TP-rank-0
    process writes. Call it on every rank of the first pipeline stage.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_zero.models.vlm import encoder_canonical_state
    from megatron_zero.parallel import sharding

    if model.vision is None:
        raise VLMCheckpointError("this VLM chunk holds no encoder (call on the first pipeline stage)")
    encoder = encoder_canonical_state(model)
    embedding = None
    for key, tensor in sharding.iter_canonical(model.language_model, ps.get_tensor_model_parallel_group(),
                                               model.cfg.decoder.vocab_size):
        if key == "embedding.word_embeddings.weight":
            embedding = tensor
    writer = not dist.is_initialized() or (ps.get_tensor_model_parallel_rank() == 0
                                           and ps.get_data_parallel_rank() == 0)
    if writer:
        save_image_encoder(path, encoder, model.cfg.vision, model.cfg.image_token_id,
                           decoder_identity(model.cfg.decoder, embedding, tokenizer_sha), overwrite=overwrite)


def read_image_encoder_meta(path: str) -> dict:
    meta_path = os.path.join(path, ENCODER_META)
    if not os.path.isfile(meta_path) or not os.path.isfile(os.path.join(path, ENCODER_TENSORS)):
        raise VLMCheckpointError(f"{path} is not an image-encoder checkpoint (expected {ENCODER_META} and "
                            f"{ENCODER_TENSORS})")
    with open(meta_path) as f:
        meta = json.load(f)
    if meta.get("format") != ENCODER_FORMAT:
        raise VLMCheckpointError(f"{meta_path}: format {meta.get('format')!r}, expected {ENCODER_FORMAT!r}")
    return meta


def load_image_encoder(path: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(metadata, canonical encoder tensors)`` of an image-encoder (or VLM) checkpoint."""
    from safetensors.torch import load_file

    meta = read_image_encoder_meta(path)
    return meta, load_file(os.path.join(path, ENCODER_TENSORS))


# ---------------------------------------------------------------------------------------------------------
# HF Llama decoders
# ---------------------------------------------------------------------------------------------------------
class HFDecoder:
    """An HF Llama checkpoint directory read lazily: ``cfg``, ``get(hf_name)``, ``canonical_getter()``."""

    def __init__(self, path: str):
        from megatron_zero.checkpointing.hf_reader import CheckpointFormatError, HFCheckpoint

        self.path = os.path.abspath(path)
        try:
            self.checkpoint = HFCheckpoint(path)
        except CheckpointFormatError as e:
            raise VLMCheckpointError(f"{path}: not a readable HF Llama checkpoint: {e}") from None
        self.cfg = LlamaConfig.from_hf_config(self.checkpoint.config, name=os.path.basename(self.path))

    def get(self, name: str) -> torch.Tensor:
        return self.checkpoint.get(name)

    def canonical_getter(self) -> Callable[[str], torch.Tensor]:
        return hf_llama.canonical_getter(self.get, self.cfg)

    def identity(self) -> dict:
        return decoder_identity(self.cfg, self.get("model.embed_tokens.weight"), tokenizer_hash(self.path),
                                source=self.path)


def save_hf_decoder(path: str, cfg: LlamaConfig, canonical: Mapping[str, torch.Tensor]) -> None:
    """Write canonical decoder tensors as an HF Llama directory (``config.json`` + ``model.safetensors``)."""
    from safetensors.torch import save_file

    def fill(tmp: str) -> None:
        tensors = dict(hf_llama.iter_hf(iter(canonical.items()), cfg))
        save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(tmp, "model.safetensors"),
                  metadata={"format": "pt"})
        _write_json(os.path.join(tmp, "config.json"), cfg.to_hf_config())

    _atomic_dir(path, fill, overwrite=True)


def load_vlm_checkpoint(path: str) -> tuple[VLMConfig, dict[str, torch.Tensor], Callable[[str], torch.Tensor]]:
    """``(VLMConfig, canonical encoder tensors, canonical decoder getter)`` of a VLM checkpoint whose ``decoder/`` is
    an HF Llama directory (graft output). Any VLM checkpoint, training exports included, loads through
    :func:`megatron_zero.checkpointing.resolve.resolve_checkpoint`."""
    cfg_path = os.path.join(path, VLM_CONFIG_FILE)
    if not os.path.isfile(cfg_path):
        raise VLMCheckpointError(f"{path} is not a VLM checkpoint (no {VLM_CONFIG_FILE})")
    cfg = read_vlm_config(path)
    _, encoder = load_image_encoder(path)
    decoder = HFDecoder(os.path.join(path, DECODER_DIR))
    return cfg, encoder, decoder.canonical_getter()


def read_vlm_config(path: str) -> VLMConfig:
    """The ``VLMConfig`` of a VLM checkpoint directory (its graft record, if any, dropped)."""
    with open(os.path.join(path, VLM_CONFIG_FILE)) as f:
        raw = json.load(f)
    raw.pop("graft", None)
    return VLMConfig.from_dict(raw)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def write_vlm_checkpoint(output: str, encoder_path: str, decoder_path: str, cfg: VLMConfig,
                         record: Optional[dict] = None, overwrite: bool = False) -> None:
    """Place an image-encoder checkpoint and an HF Llama decoder directory side by side as a VLM checkpoint,
    unchanged (encoder files copied, decoder files hard-linked or copied), atomically."""
    def fill(tmp: str) -> None:
        for name in (ENCODER_TENSORS, ENCODER_META):
            shutil.copy2(os.path.join(encoder_path, name), os.path.join(tmp, name))
        dec = os.path.join(tmp, DECODER_DIR)
        os.makedirs(dec)
        for name in sorted(os.listdir(decoder_path)):
            if name.endswith(_DECODER_FILE_SUFFIXES) or name in _DECODER_FILES:
                _link_or_copy(os.path.join(decoder_path, name), os.path.join(dec, name))
        _write_json(os.path.join(tmp, VLM_CONFIG_FILE), {**cfg.to_dict(), **({"graft": record} if record else {})})

    _atomic_dir(output, fill, overwrite)
