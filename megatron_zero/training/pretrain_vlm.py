"""VLM training, stages 1-3 of the paper (Table A.4): ``torchrun ... -m megatron_zero.training.pretrain_vlm``.

``--stage`` presets (every value can be overridden by its flag):

=====  ==========================================================  =======  ============  ==================
stage  trains                                                      lr       global batch  loss on specials
=====  ==========================================================  =======  ============  ==================
1      adapter + start/end-of-image embeddings + CLIP post-LN +    1e-4     256           no
       the surrogate's translator layer
2      last ``--encoder-trainable-layers`` (8) CLIP layers +       5e-5     128           yes (A.9)
       post-LN + adapter (+ start/end), decoder frozen
3      the stage-2 set + the full decoder                          2e-5 for 70B,  128      no
                                                                   else 5e-5
=====  ==========================================================  =======  ============  ==================

All stages: AdamW (0.9, 0.999, 1e-8), weight decay 0, cosine to 0 with 3% warmup, grad clip 1.0 (bf16 and
activation recompute are flags, as in Megatron). ``--loss-weighting length-weighted`` is A.11's dynamic loss
(use it for stage 3).

Weights: ``--decoder-load`` (target, surrogate, or a previous stage's run directory) and ``--encoder-load``
(HF CLIP, an image-encoder or VLM checkpoint, or a previous run); ``--load`` resumes this run exactly. At the end
the run is exported to ``<save>/export`` (``vlm_config.json``, the image encoder, and the decoder as a sharded
checkpoint), which the next stage's ``--decoder-load``/``--encoder-load`` and ``tools/graft.py`` read.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Optional, Sequence

from megatron_zero import arguments
from megatron_zero.config import ConfigError, RunConfig
from megatron_zero.errors import DataError

STAGE_PRESETS = {
    1: {"lr": 1e-4, "global_batch_size": 256, "loss_on_special_tokens": False},
    2: {"lr": 5e-5, "global_batch_size": 128, "loss_on_special_tokens": True},
    3: {"lr": 5e-5, "global_batch_size": 128, "loss_on_special_tokens": False},
}
STAGE3_LR_70B = 2e-5
DEFAULT_ENCODER_TRAINABLE_LAYERS = 8


def build_parser() -> argparse.ArgumentParser:
    p = arguments.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    arguments.add_parallel_args(p)
    arguments.add_model_args(p)
    arguments.add_training_args(p)
    # stage presets fill these unless given
    for action in p._actions:
        if action.dest in ("lr", "global_batch_size"):
            action.default = None
    g = p.add_argument_group("VLM")
    g.add_argument("--stage", type=int, choices=[1, 2, 3], required=True)
    g.add_argument("--decoder-load", required=True, help="decoder weights (HF Llama dir, VLM or model checkpoint)")
    g.add_argument("--encoder-load", default=None, help="encoder weights (HF CLIP dir, image-encoder/VLM checkpoint)")
    g.add_argument("--vision-model", default=None, help="vision preset for a fresh encoder (no --encoder-load)")
    g.add_argument("--feature-convention", choices=["zero", "llava"], default="zero",
                   help="zero: last layer with class token + post-LN, start/end embeddings (579); llava: 576")
    g.add_argument("--image-token-id", type=int, default=None, help="placeholder id (default: the chat template's)")
    g.add_argument("--tokenizer", default=None,
                   help="tokenizer file or directory (default: the one --decoder-load holds)")
    g.add_argument("--chat-template", default=None, help="llama3 | llama2 | gemma | word | qwen3 | qwen3-no-thinking | qwen2 (default: detected)")
    g.add_argument("--prompt-format", choices=["meta", "zero"], default="meta",
                   help="meta: the family's chat format; zero: the authors' Llama-3 format, random caption-template "
                        "image prompt and loss masks (special-token loss on by default in stages 1 and 2)")
    g.add_argument("--data-path", required=True,
                   help="LLaVA-1.5 JSON, or a shard dataset directory from tools/prepare_data.py (docs/data.md)")
    g.add_argument("--image-root", default=None, help="directory the JSON's image paths are relative to (JSON only)")
    g.add_argument("--text-data-path", default=None, help="text-only instruction JSONL mixed in (stage 1: GenQA)")
    g.add_argument("--text-ratio", type=float, default=None,
                   help="share of text-only samples in the mix (default: proportional to dataset sizes)")
    g.add_argument("--loss-weighting", choices=["token-mean", "length-weighted", "length-weighted-released"],
                   default="token-mean")
    g.add_argument("--loss-weighting-ord", type=float, default=None,
                   help="exponent (default: 0.5 for length-weighted, the paper; 1.0 for length-weighted-released, "
                        "their balance_loss_exp_ord)")
    g.add_argument("--loss-weighting-avg-norm", action="store_true",
                   help="length-weighted-released: divide by the mean weight (their balance_loss_exp_avg_norm)")
    g.add_argument("--loss-on-special-tokens", action=argparse.BooleanOptionalAction, default=None,
                   help="also put loss on the chat template's special tokens (A.9; default: on in stage 2, and in "
                        "stages 1 and 2 with --prompt-format zero, as the authors' configs)")
    g.add_argument("--encoder-trainable-layers", type=int, default=None,
                   help="stages 2-3: train the encoder's last N layers (default 8, Table A.4; all of them for an "
                        "encoder with fewer)")
    g.add_argument("--translator-layer", type=int, default=None, help="override the surrogate's translator index")
    g.add_argument("--control-unfreeze-early", action="store_true", help="stage 1 T* control (Sec. 1.2)")
    g.add_argument("--pack-sequences", action=argparse.BooleanOptionalAction, default=True,
                   help="pack several samples per --seq-length row, attention and RoPE positions per sample "
                        "(default; --no-pack-sequences: one padded sample per row)")
    g.add_argument("--allow-dropped-samples", action="store_true",
                   help="train on without the conversations whose image does not fit in --seq-length")
    g.add_argument("--strict-images", action="store_true",
                   help="fail on a missing/corrupt image instead of dropping its sample (replaced by the next one)")
    g.add_argument("--no-export", action="store_true", help="skip writing <save>/export at the end")
    from megatron_zero.models.lora import add_lora_arguments

    add_lora_arguments(p)  # stage 3 with LoRA adapters on the frozen decoder (the paper's Fig. 2 baseline)
    return p


def tokenizer_path(given: Optional[str], decoder_path: str) -> str:
    """``--tokenizer``, else the tokenizer the decoder checkpoint holds (an HF or torch_dist directory, or the
    ``decoder/`` of a VLM checkpoint / training export)."""
    from megatron_zero.checkpointing.run_dir import export_dir
    from megatron_zero.checkpointing.vlm_checkpoint import DECODER_DIR
    from megatron_zero.data.tokenizers import TOKENIZER_DIR_CANDIDATES

    if given:
        return given
    for d in (decoder_path, os.path.join(decoder_path, DECODER_DIR),
              os.path.join(export_dir(decoder_path), DECODER_DIR)):
        if any(os.path.isfile(os.path.join(d, c)) for c in TOKENIZER_DIR_CANDIDATES):
            return d
    try:  # a training checkpoint (iter_*): the tokenizer its run recorded
        from megatron_zero.checkpointing.resolve import resolve_checkpoint

        found = resolve_checkpoint(decoder_path, "--decoder-load").tokenizer_dir
    except ValueError:
        found = None
    if found:
        return found
    raise ConfigError(f"--tokenizer: not given, and --decoder-load {decoder_path} holds no tokenizer "
                      f"(tokenizer.json or tokenizer.model); give --tokenizer")


def apply_stage_presets(cfg: RunConfig, decoder_layers: int) -> RunConfig:
    """The stage's defaults (Table A.4) for what the flags leave open; returns the resolved config."""
    from megatron_zero.loss.length_weighted import DEFAULT_ORD, DEFAULT_RELEASED_ORD

    stage = cfg.stage
    preset = STAGE_PRESETS[stage.stage]
    if cfg.optimizer.lr is None:
        cfg = cfg.replace("optimizer", lr=STAGE3_LR_70B if stage.stage == 3 and decoder_layers >= 80 else preset["lr"])
    if cfg.training.global_batch_size is None:
        cfg = cfg.replace("training", global_batch_size=preset["global_batch_size"])
    if stage.loss_weighting_ord is None:
        released = stage.loss_weighting == "length-weighted-released"
        cfg = cfg.replace("stage", loss_weighting_ord=DEFAULT_RELEASED_ORD if released else DEFAULT_ORD)
    if stage.loss_on_special_tokens is None:
        # the authors' train_llama.py: include_special_tokens_in_masking_instruction_tokens = stage != finetune-decoder
        zero = cfg.data.prompt_format == "zero"
        cfg = cfg.replace("stage", loss_on_special_tokens=stage.stage in (1, 2) if zero
                          else preset["loss_on_special_tokens"])
    return cfg


