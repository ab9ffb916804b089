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
from megatron_zero.checkpointing import run_dir


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    arguments.add_parallel_args(p)
    arguments.add_model_args(p)
    arguments.add_training_args(p)
    from megatron_zero.models.lora import add_lora_arguments

    add_lora_arguments(p)
    p.add_argument("--pretrained", default=None,
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
    g.add_argument("--exit-after-iters", type=int, default=None, help="stop (and save) after this many iterations")
    g.add_argument("--metrics-file", default=None, help="append per-iteration JSON lines (loss, lr, grad norm)")
    return p


def load_tokens(args, vocab_size: Optional[int] = None) -> np.ndarray:
    if args.mock_data:
        from megatron_zero.models.llama_config import load_model_config

        vocab = vocab_size or load_model_config(args.model).vocab_size
        return np.random.default_rng(args.seed).integers(0, vocab, size=max(args.seq_length * 4096, 1 << 16))
    if not args.data_path:
        raise SystemExit("error: give --data-path or --mock-data")
    if not os.path.exists(args.data_path):
        raise SystemExit(f"error: --data-path {args.data_path}: no such file")
    if args.data_path.endswith(".npy"):
        try:
            tokens = np.load(args.data_path)
        except (ValueError, OSError, EOFError) as e:
            raise SystemExit(f"error: --data-path {args.data_path}: not a readable .npy token array ({e})") from None
        if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
            raise SystemExit(f"error: --data-path {args.data_path}: expected a 1-D integer token array, got "
                             f"{tokens.dtype} of shape {tokens.shape}")
        return tokens
    if not args.tokenizer:
        raise SystemExit(f"error: --data-path {args.data_path} is text: --tokenizer is required")
    from megatron_zero.data.tokenizers import load_tokenizer

    tok = load_tokenizer(args.tokenizer)
    ids: list[int] = []
    with open(args.data_path, encoding="utf-8") as f:
        try:
            lines = list(f)
        except UnicodeDecodeError as e:
            raise SystemExit(f"error: --data-path {args.data_path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
        for line_no, line in enumerate(lines, 1):
            text = line
            if args.data_path.endswith(".jsonl"):
                try:
                    text = json.loads(line)["text"]
                except (json.JSONDecodeError, KeyError):
                    raise SystemExit(f"error: {args.data_path}:{line_no}: expected a JSON object with 'text'") from None
            ids.extend(tok.encode(text))
            if tok.eos_id is not None:
                ids.append(tok.eos_id)
    return np.asarray(ids, dtype=np.int64)


def instruction_batches(args, cfg, gbs: int, dp: int, parser):
    """Chat-formatted instruction samples as (packed) micro-batches: :class:`VLMBatches` without images."""
    from megatron.core import parallel_state as ps

    from megatron_zero.data.chat_template import chat_template_for
    from megatron_zero.data.datasets import ChatDataset, TokenizationConfig, read_instruction_jsonl
    from megatron_zero.data.tokenizers import load_tokenizer
    from megatron_zero.training.vlm_batches import VLMBatches

    if not args.tokenizer:
        parser.error(f"--instruction-data-path {args.instruction_data_path}: --tokenizer is required")
    if not os.path.exists(args.instruction_data_path):
        parser.error(f"--instruction-data-path {args.instruction_data_path}: no such file")
    tokenizer = load_tokenizer(args.tokenizer)
    template = chat_template_for(tokenizer, args.chat_template, model_family=cfg.family)
    dataset = ChatDataset.build(read_instruction_jsonl(args.instruction_data_path), template,
                                TokenizationConfig(max_seq_len=args.seq_length, num_image_tokens=1), source="text")
    if len(dataset) == 0:
        parser.error(f"--instruction-data-path {args.instruction_data_path}: no trainable sample")
    return VLMBatches(dataset, image_token_id=None, num_image_embeddings=1, seq_length=args.seq_length,
                      pad_id=tokenizer.pad_id if tokenizer.pad_id is not None else 0, global_batch_size=gbs,
                      micro_batch_size=args.micro_batch_size, dp_rank=ps.get_data_parallel_rank(), dp_size=dp,
                      seed=args.seed, dp_group=ps.get_data_parallel_group(), pack_sequences=args.pack_sequences,
                      microbatch_multiple=args.pipeline_model_parallel_size
                      if args.virtual_pipeline_model_parallel_size else 1)


def main(argv: Optional[Sequence[str]] = None) -> list:
    parser = build_parser()
    args = arguments.parse(parser, argv)
    from megatron_zero.training.loop import install_exit_signals

    install_exit_signals()  # a preemption signal during set-up is honoured after the first step
    if args.model is None and not args.pretrained:
        parser.error("--model is required (a preset name or model_config.json)")
    if args.export_model and not args.save:
        parser.error("--export-model writes <save>/export: give --save")
    if args.train_iters is None:
        parser.error("--train-iters is required")
    from megatron_zero.training.loop import prepare_run

    prepare_run(args)

    from megatron.core import parallel_state as ps

    from megatron_zero.data.token_windows import TokenWindows
    from megatron_zero.models.llama import ModelConfigError, RuntimeOptions, build_llama_chunks
    from megatron_zero.models.llama_config import load_model_config, padded_vocab_size
    from megatron_zero.parallel.initialize import initialize_from_args, print_rank0
    from megatron_zero import platform
    from megatron_zero.training.flops import decoder_flops_per_step
    from megatron_zero.training.loop import LoopConfig, setup_optimization, train
    from megatron_zero.training.train_step import lm_forward_step

    if args.model is None and args.pretrained:
        args.model = args.pretrained
    if args.model is None:
        parser.error("--model: give a preset, a model_config.json or a checkpoint directory (or --pretrained)")
    if os.path.isdir(args.model):  # the architecture of any checkpoint the resolver reads
        from megatron_zero.checkpointing.resolve import DECODER_KINDS, resolve_checkpoint

        try:
            cfg = resolve_checkpoint(args.model, "--model", DECODER_KINDS).decoder.cfg
        except ValueError as e:
            try:  # a directory holding just a model_config.json / config.json
                cfg = load_model_config(args.model)
            except (FileNotFoundError, ValueError):
                parser.error(str(e))
    else:
        cfg = load_model_config(args.model)
    from megatron_zero.models.lora import LoraConfig, LoraError

    try:
        lora = LoraConfig.from_args(args)
    except LoraError as e:
        parser.error(str(e))
    if lora is not None:
        if cfg.lora:
            parser.error(f"--lora-rank: model {args.model} already has LoRA adapters {cfg.lora}")
        cfg = dataclasses.replace(cfg, lora=lora.to_dict())
    opts = RuntimeOptions.from_args(args)
    try:
        from megatron_zero.models.llama import validate

        validate(cfg, opts)
    except ModelConfigError as e:
        parser.error(str(e))
    if not args.instruction_data_path:  # bad data fails here, before anything is built
        tokens = load_tokens(args, cfg.vocab_size)
        if len(tokens) and (int(tokens.max()) >= cfg.vocab_size or int(tokens.min()) < 0):
            raise SystemExit(f"error: --data-path {args.data_path}: token ids span {int(tokens.min())}..{int(tokens.max())} "
                             f"but the model's vocabulary is 0..{cfg.vocab_size - 1}: tokenize with the model's tokenizer")
    dp = initialize_from_args(args)
    print_rank0(f"megatron_zero pretrain_lm: {platform.summary()} | TP={opts.tensor_model_parallel_size} "
                f"PP={opts.pipeline_model_parallel_size} DP={dp} | model {cfg.name} ({cfg.num_parameters():,} params)")
    gbs = args.global_batch_size or args.micro_batch_size * dp
    if gbs % (args.micro_batch_size * dp):
        parser.error(f"--global-batch-size {gbs} is not divisible by --micro-batch-size x DP = {args.micro_batch_size * dp}")

    chunks = build_llama_chunks(cfg, opts)
    if args.pretrained:
        from megatron_zero.checkpointing.sources import resolve_decoder
        from megatron_zero.models.lora import is_lora_key

        source = resolve_decoder(args.pretrained, "--pretrained")
        base = dataclasses.replace(cfg, lora=None, name=source.cfg.name, surrogate=source.cfg.surrogate)
        if dataclasses.replace(source.cfg, lora=None) != base:
            parser.error(f"--pretrained {args.pretrained}: its architecture differs from --model {args.model}")
        source.load_into(chunks, skip=is_lora_key if cfg.lora else None)
        print_rank0(f"loaded decoder weights from {args.pretrained}")
    if cfg.lora:
        from megatron_zero.models.lora import num_trainable_parameters

        print_rank0(f"LoRA rank {cfg.lora['rank']} alpha {cfg.lora['alpha']} on {','.join(cfg.lora['targets'])}: "
                    f"{num_trainable_parameters(cfg):,} trainable parameters, base frozen")
    chunks, optimizer, scheduler, start = setup_optimization(args, chunks, cfg.to_dict())
    loop_cfg = LoopConfig.from_args(args, dp, gbs, decoder_flops_per_step(
        cfg, gbs, args.seq_length, padded_vocab_size(cfg.vocab_size, opts.tensor_model_parallel_size)))
    loop_cfg.model_config = cfg.to_dict()
    if args.save and ps.get_data_parallel_rank() == 0 and ps.get_tensor_model_parallel_rank() == 0 \
            and ps.get_pipeline_model_parallel_rank() == 0:
        os.makedirs(args.save, exist_ok=True)
        cfg.save(os.path.join(args.save, run_dir.MODEL_CONFIG))
    if args.instruction_data_path:
        make_iterator = instruction_batches(args, cfg, gbs, dp, parser).iteration
    else:
        data = TokenWindows(tokens, args.seq_length, seed=args.seed)
        dp_rank = ps.get_data_parallel_rank()

        def make_iterator(it):
            return data.iteration_microbatches(it, gbs, args.micro_batch_size, dp_rank, dp)
    losses = train(loop_cfg, chunks, optimizer, scheduler, lm_forward_step, make_iterator, start_iteration=start)
    if args.export_model:
        from megatron_zero.checkpointing import mcore_checkpoint

        out = run_dir.export_dir(args.save)
        mcore_checkpoint.save_model([getattr(c, "module", c) for c in chunks], out, cfg, overwrite=True,
                                    copy_files_from=args.pretrained if args.pretrained and os.path.isdir(args.pretrained)
                                    else None)
        print_rank0(f"exported the model to {out}" + (" (with its LoRA adapters: convert_checkpoint --merge-lora)"
                                                     if cfg.lora else ""))
    return losses


if __name__ == "__main__":
    from megatron_zero.errors import run_main

    run_main(main)
