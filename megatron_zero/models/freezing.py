"""Which VLM parameters train in each stage (Table A.4 and the reference ``func_optim_filter``).

* ``stage1`` (pre-train the adapter on the surrogate): adapter + start/end-of-image embeddings + CLIP
  ``post_layernorm`` + the translator layer of the surrogate decoder. The translator's (surrogate) layer index
  comes from the decoder config's surrogate provenance (``LlamaConfig.surrogate["translator_index"]``, else its
  ``"a"``: in T(a, b) the translator sits right after the a kept layers) or is given explicitly; a multi-range /
  multi-translator surrogate trains *every* translator (``translator_indices``).
  ``control_unfreeze_early`` is the T* control run of Sec. 1.2: additionally every other layer before the
  translator, i.e. layers 0, 2, 4, ... < translator index.
* ``stage2`` (train the encoder on the frozen decoder): the last ``encoder_trainable_layers`` (default 8) CLIP
  layers + ``post_layernorm`` + adapter + start/end-of-image embeddings; the decoder is frozen.
* ``stage3`` (full decoder training): the stage-2 set + the whole decoder.

The CLIP patch/position/class embeddings and ``pre_layernorm`` are frozen in every stage, as in the reference.
Freezing sets ``requires_grad=False`` before the model is wrapped in megatron DDP, so frozen parameters get no
gradient buffer and no optimizer state.
"""
from __future__ import annotations

import re
from typing import Callable, Optional

import torch

from megatron_zero.models.llama_config import LlamaConfig, translator_indices
from megatron_zero.errors import UserError

STAGES = ("stage1", "stage2", "stage3")
DEFAULT_ENCODER_TRAINABLE_LAYERS = 8

_DEC_LAYER = re.compile(r"^language_model\.decoder\.layers\.(\d+)\.")
_ENC_LAYER = re.compile(r"^vision\.vision_model\.transformer\.layers\.(\d+)\.")
_ALWAYS = ("vision.adapter.", "vision.image_start_embedding", "vision.image_end_embedding",
           "vision.vision_model.post_layernorm.")


class FreezingError(UserError, ValueError):
    """A freezing preset that cannot be applied to this model."""


def translator_layers(decoder_cfg: LlamaConfig, explicit: Optional[int] = None) -> list[int]:
    """Every translator layer of the surrogate (several with multi-range / multi-translator surrogates, see
    :mod:`megatron_zero.surrogate`): ``[explicit]`` if given, else from the surrogate provenance."""
    if explicit is not None:
        indices = [int(explicit)]
    else:
        indices = translator_indices(decoder_cfg.surrogate)
        if not indices:
            raise FreezingError(
                f"stage 1 trains the surrogate's translator layer, but decoder {decoder_cfg.name!r} has no surrogate "
                f"provenance (LlamaConfig.surrogate with 'translator_index' or 'a'); build the decoder with the "
                f"surrogate tool or pass --translator-layer explicitly")
    for index in indices:
        if not 0 <= index < decoder_cfg.num_layers:
            raise FreezingError(f"translator layer {index} is outside decoder {decoder_cfg.name!r}'s "
                                f"{decoder_cfg.num_layers} layers")
    return indices


def trainable_predicate(stage: str, decoder_cfg: LlamaConfig, num_encoder_layers: int,
                        encoder_trainable_layers: int = DEFAULT_ENCODER_TRAINABLE_LAYERS,
                        translator_layer: Optional[int] = None,
                        control_unfreeze_early: bool = False) -> Callable[[str], bool]:
    """``name -> trainable`` over VLM parameter names with *global* decoder layer indices
    (see :func:`global_parameter_names`). ``num_encoder_layers`` = CLIP layers the model builds."""
    if stage not in STAGES:
        raise FreezingError(f"unknown training stage {stage!r}; choose from {STAGES}")
    if control_unfreeze_early and stage != "stage1":
        raise FreezingError("--control-unfreeze-early only applies to stage 1 (the T* control of Sec. 1.2)")
    if stage == "stage1":
        translators = translator_layers(decoder_cfg, translator_layer)
        t = translators[0]
        decoder_layers = set(translators) | (set(range(0, t, 2)) if control_unfreeze_early else set())

        def stage1(name: str) -> bool:
            m = _DEC_LAYER.match(name)
            return name.startswith(_ALWAYS) or (m is not None and int(m.group(1)) in decoder_layers)

        return stage1
    if not 0 <= encoder_trainable_layers <= num_encoder_layers:
        raise FreezingError(f"--encoder-trainable-layers {encoder_trainable_layers} must be in "
                            f"[0, {num_encoder_layers}] (the encoder builds {num_encoder_layers} layers)")
    first = num_encoder_layers - encoder_trainable_layers

    def encoder_side(name: str) -> bool:
        m = _ENC_LAYER.match(name)
        return name.startswith(_ALWAYS) or (m is not None and int(m.group(1)) >= first)

    if stage == "stage2":
        return encoder_side
    if decoder_cfg.lora:  # LoRA: the adapters train, the decoder's own weights stay frozen
        return lambda name: encoder_side(name) or (name.startswith("language_model.") and "_lora." in name)
    return lambda name: encoder_side(name) or name.startswith("language_model.")


