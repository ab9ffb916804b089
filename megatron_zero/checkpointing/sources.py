"""Loading any checkpoint the resolver classifies (:mod:`megatron_zero.checkpointing.resolve`), and where a
training run's initial weights come from: one function per part.

Loaders: :func:`decoder_source` / :func:`encoder_source` (weights into built model chunks, any TP/PP),
:func:`iter_decoder_canonical` (canonical decoder tensors streamed without a model), :func:`load_vlm`.
A training checkpoint (``iter_*``) is read by :func:`load_training_weights`: a trainable-only one's frozen part
from the bases its manifest references (fingerprints compared), then its trainable part; what needs canonical
tensors of a ``pretrain_vlm`` ``iter_*`` (its encoder, the HF LLaVA export) reads them from the VLM
:func:`materialize_vlm` loads.

Decoder (``--decoder-load``): anything :func:`megatron_zero.checkpointing.resolve.resolve_checkpoint` finds a
decoder in -- an HF Llama directory (target or surrogate), a megatron_zero ``torch_dist`` model checkpoint, a VLM
checkpoint (``tools/graft.py``), a training export (``<save>/export``) or a training run directory.

Encoder (``--encoder-load``): a VLM checkpoint, a training export or run, an image-encoder checkpoint
(``image_encoder.json``), or an HF ``CLIPVisionModel`` directory (CLIP tower only: the adapter and start/end
embeddings start fresh).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Callable, Iterator, Optional

import torch

from megatron_zero.checkpointing.resolve import (
    DECODER_KINDS, ENCODER_KINDS, CheckpointResolveError, ResolvedCheckpoint, resolve_checkpoint,
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
            load_training_weights(chunks, self.path, decoder_only=True)
            return
        for d in decoders:
            sharding.load_canonical(d, self.getter, ps.get_tensor_model_parallel_rank(),
                                    ps.get_tensor_model_parallel_world_size(), source=self.path, skip=skip)


def resolve_decoder(path: str, flag: str = "--decoder-load") -> DecoderSource:
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


def _unwrap(model):
    while hasattr(model, "module"):
        model = model.module
    return model


def load_training_weights(chunks: list, iteration_dir: str, verify: str = "hash", decoder_only: bool = False) -> None:
    """The model weights of a training checkpoint (``iter_*``) into ``chunks``, at any TP/PP (optimizer state and
    RNG are left alone: this starts from the weights, it does not resume). A ``pretrain_vlm`` checkpoint fills VLM
    chunks whole (unless ``decoder_only``), or the decoders of other chunks; a ``pretrain_lm`` one fills the
    decoders. A trainable-only checkpoint's frozen part is first loaded from the base it references and checked
    against its fingerprints."""
    from megatron.core import dist_checkpointing

    from megatron_zero.checkpointing import mcore_checkpoint, run_dir, training_checkpoint

    manifest = run_dir.read_manifest(iteration_dir)
    run_dir.verify_files(iteration_dir, manifest, verify)
    models = [_unwrap(c) for c in chunks]
    vlm_checkpoint = "vision" in (manifest.get("model_config") or {})
    if vlm_checkpoint and not decoder_only and all(hasattr(m, "language_model") for m in models):
        targets, prefix = models, ""  # the whole VLM
    else:
        targets = [getattr(m, "language_model", m) for m in models]
        prefix = "language_model." if vlm_checkpoint else ""
    sharded = mcore_checkpoint.model_sharded_state_dict(targets, prefix=prefix)
    frozen_names: set = set()
    if manifest.get("frozen_base"):  # trainable-only: the frozen part from the base it references, then the rest
        frozen = training_checkpoint.split_frozen(sharded, training_checkpoint.recorded_frozen(manifest), frozen_names)
        _load_frozen_base(targets, iteration_dir, manifest["frozen_base"], frozen, whole_vlm=targets is models
                          and vlm_checkpoint)
    loaded = dist_checkpointing.load(sharded, iteration_dir)
    frozen_names = {k[len(prefix):] for k in frozen_names}
    for i, model in enumerate(targets):
        state = loaded.get("model" if len(targets) == 1 else f"model{i}", {})  # absent: all of it frozen
        state = {k[len(prefix):]: v for k, v in state.items()}
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.endswith("_extra_state") and k not in frozen_names]
        if missing or unexpected:
            raise CheckpointResolveError(f"{iteration_dir}: training checkpoint does not fit the model (missing "
                                         f"{missing[:3]}, unexpected {unexpected[:3]})")


def _load_frozen_base(chunks: list, iteration_dir: str, recorded: dict, frozen: dict, whole_vlm: bool = False) -> None:
    """Load the base a trainable-only checkpoint references -- the decoder (``--pretrained``/``--decoder-load``)
    and, for a whole VLM, the image encoder (``--encoder-load``) -- and check it is the one it was trained on
    (fingerprints, where the layout allows)."""
    from megatron_zero.checkpointing import training_checkpoint
    from megatron_zero.models.lora import is_lora_key

    paths = recorded.get("path") or {}
    base = paths.get("--pretrained") or paths.get("--decoder-load")
    if base is None or set(paths) - {"--pretrained", "--decoder-load", "--encoder-load"}:
        raise CheckpointResolveError(f"{iteration_dir}: a trainable-only checkpoint of the base "
                                     f"{training_checkpoint.describe_base(paths)}: read the run's export/ instead")
    for flag, p in paths.items():
        if (flag != "--encoder-load" or whole_vlm) and not os.path.exists(p):
            raise CheckpointResolveError(f"{iteration_dir}: a trainable-only checkpoint whose frozen base ({flag} {p}) "
                                         f"no longer exists; restore it there (checkpoints with --save-frozen hold it)")
    vision_frozen = any(k.startswith("vision.") for k in frozen)
    if whole_vlm and vision_frozen and "--encoder-load" not in paths:
        raise CheckpointResolveError(f"{iteration_dir}: a trainable-only checkpoint whose frozen encoder was freshly "
                                     f"initialised (no --encoder-load): read the run's export/, or save with "
                                     f"--save-frozen")
    resolve_decoder(base, "frozen base").load_into(chunks, skip=is_lora_key)
    if whole_vlm and "--encoder-load" in paths:
        resolve_encoder(paths["--encoder-load"], flag="frozen base --encoder-load").load_into(chunks)
    training_checkpoint.check_frozen_base(iteration_dir, recorded, frozen, flag="reading")


_materialized: dict = {}


def materialize_vlm(ckpt: ResolvedCheckpoint):
    """The VLM of a training checkpoint (``iter_*``), built and loaded in this process (its frozen part from the
    base it references), for what reads canonical tensors: the HF LLaVA export, grafting, an ``--encoder-load``.
    Uses the parallel state if initialised (one pipeline stage), else a world of one. Kept for the next call."""
    from megatron.core import parallel_state as ps

    from megatron_zero.models.llama import RuntimeOptions
    from megatron_zero.parallel.initialize import initialize_parallel

    if ckpt.root not in _materialized:
        if not ps.model_parallel_is_initialized():
            initialize_parallel(1, 1)
        if ps.get_pipeline_model_parallel_world_size() > 1:
            raise CheckpointResolveError(f"{ckpt.path}: the image encoder of a training checkpoint is read in one "
                                         f"pipeline stage; pass the run's export/ (written when it ends)")
        _materialized.clear()
        tp = ps.get_tensor_model_parallel_world_size()
        _materialized[ckpt.root] = load_vlm(ckpt, RuntimeOptions(tensor_model_parallel_size=tp))
    return _materialized[ckpt.root]


def decoder_source(ckpt: ResolvedCheckpoint):
    """A :class:`~megatron_zero.checkpointing.sources.DecoderSource` for the checkpoint's decoder."""
    d = ckpt.decoder
    if d is None:
        raise CheckpointResolveError(f"{ckpt.path}: {ckpt.describe()} holds no decoder")
    if d.format == "hf":
        from megatron_zero.checkpointing.vlm_checkpoint import HFDecoder

        return DecoderSource(d.cfg, "canonical", HFDecoder(d.path).canonical_getter(), d.path)
    return DecoderSource(d.cfg, d.format, None, d.path)