class DatasetTooSmallError(DataError):
    """The training data cannot fill what the run asks of it."""


def check_dropped(ds, flag: str, path: str, cfg: RunConfig, num_image_embeddings: int) -> None:
    """Conversations lost to ``--seq-length`` (their image does not fit) stop the run unless
    ``--allow-dropped-samples``: the message says how long the samples are."""
    import numpy as np

    dropped = int(ds.skipped.get("image_does_not_fit", 0))
    total = len(ds.needed_lengths)
    if not dropped or cfg.data.allow_dropped_samples:
        return
    need = ds.needed_lengths
    raise DatasetTooSmallError(
        f"{flag} {path}: --seq-length {cfg.training.seq_length} drops {dropped} of {total} conversations (their "
        f"image does not fit; an image takes {num_image_embeddings} positions); the conversations need "
        f"{int(need.min())} to {int(need.max())} positions (median {int(np.median(need))}): raise --seq-length to "
        f"{int(need.max())} or pass --allow-dropped-samples")


def check_fills_a_batch(ds, cfg: RunConfig) -> None:
    gbs = cfg.training.global_batch_size
    if len(ds) < gbs:
        raise DatasetTooSmallError(
            f"--data-path {cfg.data.data_path}: {len(ds)} usable samples, fewer than one global batch "
            f"(--global-batch-size {gbs}); use a smaller --global-batch-size or more data")


