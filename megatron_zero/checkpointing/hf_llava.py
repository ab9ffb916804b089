"""Export a VLM checkpoint as a HuggingFace ``LlavaForConditionalGeneration`` (transformers loads it unchanged).

Only the LLaVA feature convention maps onto transformers' LLaVA: penultimate CLIP layer, class token dropped, no
post-layernorm, a Linear-GELU-Linear projector (our adapter), one image token per image feature in ``input_ids``.
The export keeps just the CLIP layers that compute the features (``num_hidden_layers`` = built layers,
``vision_feature_layer=-1``: the same features), and HF's unused ``post_layernorm`` is written as the identity.

The paper's default convention cannot be represented and is refused with the reasons: its features are the last
layer's *after* ``post_layernorm`` with the class token, and every image is wrapped in two learned start/end-of-image
embeddings (579 positions per image) that have no place in ``LlavaForConditionalGeneration``.
"""
from __future__ import annotations

import sys


import torch

from megatron_zero.models.vlm import VLMConfig
from megatron_zero.errors import UserError


class LlavaExportError(UserError, ValueError):
    """The VLM cannot be written as a transformers LLaVA model."""


def export_problems(cfg: VLMConfig) -> list[str]:
    if cfg.vision.feature_convention == "llava":
        return []
    return [
        "its image features are the last CLIP layer after post_layernorm, class token included; transformers' LLaVA "
        "feeds hidden_states[vision_feature_layer] (before post_layernorm)",
        f"each image is wrapped in learned start/end-of-image embeddings ({cfg.num_image_embeddings} positions per "
        f"image: {cfg.vision.num_image_tokens} features + 2), which LlavaForConditionalGeneration cannot represent",
    ]


def llava_config(cfg: VLMConfig, dtype: torch.dtype) -> dict:
    vision = {**cfg.vision.to_hf_config(), "num_hidden_layers": cfg.vision.num_built_layers,
              "model_type": "clip_vision_model"}
    text = {k: v for k, v in cfg.decoder.to_hf_config().items() if k not in ("architectures", "torch_dtype")}
    return {
        "architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
        "vision_config": vision, "text_config": text, "image_token_index": cfg.image_token_id,
        "image_seq_length": cfg.vision.num_image_tokens, "projector_hidden_act": "gelu",
        "vision_feature_select_strategy": "default", "vision_feature_layer": -1, "multimodal_projector_bias": True,
        "tie_word_embeddings": cfg.decoder.tie_word_embeddings, "torch_dtype": str(dtype).replace("torch.", ""),
    }


def iter_llava_tensors(cfg: VLMConfig, encoder: dict, decoder):
    """(HF LLaVA name, tensor) pairs, one at a time. ``decoder``: a canonical getter, or an iterable of canonical
    ``(key, tensor)`` pairs (streamed from a torch_dist decoder)."""
    from megatron_zero.checkpointing import hf_clip, hf_llama

    v = cfg.vision
    for ckey in hf_clip.canonical_keys(v):
        for name, t in hf_clip.from_canonical(ckey, encoder[f"vision_model.{ckey}"], v, prefix="").items():
            yield f"model.vision_tower.{name}", t
    h = v.hidden_size
    dtype = encoder["vision_model.class_embedding"].dtype
    yield "model.vision_tower.post_layernorm.weight", torch.ones(h, dtype=dtype)  # unused by LLaVA's features
    yield "model.vision_tower.post_layernorm.bias", torch.zeros(h, dtype=dtype)
    for ours, theirs in (("linear_fc1", "linear_1"), ("linear_fc2", "linear_2")):
        for p in ("weight", "bias"):
            yield f"model.multi_modal_projector.{theirs}.{p}", encoder[f"adapter.{ours}.{p}"]
    pairs = ((k, decoder(k)) for k in hf_llama.canonical_keys(cfg.decoder)) if callable(decoder) else decoder
    for ckey, tensor in pairs:
        for name, t in hf_llama.from_canonical(ckey, tensor, cfg.decoder).items():
            yield (name if name == "lm_head.weight" else "model.language_model." + name[len("model."):]), t


