#!/usr/bin/env python
"""Measure a target LLM's prediction trajectory (paper Sec. 1.1, Eq. 1-4) and find its transition point.

    python tools/analyze_trajectory.py --pretrained-checkpoint Llama-3.2-3B-Instruct --data genqa.jsonl \\
        --num-samples 300 --output-dir outputs/traj-3b
    torchrun --nproc-per-node 8 tools/analyze_trajectory.py --pretrained-checkpoint Llama-3.1-70B-Instruct \\
        --data genqa.jsonl --tensor-model-parallel-size 4 --pipeline-model-parallel-size 2 --bf16 \\
        --output-dir outputs/traj-70b

``--pretrained-checkpoint``: an HF Llama directory (each rank reads only its shard of the safetensors), a
megatron_zero ``torch_dist`` checkpoint or a VLM checkpoint (its decoder); the format is detected. Launch exactly
TP x PP processes (the analysis uses no data parallelism). ``--tokenizer`` defaults to the checkpoint's tokenizer.

``--data``: JSONL (or a JSON list) of records, either ``{"text": ...}`` (raw text, tokenised with a BOS token
when the tokenizer has one) or a question/response pair -- ``{"prompt","response"}``, ``{"question","answer"}``,
``{"instruction","output"}`` or ``{"messages": [{"role","content"}, ...]}`` -- to which the tokenizer's chat
template is applied. The first ``--num-samples`` records are analysed (sequences cut at ``--max-length``).

``--mode teacher-forced`` feeds the records as they are (the paper's Fig. 3). ``--mode generated`` (A.7) greedily
generates the response to each question (a raw text is continued) and analyses prompt + generated response.

``--metric position-kl`` is Eq. 4 (a KL over *positions*); ``vocab-kl`` the logit-lens KL over the vocabulary.
The transition layer is :func:`megatron_zero.analysis.trajectory.detect_transition` on the median curve (the
layer nearest to where the median falls to ``--transition-fraction`` x its maximum for good, so that a layer
sitting on that line cannot flip the answer), unless ``--transition-layer`` overrides it. Writes
``trajectory.json`` (per-layer KL per sample, median, transition and crossing, metric definition, model and data
provenance) and ``trajectory.png`` (as the paper's Fig. 3). The logic is
:mod:`megatron_zero.analysis.run` and :mod:`megatron_zero.analysis.trajectory`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PROG = "analyze_trajectory"


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    from megatron_zero import arguments

    p = arguments.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    arguments.add_pretrained_checkpoint_arg(p, required=True, old=["--load-dir"],
                                            help="HF Llama directory, megatron_zero or VLM checkpoint")
    p.add_argument("--data", required=True, help="JSONL/JSON records: {'text'} or question/response pairs")
    p.add_argument("--tokenizer", default=None, help="tokenizer file or directory (default: the checkpoint's)")
    p.add_argument("--num-samples", type=int, default=300)
    p.add_argument("--max-length", type=int, default=512, help="tokens per sequence (longer ones are cut)")
    p.add_argument("--metric", choices=["position-kl", "vocab-kl"], default="position-kl")
    p.add_argument("--mode", choices=["teacher-forced", "generated"], default="teacher-forced")
    p.add_argument("--max-new-tokens", type=int, default=256, help="--mode generated: response length limit")
    p.add_argument("--batch-size", type=int, default=8, help="samples per forward pass (right-padded)")
    p.add_argument("--transition-layer", type=int, default=None, help="override the detected transition layer")
    p.add_argument("--transition-fraction", type=float, default=0.1)
    p.add_argument("--output-dir", required=True)
    arguments.add_precision_args(p)
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    args = p.parse_args(argv)
    for flag in ("num_samples", "max_length", "batch_size", "max_new_tokens"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1")
    if args.max_length < 2:
        p.error("--max-length must be >= 2 (the metric compares next-token predictions)")
    if not 0 < args.transition_fraction < 1:
        p.error("--transition-fraction must lie in (0, 1)")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    import torch
    import torch.distributed as dist

    from megatron_zero.analysis.run import (TrajectoryInputError, TrajectorySettings, analyze, conversation,
                                            encode_records, plot, read_records, trajectory_record)
    from megatron_zero.analysis.trajectory import detect_transition, transition_crossing
    from megatron_zero.evaluation.text_model import ParallelTextModel

    records = read_records(args.data, args.num_samples)
    for i, rec in enumerate(records):  # fail on bad data before loading the model
        conversation(rec, f"--data {args.data} record {i + 1}")
    lm = ParallelTextModel(args.pretrained_checkpoint, args.tensor_model_parallel_size,
                           args.pipeline_model_parallel_size, dtype="bf16" if args.bf16 else "fp32",
                           tokenizer=args.tokenizer)
    cfg = lm.cfg
    if args.transition_layer is not None and not 0 <= args.transition_layer < cfg.num_layers:
        raise TrajectoryInputError(f"--transition-layer {args.transition_layer} is outside the model's "
                                   f"{cfg.num_layers} layers")
    samples = encode_records(records, lm.tokenizer, args.data, lm.cfg.family)
    rank0 = dist.get_rank() == 0
    max_length = min(args.max_length, cfg.max_position_embeddings)
    rows, kept, responses, num_tokens = analyze(lm, samples, args.metric, args.mode, args.batch_size, max_length,
                                                args.max_new_tokens, progress=rank0)
    if not kept:
        raise TrajectoryInputError(f"no sample of --data {args.data} has 2 or more tokens")
    if not rank0:
        return 0
    kl = torch.stack(rows)
    median = kl.quantile(0.5, dim=0)  # the median (the mean of the middle two for an even count)
    detected = detect_transition(median, args.transition_fraction)
    crossing = transition_crossing(median, args.transition_fraction)
    transition = args.transition_layer if args.transition_layer is not None else detected
    settings = TrajectorySettings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrajectorySettings)})
    result = trajectory_record(settings, cfg, kl, median, detected, crossing, transition, kept, num_tokens,
                               responses, len(samples), max_length)
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "trajectory.json"), "w") as f:
        json.dump(result, f, indent=1)
    plot(kl, median, transition, f"{cfg.name} ({args.mode}, {len(kept)} samples)", args.metric,
         os.path.join(args.output_dir, "trajectory.png"))
    print(f"[{PROG}] median {args.metric} per layer: " + " ".join(f"{x:.3g}" for x in median.tolist()))
    print(f"[{PROG}] transition layer {transition} (detected {detected}: the median falls to "
          f"{args.transition_fraction:g} x its maximum at {crossing:.2f}); wrote "
          f"{os.path.join(args.output_dir, 'trajectory.json')} and trajectory.png")
    return 0


if __name__ == "__main__":
    from megatron_zero.errors import run_main

    run_main(main)