def build_dataset(cfg: RunConfig, tokenizer, template, num_image_embeddings: int, conversations):
    """The training mixture: ``conversations`` (of ``--data-path``) plus ``--text-data-path``'s."""
    from megatron_zero.data.datasets import ChatDataset, MixtureDataset, TokenizationConfig, read_instruction_jsonl

    d, seed = cfg.data, cfg.training.seed
    tcfg = TokenizationConfig(max_seq_len=cfg.training.seq_length, num_image_tokens=num_image_embeddings,
                              loss_on_special_tokens=cfg.stage.loss_on_special_tokens, prompt_seed=seed)
    vision = ChatDataset.build(conversations, template, tcfg, source="llava")
    check_dropped(vision, "--data-path", d.data_path, cfg, num_image_embeddings)
    if not d.text_data_path:
        return vision
    text = ChatDataset.build(read_instruction_jsonl(d.text_data_path), template, tcfg, source="text")
    check_dropped(text, "--text-data-path", d.text_data_path, cfg, num_image_embeddings)
    weights = [len(vision), len(text)] if d.text_ratio is None else [1 - d.text_ratio, d.text_ratio]
    return MixtureDataset([vision, text], weights, seed=seed)


def export(chunks, cfg, out_dir: str, tokenizer_dir: Optional[str]) -> None:
    """``<out_dir>``: vlm_config.json + image encoder + ``decoder/`` (sharded model checkpoint). Collective."""
    import json
    import shutil

    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_zero.checkpointing import mcore_checkpoint
    from megatron_zero.checkpointing import vlm_checkpoint
    from megatron_zero.models.vlm import VLM_CONFIG_FILE
    from megatron_zero.training.optimizer import unwrap

    models = [unwrap(c) for c in chunks]
    tok_sha = vlm_checkpoint.tokenizer_hash(tokenizer_dir) if tokenizer_dir and os.path.isdir(tokenizer_dir) else None
    if dist.get_rank() == 0 and os.path.isdir(out_dir):
        shutil.rmtree(out_dir)
    dist.barrier()
    if ps.is_pipeline_first_stage(ignore_virtual=True):
        vlm_checkpoint.save_image_encoder_from_model(out_dir, models[0], tok_sha, overwrite=True)
    dist.barrier()
    mcore_checkpoint.save_model([m.language_model for m in models], os.path.join(out_dir, "decoder"), cfg.decoder,
                                overwrite=True,
                                copy_files_from=tokenizer_dir if tokenizer_dir and os.path.isdir(tokenizer_dir) else None)
    if dist.get_rank() == 0:
        tmp = os.path.join(out_dir, VLM_CONFIG_FILE + ".tmp")
        with open(tmp, "w") as f:
            json.dump(cfg.to_dict(), f, indent=2)
        os.replace(tmp, os.path.join(out_dir, VLM_CONFIG_FILE))
    dist.barrier()