def global_parameter_names(chunk: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """``(name, param)`` of a VLM chunk with global decoder layer indices and spec-independent norm names."""
    from megatron_zero.parallel import sharding

    out = []
    mapping = sharding.layer_index_map(chunk.language_model)
    for name, p in chunk.named_parameters():
        if name.startswith("language_model."):
            name = "language_model." + sharding.canonical_key(name[len("language_model."):], mapping)
        elif name.startswith("vision."):
            name = "vision." + sharding.canonical_key(name[len("vision."):], {})
        out.append((name, p))
    return out


def apply_freezing(chunks: list, stage: str, encoder_trainable_layers: int = DEFAULT_ENCODER_TRAINABLE_LAYERS,
                   translator_layer: Optional[int] = None, control_unfreeze_early: bool = False) -> None:
    """Set ``requires_grad`` on every parameter of this rank's VLM chunks for ``stage`` (before DDP wrapping)."""
    cfg = chunks[0].cfg
    keep = trainable_predicate(stage, cfg.decoder, cfg.vision.num_built_layers, encoder_trainable_layers,
                               translator_layer, control_unfreeze_early)
    for chunk in chunks:
        for name, p in global_parameter_names(chunk):
            p.requires_grad_(keep(name))


def _group(name: str) -> str:
    m = _DEC_LAYER.match(name)
    if m:
        return f"decoder layer {int(m.group(1))}"
    m = _ENC_LAYER.match(name)
    if m:
        return f"encoder layer {int(m.group(1))}"
    for prefix, label in (("vision.adapter.", "adapter"), ("vision.image_", "start/end-of-image embeddings"),
                          ("vision.vision_model.post_layernorm", "encoder post_layernorm"),
                          ("vision.vision_model.", "encoder embeddings + pre_layernorm"),
                          ("language_model.embedding", "decoder embedding"),
                          ("language_model.decoder.final_layernorm", "decoder final norm"),
                          ("language_model.output_layer", "decoder output layer")):
        if name.startswith(prefix):
            return label
    return name


def trainable_counts(chunks: list) -> dict[str, list[int]]:
    """``group -> [trainable, frozen]`` parameter counts over the whole model (TP pieces counted in full, the
    pipeline stages gathered when distributed)."""
    import torch.distributed as dist

    counts: dict[str, list[int]] = {}
    tp = 1
    if dist.is_initialized():
        from megatron.core import parallel_state as ps

        tp = ps.get_tensor_model_parallel_world_size()
    for chunk in chunks:
        for name, p in global_parameter_names(chunk):
            n = p.numel() * (tp if getattr(p, "tensor_model_parallel", False) else 1)
            counts.setdefault(_group(name), [0, 0])[0 if p.requires_grad else 1] += n
    if dist.is_initialized():
        from megatron.core import parallel_state as ps

        group = ps.get_pipeline_model_parallel_group()
        parts: list = [None] * dist.get_world_size(group)
        dist.all_gather_object(parts, counts, group=group)
        counts = {}
        for part in parts:
            for k, (t, f) in part.items():
                c = counts.setdefault(k, [0, 0])
                c[0] += t
                c[1] += f
    return counts


def trainable_report(chunks: list, stage: str) -> str:
    """The start-up printout: every group with trainable/frozen counts, trainable groups marked."""
    counts = trainable_counts(chunks)

    def order(k: str):
        m = re.match(r"(encoder|decoder) layer (\d+)$", k)
        return (0 if k.startswith(("encoder", "adapter", "start")) else 1, k.split(" ")[0], int(m.group(2)) if m else -1, k)

    lines = [f"trainable parameters for {stage}:", f"  {'':2s}{'group':40s} {'trainable':>14s} {'frozen':>14s}"]
    for k in sorted(counts, key=order):
        t, f = counts[k]
        lines.append(f"  {'*' if t else ' ':2s}{k:40s} {t:14,d} {f:14,d}")
    total_t = sum(c[0] for c in counts.values())
    total_f = sum(c[1] for c in counts.values())
    lines.append(f"  {'':2s}{'total':40s} {total_t:14,d} {total_f:14,d}")
    return "\n".join(lines)
