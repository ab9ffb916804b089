"""Language-model (pre)training entry point: ``torchrun ... -m megatron_zero.training.pretrain_lm``.

Used by the demo to pretrain its tiny target LLM, by stage-1-style translator tuning on text, and by the
resume tests. Data: ``--data-path`` (a ``.npy`` token array, or a text/JSONL file tokenised with
``--tokenizer``) or ``--mock-data`` (seeded random tokens).
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Optional, Sequence

import numpy as np

from megatron_zero import arguments


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    arguments.add_parallel_args(p)
    arguments.add_model_args(p)
    arguments.add_training_args(p)
    g = p.add_argument_group("data")
    g.add_argument("--data-path", default=None, help=".npy token ids, or text/JSONL ({'text': ...}) with --tokenizer")
    g.add_argument("--tokenizer", default=None, help="tokenizer file or directory (for text data)")
    g.add_argument("--mock-data", action="store_true", help="seeded random tokens (benchmarks, tests)")
    g.add_argument("--exit-after-iters", type=int, default=None, help="stop (and save) after this many iterations")
    g.add_argument("--metrics-file", default=None, help="append per-iteration JSON lines (loss, lr, grad norm)")
    return p


def load_tokens(args) -> np.ndarray:
    if args.mock_data:
        from megatron_zero.models.llama_config import load_model_config

        vocab = load_model_config(args.model).vocab_size
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


def main(argv: Optional[Sequence[str]] = None) -> list:
    parser = build_parser()
    args = arguments.parse(parser, argv)
    from megatron_zero.training.loop import install_exit_signals

    install_exit_signals()  # a preemption signal during set-up is honoured after the first step
    if args.model is None:
        parser.error("--model is required (a preset name or model_config.json)")
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

    cfg = load_model_config(args.model)
    opts = RuntimeOptions.from_args(args)
    try:
        from megatron_zero.models.llama import validate

        validate(cfg, opts)
    except ModelConfigError as e:
        parser.error(str(e))
    tokens = load_tokens(args)
    if len(tokens) and (int(tokens.max()) >= cfg.vocab_size or int(tokens.min()) < 0):
        raise SystemExit(f"error: --data-path {args.data_path}: token ids span {int(tokens.min())}..{int(tokens.max())} "
                         f"but the model's vocabulary is 0..{cfg.vocab_size - 1}: tokenize with the model's tokenizer")
    dp = initialize_from_args(args)
    print_rank0(f"megatron_zero pretrain_lm: {platform.summary()} | TP={opts.tensor_model_parallel_size} "
                f"PP={opts.pipeline_model_parallel_size} DP={dp} | model {cfg.name} ({cfg.num_parameters():,} params)")
    gbs = args.global_batch_size or args.micro_batch_size * dp
    if gbs % (args.micro_batch_size * dp):
        parser.error(f"--global-batch-size {gbs} is not divisible by --micro-batch-size x DP = {args.micro_batch_size * dp}")

    chunks, optimizer, scheduler, start = setup_optimization(args, build_llama_chunks(cfg, opts), cfg.to_dict())
    data = TokenWindows(tokens, args.seq_length, seed=args.seed)
    dp_rank = ps.get_data_parallel_rank()
    padded = padded_vocab_size(cfg.vocab_size, opts.tensor_model_parallel_size)
    loop_cfg = LoopConfig.from_args(args, dp, gbs, decoder_flops_per_step(cfg, gbs, args.seq_length, padded))
    loop_cfg.model_config = cfg.to_dict()
    if args.save and ps.get_data_parallel_rank() == 0 and ps.get_tensor_model_parallel_rank() == 0 \
            and ps.get_pipeline_model_parallel_rank() == 0:
        os.makedirs(args.save, exist_ok=True)
        cfg.save(os.path.join(args.save, "model_config.json"))
    losses = train(
        loop_cfg, chunks, optimizer, scheduler, lm_forward_step,
        lambda it: data.iteration_microbatches(it, gbs, args.micro_batch_size, dp_rank, dp),
        start_iteration=start,
    )
    return losses


if __name__ == "__main__":
    from megatron_zero.errors import run_main

    run_main(main)