def resolve_weights(cfg: RunConfig):
    """The decoder and encoder to start from (with fresh LoRA adapters for ``--lora-rank``), and ``cfg`` with the
    stage presets and ``--encoder-trainable-layers`` resolved: ``(cfg, decoder, encoder, fresh_adapters)``."""
    from megatron_zero.checkpointing.sources import resolve_decoder, resolve_encoder
    from megatron_zero.models.lora import LoraConfig, is_lora_key

    st = cfg.stage
    dec = resolve_decoder(st.decoder_load)
    enc = resolve_encoder(st.encoder_load, st.vision_model, st.feature_convention)
    lora = LoraConfig.from_config(cfg.model)
    fresh_adapters = None
    if lora is not None:
        if st.stage != 3:
            raise ConfigError(f"--lora-rank trains the decoder: stage 3 only (got --stage {st.stage})")
        if dec.cfg.lora:
            raise ConfigError(f"--lora-rank: --decoder-load {st.decoder_load} already has LoRA adapters "
                              f"{dec.cfg.lora}")
        dec.cfg = dataclasses.replace(dec.cfg, lora=lora.to_dict())
        fresh_adapters = is_lora_key
    cfg = apply_stage_presets(cfg, dec.cfg.num_layers)
    built = enc.vision.num_built_layers
    layers = cfg.stage.encoder_trainable_layers
    if layers is None:
        cfg = cfg.replace("stage", encoder_trainable_layers=min(DEFAULT_ENCODER_TRAINABLE_LAYERS, built))
    elif not 0 <= layers <= built:
        raise ConfigError(f"--encoder-trainable-layers {layers}: the encoder {enc.vision.name} builds {built} layers "
                          f"({enc.vision.feature_convention} feature convention); expected 0..{built}")
    return cfg, dec, enc, fresh_adapters


def resolve_text(cfg: RunConfig, dec, enc):
    """Tokenizer and chat template (the decoder's unless given) and the VLM's architecture:
    ``(cfg with --tokenizer resolved, tokenizer, template, VLMConfig)``."""
    from megatron_zero.data.chat_template import chat_template_for
    from megatron_zero.data.tokenizers import load_tokenizer
    from megatron_zero.models.vlm import VLMConfig

    d = cfg.data
    cfg = cfg.replace("data", tokenizer=tokenizer_path(d.tokenizer, dec.path))
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    if tokenizer.vocab_size > dec.cfg.vocab_size:
        raise ConfigError(f"--tokenizer {cfg.data.tokenizer} has {tokenizer.vocab_size} tokens but the decoder "
                          f"(--decoder-load {cfg.stage.decoder_load}) has a {dec.cfg.vocab_size}-token vocabulary: "
                          f"use the decoder's own tokenizer")
    # an encoder trained before keeps the placeholder id it was trained with
    placeholder = d.image_token_id if d.image_token_id is not None else enc.image_token_id
    try:
        template = chat_template_for(tokenizer, d.chat_template, image_placeholder=placeholder,
                                     prompt_format=d.prompt_format, model_family=dec.cfg.family)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    image_token_id = template.image_placeholder_id
    if image_token_id is None:
        raise ConfigError("the chat template has no image placeholder token: give --image-token-id")
    return cfg, tokenizer, template, VLMConfig(dec.cfg, enc.vision, int(image_token_id))


