"""Language-model (pre)training entry point: ``torchrun ... -m megatron_zero.training.pretrain_lm``.

Used by the demo to pretrain its tiny target LLM, by stage-1-style translator tuning on text, and by the
resume tests. Data: ``--data-path`` (a ``.npy`` token array, or a text/JSONL file tokenised with
``--tokenizer``) or ``--mock-data`` (seeded random tokens), or ``--instruction-data-path`` (chat-formatted instruction
samples, loss on the responses, packed several per ``--seq-length`` row by default, as in ``pretrain_vlm``).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
from typing import Optional, Sequence

import numpy as np

from megatron_zero import arguments
from megatron_zero.config import ConfigError, RunConfig
from megatron_zero.errors import DataError


def build_parser() -> argparse.ArgumentParser:
    p = arguments.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    arguments.add_parallel_args(p)
    arguments.add_model_args(p)
    arguments.add_training_args(p)
    from megatron_zero.models.lora import add_lora_arguments

    add_lora_arguments(p)
    arguments.add_pretrained_checkpoint_arg(
        p, old=["--pretrained"],
        help="start from these decoder weights (HF directory, torch_dist model checkpoint from "
             "tools/convert_checkpoint.py, or VLM checkpoint); with --lora-rank the adapters start fresh")
    p.add_argument("--export-model", action="store_true",
                   help="at the end write <save>/export, a torch_dist model checkpoint (with the LoRA adapters when "
                        "training LoRA) that tools/convert_checkpoint.py exports to HF (--merge-lora)")
    g = p.add_argument_group("data")
    g.add_argument("--data-path", default=None, help=".npy token ids, or text/JSONL ({'text': ...}) with --tokenizer")
    g.add_argument("--tokenizer", default=None, help="tokenizer file or directory (for text data)")
    g.add_argument("--mock-data", action="store_true", help="seeded random tokens (benchmarks, tests)")
    g.add_argument("--instruction-data-path", default=None,
                   help="instruction JSONL (prompt/response or conversations) with --tokenizer: chat-formatted "
                        "samples, loss on the responses, packed into --seq-length rows (see --pack-sequences)")
    g.add_argument("--chat-template", default=None, help="llama3 | llama2 | gemma | word | qwen3 | qwen3-no-thinking | qwen2 (default: detected)")
    g.add_argument("--pack-sequences", action=argparse.BooleanOptionalAction, default=True,
                   help="instruction data: several samples per row, attention and RoPE positions per sample "
                        "(default; --no-pack-sequences: one padded sample per row)")
    return p


def resolve_model_flag(cfg: RunConfig) -> RunConfig:
    """``--model`` defaults to the architecture of ``--pretrained-checkpoint``."""
    if cfg.model.model is None:
        if not cfg.checkpoint.pretrained_checkpoint:
            raise ConfigError("--model is required (a preset name or model_config.json)")
        cfg = cfg.replace("model", model=cfg.checkpoint.pretrained_checkpoint)
    return cfg


def load_tokens(cfg: RunConfig, vocab_size: Optional[int] = None) -> np.ndarray:
    d = cfg.data
    if d.mock_data:
        from megatron_zero.models.llama_config import load_model_config

        vocab = vocab_size or load_model_config(cfg.model.model).vocab_size
        seq_length = cfg.training.seq_length
        return np.random.default_rng(cfg.training.seed).integers(0, vocab, size=max(seq_length * 4096, 1 << 16))
    path = d.data_path
    if not path:
        raise DataError("give --data-path or --mock-data")
    if not os.path.exists(path):
        raise DataError(f"--data-path {path}: no such file")
    if path.endswith(".npy"):
        try:
            tokens = np.load(path)
        except (ValueError, OSError, EOFError) as e:
            raise DataError(f"--data-path {path}: not a readable .npy token array ({e})") from None
        if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
            raise DataError(f"--data-path {path}: expected a 1-D integer token array, got "
                            f"{tokens.dtype} of shape {tokens.shape}")
        return tokens
    if not d.tokenizer:
        raise DataError(f"--data-path {path} is text: --tokenizer is required")
    from megatron_zero.data.tokenizers import load_tokenizer

    tok = load_tokenizer(d.tokenizer)
    ids: list[int] = []
    with open(path, encoding="utf-8") as f:
        try:
            lines = list(f)
        except UnicodeDecodeError as e:
            raise DataError(f"--data-path {path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
        for line_no, line in enumerate(lines, 1):
            text = line
            if path.endswith(".jsonl"):
                try:
                    text = json.loads(line)["text"]
                except (json.JSONDecodeError, KeyError):
                    raise DataError(f"{path}:{line_no}: expected a JSON object with 'text'") from None
            ids.extend(tok.encode(text))
            if tok.eos_id is not None:
                ids.append(tok.eos_id)
    return np.asarray(ids, dtype=np.int64)


def resolve_model(cfg: RunConfig):
    """The architecture to train (``--model``, with ``--lora-rank`` adapters), checked against the parallel layout."""
    from megatron_zero.models.llama import RuntimeOptions, validate
    from megatron_zero.models.llama_config import load_model_config
    from megatron_zero.models.lora import LoraConfig

    model = cfg.model.model
    if os.path.isdir(model):  # the architecture of any checkpoint the resolver reads
        from megatron_zero.checkpointing.resolve import DECODER_KINDS, resolve_checkpoint

        try:
            arch = resolve_checkpoint(model, "--model", DECODER_KINDS).decoder.cfg
        except ValueError as e:
            try:  # a directory holding just a model_config.json / config.json
                arch = load_model_config(model)
            except (FileNotFoundError, ValueError):
                raise ConfigError(str(e)) from None
    else:
        arch = load_model_config(model)
    lora = LoraConfig.from_config(cfg.model)
    if lora is not None:
        if arch.lora:
            raise ConfigError(f"--lora-rank: model {model} already has LoRA adapters {arch.lora}")
        arch = dataclasses.replace(arch, lora=lora.to_dict())
    opts = RuntimeOptions.from_config(cfg.parallel, cfg.model)
    validate(arch, opts)
    return arch, opts


def instruction_dataset(cfg: RunConfig, arch):
    """Chat-formatted instruction samples (loss on the responses) and the tokenizer's pad id."""
    from megatron_zero.data.chat_template import chat_template_for
    from megatron_zero.data.datasets import ChatDataset, TokenizationConfig, read_instruction_jsonl
    from megatron_zero.data.tokenizers import load_tokenizer

    d = cfg.data
    if not d.tokenizer:
        raise ConfigError(f"--instruction-data-path {d.instruction_data_path}: --tokenizer is required")
    if not os.path.exists(d.instruction_data_path):
        raise DataError(f"--instruction-data-path {d.instruction_data_path}: no such file")
    tokenizer = load_tokenizer(d.tokenizer)
    template = chat_template_for(tokenizer, d.chat_template, model_family=arch.family)
    dataset = ChatDataset.build(read_instruction_jsonl(d.instruction_data_path), template,
                                TokenizationConfig(max_seq_len=cfg.training.seq_length, num_image_tokens=1),
                                source="text")
    if len(dataset) == 0:
        raise DataError(f"--instruction-data-path {d.instruction_data_path}: no trainable sample")
    return dataset, tokenizer.pad_id


