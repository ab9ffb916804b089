"""One resolver for "any checkpoint a user holds": :func:`resolve_checkpoint` classifies a path and returns a
:class:`ResolvedCheckpoint` that says where its decoder, image encoder, VLM config and tokenizer are; every tool and
entry point goes through it, so the same path works everywhere.

Kinds (``ResolvedCheckpoint.kind``), decided from small files only (no tensor is read):

==================  ===========================================================================================
``hf-llama``        HF Llama directory: ``config.json`` + ``*.safetensors`` (a target, or an HF surrogate)
``mcore-llama``     megatron_zero ``torch_dist`` decoder checkpoint (``checkpoint_meta.json``), saved at any TP/PP
``hf-clip``         HF ``CLIPVisionModel`` / ``CLIPModel`` directory
``mcore-clip``      megatron_zero ``torch_dist`` CLIP checkpoint (``checkpoint_meta.json`` with model_type clip)
``image-encoder``   image-encoder checkpoint (``image_encoder.json`` + ``image_encoder.safetensors``)
``vlm``             grafted VLM (``vlm_config.json`` + image encoder + ``decoder/`` as an HF Llama directory)
``training-export`` a training run's ``<save>/export`` (``vlm_config.json`` + image encoder + ``decoder/`` as a
                    ``torch_dist`` checkpoint)
``training-run``    a training run's ``--save`` directory (``iter_*/`` + ``latest_checkpointed_iteration.txt``):
                    its ``export/`` when there is one (pretrain_vlm), else its newest complete ``iter_*``; or one
                    ``iter_*`` directory itself. An ``iter_*`` of ``pretrain_vlm`` is a VLM (architecture from its
                    manifest), one of ``pretrain_lm`` a decoder (the run's ``model_config.json``); a trainable-only
                    one is read with the frozen base it references (see ``sources``)
==================  ===========================================================================================

A surrogate is an ``hf-llama`` or ``mcore-llama`` whose config records surrogate provenance
(``ResolvedCheckpoint.is_surrogate``). A path that is none of these is refused with one line naming the flag,
the path and every kind that was expected.

This module only classifies; the loaders (weights into built model chunks at any TP/PP, canonical tensors
streamed without a model) are in :mod:`megatron_zero.checkpointing.sources`.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Iterable, Optional


from megatron_zero.checkpointing import run_dir
from megatron_zero.checkpointing.run_dir import EXPORT_DIR, MODEL_CONFIG as _MODEL_CONFIG
from megatron_zero.errors import UserError
from megatron_zero.models.llama_config import LlamaConfig
from megatron_zero.models.vlm import VLM_CONFIG_FILE, VLMConfig

KINDS = {
    "hf-llama": "an HF Llama directory (a Llama-family decoder: config.json + *.safetensors)",
    "mcore-llama": "a megatron_zero torch_dist decoder checkpoint (checkpoint_meta.json)",
    "hf-clip": "an HF CLIP vision directory (config.json + *.safetensors)",
    "mcore-clip": "a megatron_zero torch_dist CLIP checkpoint",
    "image-encoder": "an image-encoder checkpoint (image_encoder.json)",
    "vlm": "a grafted VLM checkpoint (vlm_config.json + decoder/)",
    "training-export": "a training export (<save>/export)",
    "training-run": "a training run directory (--save: iter_*/) or one of its iter_*",
}
DECODER_KINDS = ("hf-llama", "mcore-llama", "vlm", "training-export", "training-run")
ENCODER_KINDS = ("image-encoder", "vlm", "training-export", "training-run")
VLM_KINDS = ("vlm", "training-export", "training-run")
_META = "checkpoint_meta.json"


class CheckpointResolveError(UserError, ValueError):
    """A path that is not (or not the kind of) checkpoint a flag expects."""


@dataclasses.dataclass(frozen=True)
class DecoderFiles:
    """Where a decoder's weights are: ``format`` ``hf`` (HF Llama directory), ``mcore`` (torch_dist model
    checkpoint) or ``training`` (an ``iter_*`` directory of a training run: model + optimizer state)."""

    format: str
    path: str
    cfg: LlamaConfig


@dataclasses.dataclass(frozen=True)
class ResolvedCheckpoint:
    kind: str
    path: str  # what was given (absolute)
    root: str  # the directory the model files are read from (a run's export or iter_*, else ``path``)
    decoder: Optional[DecoderFiles] = None
    encoder_dir: Optional[str] = None  # image_encoder.json + image_encoder.safetensors
    clip_dir: Optional[str] = None  # HF CLIP directory (vision tower only)
    vlm_config: Optional[VLMConfig] = None
    tokenizer_dir: Optional[str] = None  # where its tokenizer files are (if any)
    run_dir: Optional[str] = None  # training runs: the --save directory
    iteration: Optional[int] = None  # training runs: the newest complete iteration

    @property
    def is_vlm(self) -> bool:
        return self.vlm_config is not None

    @property
    def is_surrogate(self) -> bool:
        return bool(self.decoder is not None and self.decoder.cfg.surrogate)

    def describe(self) -> str:
        what = KINDS[self.kind].split(" (")[0]
        if self.is_surrogate:
            what += f", a surrogate of {self.decoder.cfg.surrogate.get('target')!r}"
        if self.root != self.path:
            what += f" (read from {self.root})"
        return what


def _read_json(path: str) -> Optional[dict]:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _hf_kind(path: str) -> Optional[str]:
    cfg = _read_json(os.path.join(path, "config.json"))
    if cfg is None:
        return None
    model_type = str(cfg.get("model_type", ""))
    if "vision_config" in cfg or model_type.startswith("clip"):
        return "hf-clip"
    if model_type == "llava":
        return "hf-llava"
    return "hf-llama"


def _tokenizer_dir(path: str) -> Optional[str]:
    from megatron_zero.checkpointing.vlm_checkpoint import TOKENIZER_FILES

    return path if any(os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_FILES) else None


def _decoder_files(path: str, where: str) -> DecoderFiles:
    """The decoder in ``path`` (HF Llama or torch_dist), its config read."""
    if os.path.isfile(os.path.join(path, _META)):
        from megatron_zero.checkpointing import mcore_checkpoint

        return DecoderFiles("mcore", path, mcore_checkpoint.load_model_config(path))
    if os.path.isfile(os.path.join(path, "config.json")):
        from megatron_zero.checkpointing.vlm_checkpoint import HFDecoder

        try:
            return DecoderFiles("hf", path, HFDecoder(path).cfg)
        except (KeyError, TypeError) as e:
            raise CheckpointResolveError(f"{where}: {os.path.join(path, 'config.json')}: not an HF Llama config "
                                         f"({type(e).__name__}: {e})") from None
    raise CheckpointResolveError(f"{where}: {path} holds no decoder (no config.json of an HF Llama or "
                                 f"{_META} of a torch_dist checkpoint)")


def _vlm(path: str, given: str, kind_hint: Optional[str] = None, **extra) -> ResolvedCheckpoint:
    from megatron_zero.checkpointing.vlm_checkpoint import DECODER_DIR, read_image_encoder_meta, read_vlm_config

    cfg = read_vlm_config(path)
    read_image_encoder_meta(path)  # the encoder files are there and of our format
    decoder = _decoder_files(os.path.join(path, DECODER_DIR), given)
    decoder = dataclasses.replace(decoder, cfg=cfg.decoder)  # as recorded (name included) when the VLM was written
    kind = kind_hint or ("training-export" if decoder.format == "mcore" else "vlm")
    return ResolvedCheckpoint(kind, given, path, decoder, encoder_dir=path, vlm_config=cfg,
                              tokenizer_dir=_tokenizer_dir(decoder.path), **extra)


def is_training_run(path: str) -> bool:
    """``path`` looks like a training run's ``--save`` directory (an export, any ``iter_*`` or the latest marker)."""
    return run_dir.is_training_run(path, VLM_CONFIG_FILE)