def main(argv: Optional[Sequence[str]] = None) -> list:
    from megatron_zero.training.loop import install_exit_signals

    cfg = arguments.parse(build_parser(), argv, required=["--train-iters"])
    install_exit_signals()  # a preemption signal during set-up is honoured after the first step

    from megatron_zero import platform
    from megatron_zero.data.shards import open_llava_data
    from megatron_zero.models.freezing import apply_freezing, trainable_report
    from megatron_zero.models.llama import RuntimeOptions, validate
    from megatron_zero.models.vlm import build_vlm_chunks
    from megatron_zero.parallel.initialize import print_rank0
    from megatron_zero.training.flops import decoder_flops_per_step
    from megatron_zero.training.trainer import Trainer
    from megatron_zero.training.vlm_batches import VLMBatches, vlm_forward_step

    cfg, dec, enc, fresh_adapters = resolve_weights(cfg)
    trainer = Trainer(cfg)
    opts = RuntimeOptions.from_config(cfg.parallel, cfg.model)
    validate(dec.cfg, opts)
    cfg, tokenizer, template, vlm_cfg = resolve_text(cfg, dec, enc)
    trainer.cfg = trainer.cfg.replace("data", tokenizer=cfg.data.tokenizer)  # recorded in every checkpoint
    # the data is checked before any model is built or weight is read
    d = cfg.data
    source = open_llava_data(d.data_path, d.image_root, strict=d.strict_images)  # JSON or shards
    dataset = build_dataset(cfg, tokenizer, template, vlm_cfg.num_image_embeddings, source.conversations)
    check_fills_a_batch(dataset, cfg)
    dp = trainer.initialize()
    st = cfg.stage
    print_rank0(f"megatron_zero pretrain_vlm stage {st.stage}: {platform.summary()} | "
                f"TP={opts.tensor_model_parallel_size} PP={opts.pipeline_model_parallel_size} DP={dp} | "
                f"decoder {dec.cfg.name} ({dec.cfg.num_layers} layers) from {dec.path} | encoder "
                f"{enc.vision.name} ({vlm_cfg.num_image_embeddings} embeddings/image)")

    chunks = build_vlm_chunks(vlm_cfg, opts)
    dec.load_into(chunks, skip=fresh_adapters)
    enc.load_into(chunks, seed=cfg.training.seed)
    apply_freezing(chunks, f"stage{st.stage}", st.encoder_trainable_layers, st.translator_layer,
                   st.control_unfreeze_early)
    print_rank0(trainable_report(chunks, f"stage{st.stage}"))

    batches = VLMBatches.from_config(
        dataset, cfg, pad_id=tokenizer.pad_id, image_token_id=vlm_cfg.image_token_id,
        num_image_embeddings=vlm_cfg.num_image_embeddings, image_size=enc.vision.image_size,
        eot_id=template.stop_token_ids[0], read_image=source.load_image)
    t = cfg.training
    trainer.build(chunks, vlm_forward_step, batches.iteration, model_config=vlm_cfg.to_dict(),
                  flops_per_step=decoder_flops_per_step(dec.cfg, t.global_batch_size, t.seq_length))
    losses = trainer.run()
    skipped = batches.total_skipped()
    if skipped:
        print_rank0(f"warning: {skipped} sample(s) with a missing or corrupt image were dropped and replaced by the "
                    f"next ones (over all data-parallel ranks)")
    save = cfg.checkpoint.save
    if save and not cfg.checkpoint.no_export:
        from megatron_zero.checkpointing.run_dir import export_dir

        tok = cfg.data.tokenizer
        export(trainer.chunks, vlm_cfg, export_dir(save), tok if os.path.isdir(tok) else os.path.dirname(tok))
        print_rank0(f"exported the VLM to {export_dir(save)}")
    return losses


if __name__ == "__main__":
    from megatron_zero.errors import run_main

    run_main(main)