def _tokenizer_problem(tokenizer_dir: str):
    """Why the decoder's tokenizer cannot be exported (``None`` when it can be)."""
    from megatron_zero.data.tokenizers import load_tokenizer

    try:
        load_tokenizer(tokenizer_dir)
    except (FileNotFoundError, ValueError) as e:
        return str(e)
    return None


def export_hf_llava(vlm_dir: str, save_dir: str, overwrite: bool = False, max_shard_bytes: int = 5 * 10**9,
                    merge_lora: bool = False) -> None:
    """Write a VLM as an HF LLaVA directory. ``vlm_dir``: anything that resolves to a VLM (``tools/graft.py``
    output, a training run or its ``<save>/export``, whose decoder is a torch_dist checkpoint, or one ``iter_*`` of
    the run: loaded in this process with the frozen base it references). A decoder with LoRA
    adapters (stage 3 with ``--lora-rank``) needs ``merge_lora``: the adapters are folded into its weights."""
    from megatron_zero.platform import mcore_fixes
    from megatron_zero.checkpointing.hf_writer import (ShardedSafetensorsWriter, atomic_directory, check_save_dir,
                                                       copy_tokenizer_files, write_config)
    from megatron_zero.checkpointing.hf_llava_processor import write_hf_processor_files
    from megatron_zero.checkpointing.resolve import VLM_KINDS, resolve_checkpoint
    from megatron_zero.checkpointing.sources import iter_decoder_canonical
    from megatron_zero.checkpointing.vlm_checkpoint import load_image_encoder
    from megatron_zero.parallel.initialize import init_process_group

    ckpt = resolve_checkpoint(vlm_dir, "--load-dir", accept=VLM_KINDS)
    cfg = ckpt.vlm_config
    problems = export_problems(cfg)
    if problems:
        raise LlavaExportError(f"{vlm_dir}: cannot export as HF LLaVA: " + "; ".join(problems)
                               + " (train with --feature-convention llava for a transformers-compatible VLM)")
    if cfg.decoder.lora and not merge_lora:
        raise LlavaExportError(f"{vlm_dir}: the decoder holds LoRA adapters (rank {cfg.decoder.lora['rank']}); "
                               f"pass --merge-lora to fold them into the exported decoder")
    if ckpt.encoder_dir is not None:
        _, encoder = load_image_encoder(ckpt.encoder_dir)
    else:  # a training checkpoint (iter_*): the VLM is loaded, with the frozen base it references
        from megatron_zero.checkpointing.sources import encoder_source

        encoder = encoder_source(ckpt).tensors
    tokenizer_problem = _tokenizer_problem(ckpt.tokenizer_dir or ckpt.decoder.path)
    check_save_dir(save_dir, overwrite)
    if ckpt.decoder.format != "hf":  # torch_dist reads are collective: a world of one
        mcore_fixes.setup_megatron_core()
        init_process_group()
    with atomic_directory(save_dir, overwrite) as tmp:
        writer = ShardedSafetensorsWriter(tmp, max_shard_bytes, log=lambda m: None)
        decoder = iter_decoder_canonical(ckpt)
        if cfg.decoder.lora:
            import dataclasses

            from megatron_zero.checkpointing.lora_merge import merge_canonical

            decoder = merge_canonical(decoder, cfg.decoder)
            cfg = dataclasses.replace(cfg, decoder=dataclasses.replace(cfg.decoder, lora=None))
        for name, t in iter_llava_tensors(cfg, encoder, decoder):
            writer.add(name, t)
        writer.close()
        tokenizer_dir = ckpt.tokenizer_dir or ckpt.decoder.path
        copy_tokenizer_files(tokenizer_dir, tmp)
        if tokenizer_problem is None:
            write_hf_processor_files(tmp, tokenizer_dir, cfg)
        else:
            print(f"warning: {tokenizer_problem}: the export holds the weights and config.json only (no tokenizer, "
                  f"processor or chat template: AutoProcessor will not load it)", file=sys.stderr)
        write_config(tmp, llava_config(cfg, encoder["vision_model.class_embedding"].dtype))