def _training_run(path: str, flag: str) -> ResolvedCheckpoint:
    iteration = run_dir.latest_iteration(path)
    export = run_dir.export_dir(path)
    if os.path.isfile(os.path.join(export, VLM_CONFIG_FILE)):
        return _vlm(export, path, "training-run", run_dir=path, iteration=iteration)
    if iteration is None:
        raise CheckpointResolveError(f"{flag} {path}: a training run directory with no complete checkpoint "
                                     f"(no iter_*/COMPLETE) and no {EXPORT_DIR}/")
    return _training_iteration(path, iteration, path, flag)


def _iteration_of(path: str) -> Optional[int]:
    """The iteration of ``path`` when it is a complete ``iter_*`` directory of a training run."""
    name = os.path.basename(path.rstrip("/"))
    if name.startswith("iter_") and name[5:].isdigit() and os.path.isfile(os.path.join(path, run_dir.COMPLETE)):
        return int(name[5:])
    return None


def _recorded_tokenizer(manifest: dict, run: str) -> Optional[str]:
    """Where a training checkpoint's tokenizer is: the one the run recorded, else its decoder base's, else the
    run directory's."""
    tok = manifest.get("tokenizer")
    if tok and os.path.exists(tok):
        return tok if os.path.isdir(tok) else os.path.dirname(tok)
    base = ((manifest.get("frozen_base") or {}).get("path") or {})
    for flag in ("--decoder-load", "--pretrained"):
        if base.get(flag) and os.path.isdir(base[flag]):
            try:
                found = _classify(os.path.abspath(base[flag]), flag).tokenizer_dir
            except ValueError:
                found = None
            if found:
                return found
    return _tokenizer_dir(run)