def encoder_source(ckpt: ResolvedCheckpoint, feature_convention: str = "zero"):
    """An :class:`~megatron_zero.checkpointing.sources.EncoderSource` for the checkpoint's image encoder (an HF
    CLIP directory gives the vision tower only: ``partial``)."""
    if ckpt.encoder_dir is not None:
        from megatron_zero.checkpointing.vlm_checkpoint import load_image_encoder

        meta, tensors = load_image_encoder(ckpt.encoder_dir)
        return EncoderSource(ClipVisionConfig.from_dict(meta["vision"]), tensors, meta["image_token_id"],
                             ckpt.encoder_dir)
    if ckpt.clip_dir is not None:
        from megatron_zero.checkpointing import hf_clip
        from megatron_zero.checkpointing.hf_reader import HFCheckpoint

        reader = HFCheckpoint(ckpt.clip_dir)
        hf_cfg = reader.config.get("vision_config", reader.config)  # a full CLIPModel config nests the tower's
        vision = ClipVisionConfig.from_hf_config(hf_cfg, feature_convention,
                                                 name=os.path.basename(ckpt.clip_dir.rstrip("/")))
        getter = hf_clip.canonical_getter(reader.get, vision, hf_clip.detect_prefix(reader.weight_map.keys()))
        tensors = {k: getter(k) for k in hf_clip.canonical_keys(vision)}
        return EncoderSource(vision, tensors, None, ckpt.clip_dir, partial=True)
    if ckpt.is_vlm and ckpt.decoder is not None and ckpt.decoder.format == "training":
        from megatron_zero.models.vlm import encoder_canonical_state

        cfg = ckpt.vlm_config
        return EncoderSource(cfg.vision, encoder_canonical_state(materialize_vlm(ckpt)), cfg.image_token_id,
                             ckpt.root)
    raise CheckpointResolveError(f"{ckpt.path}: {ckpt.describe()} holds no image encoder")


