"""Importing the authors' released checkpoints (facebookresearch/zero ``.pth`` files) into megatron_zero.

Their files (``src/utils.py::save_checkpoint`` with ``ckpt_save_params_only``) are
``torch.save({"epoch", "global_step", "model": {...}, "optimizer": None, "scheduler": ...})`` where ``model`` holds
only the *trainable* tensors of their ``Zero`` module (bf16), under its raw names:

=============================================  =================================  ==============================
their name                                     meaning                            our canonical encoder name
=============================================  =================================  ==============================
``embd_soi`` / ``embd_eoi`` ``[1, d]``         start/end-of-image embeddings      ``image_start_embedding`` /
                                                                                  ``image_end_embedding`` ``[d]``
``adapter.0.{weight,bias}``                    ``Linear(1024 -> d)``              ``adapter.linear_fc1.*``
``adapter.2.{weight,bias}``                    ``Linear(d -> d)`` (after GELU)    ``adapter.linear_fc2.*``
``encoder.vision_model.post_layernorm.*``      CLIP post-LN (on all 577 tokens)   ``vision_model.post_layernorm.*``
``encoder.vision_model.encoder.layers.{i}.*``  HF CLIP layer ``i`` (encoder file:  ``vision_model.transformer.
                                               ``i = 16..23``)                    layers.{i}.*`` (q/k/v fused)
``decoder.model.layers.{j}.*``                 HF Llama layer ``j`` of *their*    surrogate layer ``j``
                                               surrogate (translator file: the
                                               translator, ``j = a``)
=============================================  =================================  ==============================

Their ``load_checkpoint`` puts these into a ``Zero`` module whose ``encoder`` is an HF ``CLIPVisionModel`` and
whose ``decoder`` is the surrogate ``LlamaForCausalLM`` (``load_state_dict(strict=False)``: every other tensor is
the pretrained one). The feature convention is our ``"zero"`` one: CLIP's last hidden state with the class token,
``post_layernorm`` on every token, the adapter, then ``[soi, 577 features, eoi]`` (579 positions per image).

Two outputs, either or both:

* :func:`import_encoder` -- an HF CLIP directory + the encoder file (and/or the translator file: the stage-1
  adapter) -> our image-encoder checkpoint, recording as ``trained_with`` the surrogate it was trained on (from a
  surrogate directory, or from the target + the translator ranges given as flags), so that
  :func:`megatron_zero.grafting.graft` accepts it for that target without ``--force``.
* :func:`import_translator` -- the translator file -> a copy of a surrogate built by ``tools/build_surrogate.py``
  with the translator layer(s) replaced (cast to the surrogate's dtype, as ``load_state_dict`` copies).

Every tensor is checked against the configs (CLIP config, decoder hidden size, the surrogate's layer shapes);
a mismatch is a one-line :class:`ZeroImportError` naming the file, the tensor, and both shapes.
"""
from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from megatron_zero.errors import UserError
from megatron_zero.models.clip_vit import ClipVisionConfig
from megatron_zero.models.llama_config import LlamaConfig

__all__ = ["ZeroCheckpoint", "ZeroImportError", "import_encoder", "import_translator", "read_zero_checkpoint"]

_ENC_LAYER = re.compile(r"^encoder\.vision_model\.encoder\.layers\.(\d+)\.(.+)$")
_DEC_LAYER = re.compile(r"^decoder\.model\.layers\.(\d+)\.(.+)$")
_ADAPTER = {"adapter.0.weight": "adapter.linear_fc1.weight", "adapter.0.bias": "adapter.linear_fc1.bias",
            "adapter.2.weight": "adapter.linear_fc2.weight", "adapter.2.bias": "adapter.linear_fc2.bias"}
_MARKERS = {"embd_soi": "image_start_embedding", "embd_eoi": "image_end_embedding"}
_POST_LN = ("encoder.vision_model.post_layernorm.weight", "encoder.vision_model.post_layernorm.bias")
_ADAPTER_PARTS = (*_ADAPTER, *_MARKERS)


class ZeroImportError(UserError, ValueError):
    """A released checkpoint that does not fit the given configs (or is not one of their files)."""


@dataclass
class ZeroCheckpoint:
    """One of their ``.pth`` files, split by destination."""

    path: str
    epoch: Optional[int]
    global_step: Optional[int]
    adapter: dict[str, torch.Tensor] = field(default_factory=dict)  # their names: adapter.*, embd_soi/eoi
    vision: dict[str, torch.Tensor] = field(default_factory=dict)  # their "encoder.vision_model.*" names
    decoder_layers: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)  # j -> {HF suffix: tensor}

    @property
    def encoder_layers(self) -> list[int]:
        return sorted({int(m.group(1)) for k in self.vision if (m := _ENC_LAYER.match(k))})

    def record(self) -> dict:
        return {"file": os.path.abspath(self.path), "epoch": self.epoch, "global_step": self.global_step,
                "tensors": len(self.adapter) + len(self.vision) + sum(len(v) for v in self.decoder_layers.values())}