def _training_iteration(run: str, iteration: int, given: str, flag: str) -> ResolvedCheckpoint:
    """One complete ``iter_*`` of a run: a VLM (``pretrain_vlm``: the architecture recorded in its manifest) or a
    decoder (``pretrain_lm``: ``model_config.json``), read with the frozen base it references if trainable-only
    (:func:`megatron_zero.checkpointing.sources.decoder_source`)."""
    root = run_dir.iter_dir(run, iteration)
    manifest = run_dir.read_manifest(root)
    recorded = manifest.get("model_config")
    if isinstance(recorded, dict) and "vision" in recorded:
        cfg = VLMConfig.from_dict(recorded)
        return ResolvedCheckpoint("training-run", given, root, DecoderFiles("training", root, cfg.decoder),
                                  vlm_config=cfg, tokenizer_dir=_recorded_tokenizer(manifest, run), run_dir=run,
                                  iteration=iteration)
    model_cfg = os.path.join(run, _MODEL_CONFIG)
    if not os.path.isfile(model_cfg):
        raise CheckpointResolveError(
            f"{flag} {given}: a training checkpoint without a recorded architecture ({_MODEL_CONFIG} or its "
            f"manifest's model_config): pass the run's {EXPORT_DIR}/ once written")
    cfg = LlamaConfig.load(model_cfg)
    return ResolvedCheckpoint("training-run", given, root, DecoderFiles("training", root, cfg),
                              tokenizer_dir=_recorded_tokenizer(manifest, run), run_dir=run, iteration=iteration)


def _classify(path: str, flag: str) -> ResolvedCheckpoint:
    from megatron_zero.checkpointing.vlm_checkpoint import ENCODER_META

    if os.path.isfile(os.path.join(path, VLM_CONFIG_FILE)):
        return _vlm(path, path)
    if is_training_run(path):
        return _training_run(path, flag)
    iteration = _iteration_of(path)
    if iteration is not None:
        return _training_iteration(os.path.dirname(path.rstrip("/")), iteration, path, flag)
    if os.path.isfile(os.path.join(path, ENCODER_META)):
        from megatron_zero.checkpointing.vlm_checkpoint import read_image_encoder_meta

        read_image_encoder_meta(path)
        return ResolvedCheckpoint("image-encoder", path, path, encoder_dir=path)
    if os.path.isfile(os.path.join(path, _META)):
        from megatron_zero.checkpointing import mcore_checkpoint

        meta = mcore_checkpoint.read_meta(path, flag)
        if meta.get("model_type", "llama") == "clip":
            return ResolvedCheckpoint("mcore-clip", path, path, tokenizer_dir=_tokenizer_dir(path))
        return ResolvedCheckpoint("mcore-llama", path, path, _decoder_files(path, flag),
                                  tokenizer_dir=_tokenizer_dir(path))
    hf = _hf_kind(path)
    if hf == "hf-clip":
        return ResolvedCheckpoint("hf-clip", path, path, clip_dir=path)
    if hf == "hf-llama":
        return ResolvedCheckpoint("hf-llama", path, path, _decoder_files(path, flag), tokenizer_dir=_tokenizer_dir(path))
    if hf == "hf-llava":
        raise CheckpointResolveError(f"{flag} {path}: an HF LLaVA export (for transformers); megatron_zero reads "
                                     f"the VLM checkpoint it was exported from")
    if os.path.isfile(os.path.join(path, ".metadata")) or os.path.isfile(os.path.join(path, _MODEL_CONFIG)):
        raise CheckpointResolveError(f"{flag} {path}: not a complete megatron_zero checkpoint (no {_META}; an "
                                     f"interrupted save?)")
    raise CheckpointResolveError(f"{flag} {path}: not a checkpoint megatron_zero reads")