def load_pretrained(cfg: RunConfig, arch, chunks: list) -> None:
    """``--pretrained-checkpoint`` into ``chunks`` (LoRA adapters start fresh)."""
    from megatron_zero.checkpointing.sources import resolve_decoder
    from megatron_zero.models.lora import is_lora_key
    from megatron_zero.parallel.initialize import print_rank0

    path = cfg.checkpoint.pretrained_checkpoint
    source = resolve_decoder(path, "--pretrained-checkpoint")
    base = dataclasses.replace(arch, lora=None, name=source.cfg.name, surrogate=source.cfg.surrogate)
    if dataclasses.replace(source.cfg, lora=None) != base:
        raise ConfigError(f"--pretrained-checkpoint {path}: its architecture differs from --model {cfg.model.model}")
    source.load_into(chunks, skip=is_lora_key if arch.lora else None)
    print_rank0(f"loaded decoder weights from {path}")


def export_model(cfg: RunConfig, arch, chunks: list) -> None:
    from megatron_zero.checkpointing import mcore_checkpoint
    from megatron_zero.parallel.initialize import print_rank0

    out = os.path.join(cfg.checkpoint.save, "export")
    pretrained = cfg.checkpoint.pretrained_checkpoint
    mcore_checkpoint.save_model([getattr(c, "module", c) for c in chunks], out, arch, overwrite=True,
                                copy_files_from=pretrained if pretrained and os.path.isdir(pretrained) else None)
    print_rank0(f"exported the model to {out}" + (" (with its LoRA adapters: convert_checkpoint --merge-lora)"
                                                 if arch.lora else ""))