def iter_decoder_canonical(ckpt: ResolvedCheckpoint) -> Iterator[tuple[str, torch.Tensor]]:
    """The decoder's canonical tensors one at a time, without building a model (torch_dist reads are collective:
    ``torch.distributed`` must be initialised, a world of one is enough)."""
    from megatron_zero.checkpointing import hf_llama, mcore_checkpoint

    d = ckpt.decoder
    if d is None:
        raise CheckpointResolveError(f"{ckpt.path}: {ckpt.describe()} holds no decoder")
    if d.format == "hf":
        from megatron_zero.checkpointing.vlm_checkpoint import HFDecoder

        get = HFDecoder(d.path).canonical_getter()
        for key in hf_llama.canonical_keys(d.cfg):
            yield key, get(key)
    elif d.format == "mcore":
        yield from mcore_checkpoint.iter_llama_canonical(d.path, d.cfg)
    elif ckpt.is_vlm:  # a pretrain_vlm iter_*: built and loaded (with its frozen base), then read
        from megatron.core import parallel_state as ps

        from megatron_zero.parallel import sharding

        model = materialize_vlm(ckpt)
        yield from sharding.iter_canonical(model.language_model, ps.get_tensor_model_parallel_group(), d.cfg.vocab_size)
    else:
        raise CheckpointResolveError(f"{ckpt.path}: streaming the decoder of a training checkpoint is not supported; "
                                     f"load it into a model (decoder_source) or convert its export")


def load_vlm(ckpt: ResolvedCheckpoint, opts=None):
    """This rank's VLM chunk (parallel state initialised, one pipeline stage) built without random init from
    ``opts`` (a ``RuntimeOptions``) and loaded with the checkpoint's encoder and decoder."""
    from megatron_zero.models.llama import RuntimeOptions
    from megatron_zero.models.vlm import build_vlm

    if ckpt.vlm_config is None:
        raise CheckpointResolveError(f"{ckpt.path}: {ckpt.describe()} is not a VLM")
    model = build_vlm(ckpt.vlm_config, dataclasses.replace(opts or RuntimeOptions(), initialize_weights=False))
    if ckpt.decoder.format == "training":  # one training checkpoint holds both (and references its base)
        load_training_weights([model], ckpt.root)
        return model
    decoder_source(ckpt).load_into([model])
    encoder_source(ckpt).load_into([model])
    return model