def resolve_checkpoint(path: str, flag: str = "--load", accept: Optional[Iterable[str]] = None) -> ResolvedCheckpoint:
    """Classify ``path`` (see the module docstring); ``accept``: the kinds the caller can use (default: any).

    Raises :class:`CheckpointResolveError` (one line: flag, path, what was expected) when ``path`` is missing,
    unrecognised or of a kind not in ``accept``; malformed files raise their reader's error
    (``CheckpointFormatError``, ``CheckpointError``, ``VLMCheckpointError``), all ``ValueError``.
    """
    accept = tuple(accept) if accept is not None else tuple(KINDS)
    expected = "expected " + "; or ".join(KINDS[k] for k in accept)
    if not path:
        raise CheckpointResolveError(f"{flag}: no path given; {expected}")
    given = os.path.abspath(path)
    if not os.path.exists(given):
        raise CheckpointResolveError(f"{flag} {path}: no such directory; {expected}")
    if not os.path.isdir(given):
        raise CheckpointResolveError(f"{flag} {path}: a file, not a checkpoint directory; {expected}")
    try:
        ckpt = _classify(given, flag)
    except CheckpointResolveError as e:
        raise CheckpointResolveError(f"{e}; {expected}") from None
    if ckpt.kind not in accept:
        raise CheckpointResolveError(f"{flag} {path}: is {ckpt.describe()}; {expected}")
    return ckpt


def conversion_source(path: str, source_format: str, model_type: str = "llama", flag: str = "--load-dir") -> str:
    """The directory ``tools/convert_checkpoint.py`` reads for ``--source-format``/``--model-type``: ``path`` itself
    for a checkpoint of that format, or the decoder inside a training export or run (``--source-format mcore``)."""
    accept = {("hf", "llama"): ("hf-llama",), ("mcore", "llama"): ("mcore-llama", "training-export", "training-run"),
              ("hf", "clip"): ("hf-clip",), ("mcore", "clip"): ("mcore-clip",)}[(source_format, model_type)]
    ckpt = resolve_checkpoint(path, flag, accept)
    if ckpt.kind in ("training-export", "training-run"):
        if ckpt.decoder.format != "mcore":
            raise CheckpointResolveError(f"{flag} {path}: is {ckpt.describe()}, whose decoder is not a torch_dist "
                                         f"checkpoint; expected " + "; or ".join(KINDS[k] for k in accept))
        return ckpt.decoder.path
    return ckpt.root


def check_resume_dir(path: Optional[str], flag: str = "--load") -> None:
    """``--load`` resumes a training run: refuse a path that is some other kind of checkpoint (its weights are read
    with ``--decoder-load``/``--encoder-load``), instead of silently starting from scratch. A missing, empty or
    not-yet-checkpointed run directory is fine (the run starts fresh)."""
    if not path or not os.path.isdir(path) or is_training_run(path):
        return
    try:
        ckpt = _classify(os.path.abspath(path), flag)
    except ValueError:
        return
    raise CheckpointResolveError(f"{flag} {path}: is {ckpt.describe()}; {flag} resumes a training run (its --save "
                                 f"directory: iter_*/); to start from these weights use --decoder-load/--encoder-load")