def main(argv: Optional[Sequence[str]] = None) -> list:
    from megatron_zero.training.loop import install_exit_signals

    cfg = arguments.parse(build_parser(), argv, required=["--train-iters"], resolve=resolve_model_flag)
    install_exit_signals()  # a preemption signal during set-up is honoured after the first step
    from megatron_zero.training.trainer import Trainer

    trainer = Trainer(cfg)
    from megatron.core import parallel_state as ps

    from megatron_zero import platform
    from megatron_zero.data.token_windows import TokenWindows
    from megatron_zero.models.llama import build_llama_chunks
    from megatron_zero.models.llama_config import padded_vocab_size
    from megatron_zero.parallel.initialize import print_rank0
    from megatron_zero.training.flops import decoder_flops_per_step
    from megatron_zero.training.train_step import lm_forward_step
    from megatron_zero.training.vlm_batches import VLMBatches

    arch, opts = resolve_model(cfg)
    tokens = None
    if not cfg.data.instruction_data_path:  # bad data fails here, before anything is built
        tokens = load_tokens(cfg, arch.vocab_size)
        if len(tokens) and (int(tokens.max()) >= arch.vocab_size or int(tokens.min()) < 0):
            raise DataError(f"--data-path {cfg.data.data_path}: token ids span {int(tokens.min())}..{int(tokens.max())}"
                            f" but the model's vocabulary is 0..{arch.vocab_size - 1}: tokenize with the model's "
                            f"tokenizer")
    dp = trainer.initialize()
    cfg = trainer.cfg  # the global batch size resolved
    print_rank0(f"megatron_zero pretrain_lm: {platform.summary()} | TP={opts.tensor_model_parallel_size} "
                f"PP={opts.pipeline_model_parallel_size} DP={dp} | model {arch.name} "
                f"({arch.num_parameters():,} params)")

    chunks = build_llama_chunks(arch, opts)
    if cfg.checkpoint.pretrained_checkpoint:
        load_pretrained(cfg, arch, chunks)
    if arch.lora:
        from megatron_zero.models.lora import num_trainable_parameters

        print_rank0(f"LoRA rank {arch.lora['rank']} alpha {arch.lora['alpha']} on {','.join(arch.lora['targets'])}: "
                    f"{num_trainable_parameters(arch):,} trainable parameters, base frozen")
    t = cfg.training
    if cfg.data.instruction_data_path:
        dataset, pad_id = instruction_dataset(cfg, arch)
        make_iterator = VLMBatches.from_config(dataset, cfg, pad_id=pad_id).iteration
    else:
        data = TokenWindows(tokens, t.seq_length, seed=t.seed)
        dp_rank = ps.get_data_parallel_rank()

        def make_iterator(it):
            return data.iteration_microbatches(it, t.global_batch_size, t.micro_batch_size, dp_rank, dp)
    trainer.build(chunks, lm_forward_step, make_iterator, model_config=arch.to_dict(),
                  flops_per_step=decoder_flops_per_step(arch, t.global_batch_size, t.seq_length,
                                                        padded_vocab_size(arch.vocab_size,
                                                                          opts.tensor_model_parallel_size)))
    save = cfg.checkpoint.save
    if save and ps.get_data_parallel_rank() == 0 and ps.get_tensor_model_parallel_rank() == 0 \
            and ps.get_pipeline_model_parallel_rank() == 0:
        os.makedirs(save, exist_ok=True)
        arch.save(os.path.join(save, "model_config.json"))
    losses = trainer.run()
    if cfg.checkpoint.export_model:
        export_model(cfg, arch, trainer.chunks)
    return losses


if __name__ == "__main__":
    from megatron_zero.errors import run_main

    run_main(main)