def read_zero_checkpoint(path: str, flag: str = "--encoder-file") -> ZeroCheckpoint:
    """Read and sort one of their ``.pth`` files (``torch.load(weights_only=True)``, as their loader does)."""
    if not os.path.isfile(path):
        raise ZeroImportError(f"{flag} {path}: no such file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle/zip errors of a truncated or foreign file
        raise ZeroImportError(f"{flag} {path}: not a torch.save file ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
        raise ZeroImportError(f"{flag} {path}: expected their checkpoint layout "
                              f"{{'epoch', 'global_step', 'model': {{...}}, 'optimizer', 'scheduler'}}")
    out = ZeroCheckpoint(path, ckpt.get("epoch"), ckpt.get("global_step"))
    unknown = []
    for name, t in ckpt["model"].items():
        if not isinstance(t, torch.Tensor):
            raise ZeroImportError(f"{flag} {path}: model[{name!r}] is not a tensor")
        name = name[len("module."):] if name.startswith("module.") else name  # a DDP-wrapped save
        if name in _ADAPTER_PARTS:
            out.adapter[name] = t
        elif name in _POST_LN or _ENC_LAYER.match(name):
            out.vision[name] = t
        elif m := _DEC_LAYER.match(name):
            out.decoder_layers.setdefault(int(m.group(1)), {})[m.group(2)] = t
        else:
            unknown.append(name)
    if unknown:
        raise ZeroImportError(f"{flag} {path}: tensors this importer does not know: {unknown[:4]} (only their "
                              f"stage-1 translator and stage-2 encoder files are supported)")
    if not ckpt["model"]:
        raise ZeroImportError(f"{flag} {path}: the checkpoint holds no tensors")
    return out


def _check_shape(ckpt: ZeroCheckpoint, name: str, got: torch.Tensor, expected: tuple, why: str, flag: str) -> None:
    if tuple(got.shape) != tuple(expected):
        raise ZeroImportError(f"{flag} {ckpt.path}: {name} has shape {tuple(got.shape)}, expected {tuple(expected)} "
                              f"({why})")


# ---------------------------------------------------------------------------------------------------------
# The image encoder
# ---------------------------------------------------------------------------------------------------------
def _hf_clip(clip_dir: str):
    """(ClipVisionConfig, HFCheckpoint, prefix) of an HF CLIP(-Vision)Model directory."""
    import json

    from megatron_zero.checkpointing import hf_clip
    from megatron_zero.checkpointing.hf_reader import CheckpointFormatError, HFCheckpoint

    cfg_file = os.path.join(clip_dir, "config.json")
    if not os.path.isfile(cfg_file):
        raise ZeroImportError(f"--clip {clip_dir}: not an HF CLIP directory (no config.json)")
    with open(cfg_file) as f:
        hf_cfg = json.load(f)
    hf_cfg = hf_cfg.get("vision_config", hf_cfg)
    try:
        vision = ClipVisionConfig.from_hf_config(hf_cfg, "zero", name=os.path.basename(os.path.normpath(clip_dir)))
        ckpt = HFCheckpoint(clip_dir)
        prefix = hf_clip.detect_prefix(ckpt.weight_map.keys())
    except (ValueError, KeyError, TypeError, CheckpointFormatError) as e:
        raise ZeroImportError(f"--clip {clip_dir}: {e}") from None
    return vision, ckpt, prefix


def encoder_canonical(clip_dir: str, files: Sequence[ZeroCheckpoint], decoder_hidden_size: int,
                      ) -> tuple[ClipVisionConfig, dict[str, torch.Tensor]]:
    """Canonical :class:`~megatron_zero.models.adapter.ImageEncoder` tensors: the CLIP directory's, overridden by
    the files' vision tensors (later files win), plus the adapter and start/end embeddings of the last file
    that has them. Overridden CLIP tensors are cast to the CLIP checkpoint's dtype (``load_state_dict``'s
    ``copy_``); the adapter and embeddings keep the file's dtype."""
    from megatron_zero.checkpointing import hf_clip

    vision, ckpt, prefix = _hf_clip(clip_dir)
    d, c = decoder_hidden_size, vision.hidden_size
    overrides: dict[str, torch.Tensor] = {}
    adapter: dict[str, torch.Tensor] = {}
    for f in files:
        flag = f"--{'translator' if f.decoder_layers else 'encoder'}-file"
        for name, t in f.vision.items():
            hf_name = prefix + name[len("encoder.vision_model."):]
            if hf_name not in ckpt.weight_map:
                raise ZeroImportError(f"{flag} {f.path}: {name} has no counterpart {hf_name} in --clip {clip_dir} "
                                      f"({vision.num_layers} layers)")
            _check_shape(f, name, t, ckpt.shape(hf_name), f"the shape of {hf_name} in --clip {clip_dir}", flag)
            overrides[hf_name] = t.to(ckpt.dtype(hf_name))
        if f.adapter:
            missing = [k for k in _ADAPTER_PARTS if k not in f.adapter]
            if missing:
                raise ZeroImportError(f"{flag} {f.path}: has {sorted(f.adapter)} but not {missing}")
            expected = {"adapter.0.weight": (d, c), "adapter.0.bias": (d,), "adapter.2.weight": (d, d),
                        "adapter.2.bias": (d,), "embd_soi": (1, d), "embd_eoi": (1, d)}
            for k, shape in expected.items():
                _check_shape(f, k, f.adapter[k], shape, f"CLIP width {c}, decoder hidden size {d}", flag)
            adapter = dict(f.adapter)
    if not adapter:
        raise ZeroImportError("neither --encoder-file nor --translator-file holds the adapter (adapter.0/2, "
                              "embd_soi/eoi): nothing to import")

    def get(name: str) -> torch.Tensor:
        return overrides[name] if name in overrides else ckpt.get(name)

    getter = hf_clip.canonical_getter(get, vision, prefix)
    out = {f"vision_model.{k}": getter(k) for k in hf_clip.canonical_keys(vision)}
    out.update({ours: adapter[theirs] for theirs, ours in _ADAPTER.items()})
    out.update({ours: adapter[theirs].reshape(-1) for theirs, ours in _MARKERS.items()})
    return vision, out


def surrogate_identity(target: Optional[str] = None, ranges: Optional[Sequence[tuple[int, int]]] = None,
                       surrogate: Optional[str] = None, num_translators: int = 1) -> tuple[LlamaConfig, dict]:
    """(surrogate config, ``trained_with`` identity) of the surrogate an imported encoder was trained on.

    From a surrogate directory built by ``tools/build_surrogate.py`` (its own config, embeddings and tokenizer), or
    without building one -- the released 70B surrogate has 42 layers -- from the HF ``target`` and the translator
    ``ranges`` (a surrogate inherits its target's embeddings and tokenizer, so the identity is the same)."""
    from megatron_zero.checkpointing import vlm_checkpoint as vc
    from megatron_zero.surrogate import surrogate_config

    if surrogate is not None:
        dec = vc.HFDecoder(surrogate)
        if not dec.cfg.surrogate:
            raise ZeroImportError(f"--surrogate {surrogate}: its config records no surrogate provenance (build it "
                                  f"with tools/build_surrogate.py)")
        return dec.cfg, dec.identity()
    if target is None or not ranges:
        raise ZeroImportError("give --surrogate DIR, or --target DIR with --translator-range a:b")
    dec = vc.HFDecoder(target)
    try:
        scfg = surrogate_config(dec.cfg, ranges=list(ranges), num_translators=num_translators,
                                target_name=os.path.abspath(target),
                                extra={"tokenizer_sha256": vc.tokenizer_hash(target)})
    except ValueError as e:
        raise ZeroImportError(f"--translator-range: {e}") from None
    identity = vc.decoder_identity(scfg, dec.get("model.embed_tokens.weight"), vc.tokenizer_hash(target),
                                         source=None)
    return scfg, identity


def import_encoder(clip_dir: str, output: str, *, encoder_file: Optional[str] = None,
                   translator_file: Optional[str] = None, target: Optional[str] = None,
                   ranges: Optional[Sequence[tuple[int, int]]] = None, num_translators: int = 1,
                   surrogate: Optional[str] = None, image_token_id: int = 128002, overwrite: bool = False) -> dict:
    """Write our image-encoder checkpoint from an HF CLIP directory + their encoder and/or translator file.

    With both files the translator file's (stage-1) tensors come first and the encoder file's (stage-2) override
    them, as their stage 2 starts from stage 1. Returns the image-encoder metadata written."""
    from megatron_zero.checkpointing import vlm_checkpoint as vc

    files = []
    if translator_file:
        files.append(read_zero_checkpoint(translator_file, "--translator-file"))
    if encoder_file:
        files.append(read_zero_checkpoint(encoder_file, "--encoder-file"))
    if not files:
        raise ZeroImportError("give --encoder-file and/or --translator-file")
    scfg, identity = surrogate_identity(target, ranges, surrogate, num_translators)
    if not 0 <= image_token_id < scfg.vocab_size:
        raise ZeroImportError(f"--image-token-id {image_token_id} is outside the vocabulary [0, {scfg.vocab_size})")
    vision, tensors = encoder_canonical(clip_dir, files, scfg.hidden_size)
    identity = {**identity, "imported_from": {"format": "facebookresearch/zero .pth", "clip": os.path.abspath(clip_dir),
                                              "files": [f.record() for f in files]}}
    vc.save_image_encoder(output, tensors, vision, image_token_id, identity, overwrite=overwrite)
    return vc.read_image_encoder_meta(output)


# ---------------------------------------------------------------------------------------------------------
# The translator(s)
# ---------------------------------------------------------------------------------------------------------
def import_translator(translator_file: str, surrogate: str, output: str, overwrite: bool = False,
                      max_shard_size: str = "5GB", log: Callable[[str], None] = print) -> dict:
    """Write a copy of the HF ``surrogate`` directory whose translator layer(s) are those of ``translator_file``.

    Their layer index ``j`` is the index in *their* surrogate, which has our surrogate's layout (see
    :func:`megatron_zero.surrogate.layer_map`), so it must be one of the surrogate's translator indices. Tensors
    are cast to the surrogate's stored dtype. Returns the import record added to the provenance."""
    import json

    from tqdm import tqdm

    from megatron_zero.checkpointing import hf_writer
    from megatron_zero.checkpointing.hf_reader import CheckpointFormatError, HFCheckpoint
    from megatron_zero.checkpointing.hf_llama import hf_shapes
    from megatron_zero.models.llama_config import SURROGATE_HF_KEY
    from megatron_zero.surrogate import translator_indices

    ckpt = read_zero_checkpoint(translator_file, "--translator-file")
    if not ckpt.decoder_layers:
        raise ZeroImportError(f"--translator-file {translator_file}: holds no decoder.model.layers.* tensors (is it "
                              f"the encoder file?)")
    try:
        reader = HFCheckpoint(surrogate)
    except CheckpointFormatError as e:
        raise ZeroImportError(f"--surrogate {surrogate}: {e}") from None
    scfg = LlamaConfig.from_hf_config(reader.config, name=os.path.basename(os.path.normpath(surrogate)))
    prov = scfg.surrogate
    if not prov:
        raise ZeroImportError(f"--surrogate {surrogate}: its config records no surrogate provenance (build it with "
                              f"tools/build_surrogate.py)")
    translators = translator_indices(prov)
    shapes = hf_shapes(scfg)
    replaced: dict[str, torch.Tensor] = {}
    for j, parts in sorted(ckpt.decoder_layers.items()):
        if j not in translators:
            raise ZeroImportError(f"--translator-file {translator_file}: holds decoder layer {j}, but the translator(s) "
                                  f"of --surrogate {surrogate} are layer(s) {translators} (layer map "
                                  f"{prov.get('layer_map')}); build the surrogate with their translators_range")
        for suffix, t in parts.items():
            name = f"model.layers.{j}.{suffix}"
            if name not in shapes:
                raise ZeroImportError(f"--translator-file {translator_file}: decoder.{name} is not a Llama layer tensor")
            _check_shape(ckpt, f"decoder.{name}", t, shapes[name], f"--surrogate {surrogate}'s config",
                         "--translator-file")
            replaced[name] = t.to(reader.dtype(name))
        missing = [s for s in (n.split(f"model.layers.{j}.", 1)[1] for n in shapes if n.startswith(f"model.layers.{j}."))
                   if s not in parts]
        if missing:
            raise ZeroImportError(f"--translator-file {translator_file}: layer {j} lacks {missing[:3]}")
    record = {**ckpt.record(), "layers": sorted(ckpt.decoder_layers)}
    hf = dict(reader.config)
    hf[SURROGATE_HF_KEY] = {**prov, "imported_translator": record}
    names = list(reader.weight_map)
    with hf_writer.atomic_directory(output, overwrite) as tmp:
        writer = hf_writer.ShardedSafetensorsWriter(tmp, hf_writer.parse_size(max_shard_size), log=log)
        for name in tqdm(names, desc="surrogate tensors", unit="tensor", disable=len(names) < 200):
            writer.add(name, replaced[name] if name in replaced else reader.get(name))
        writer.close()
        for fname in sorted(os.listdir(surrogate)):
            src = os.path.join(surrogate, fname)
            if os.path.isfile(src) and not fname.endswith((".safetensors", ".safetensors.index.json", ".part")) \
                    and fname != "config.json":
                shutil.copy2(src, os.path.join(tmp, fname))
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf, f, indent=2)
    return record


def parse_range(text: str) -> tuple[int, int]:
    """``"40:78"`` -> ``(40, 78)`` (:func:`megatron_zero.surrogate.parse_range`)."""
    from megatron_zero.surrogate import SurrogateError, parse_range as _parse

    try:
        return _parse(text)
    except SurrogateError as e:
        raise ZeroImportError(str(e)) from None
