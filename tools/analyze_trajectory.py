#!/usr/bin/env python
"""Measure a target LLM's prediction trajectory (paper Sec. 1.1, Eq. 1-4) and find its transition point.

    python tools/analyze_trajectory.py --load-dir Llama-3.2-3B-Instruct --data genqa.jsonl --num-samples 300 \\
        --output-dir outputs/traj-3b

``--data``: JSONL/JSON records, either ``{"text": ...}`` (raw text) or question/response pairs
(``{"prompt","response"}``, ``{"question","answer"}``, ``{"messages": [...]}``) to which the tokenizer's chat
template is applied. ``--mode generated`` (A.7) greedily generates the response from the question first and
analyses prompt + generated response. Writes ``trajectory.json`` (per-layer KL per sample, median, transition
layer, provenance, metric definition) and ``trajectory.png`` (curves per sample, the median, the transition).

Large models: launch with torchrun and ``--tensor-model-parallel-size``/``--pipeline-model-parallel-size``; each rank
loads only its shard, every stage evaluates its own layers and the softmax statistics are reduced over the TP group
(position-KL, teacher-forced).

The transition layer is :func:`megatron_zero.analysis.trajectory.detect_transition` on the median curve (the
first layer from which the median stays at or below 10% of its maximum; ``--transition-fraction``), unless
``--transition-layer`` overrides it.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PROG = "analyze_trajectory"


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load-dir", required=True, help="HF Llama checkpoint or megatron_zero checkpoint")
    p.add_argument("--data", required=True)
    p.add_argument("--tokenizer", default=None, help="default: the checkpoint directory")
    p.add_argument("--num-samples", type=int, default=300)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--metric", choices=["position-kl", "vocab-kl"], default="position-kl")
    p.add_argument("--mode", choices=["teacher-forced", "generated"], default="teacher-forced")
    p.add_argument("--max-new-tokens", type=int, default=128, help="generated mode")
    p.add_argument("--transition-layer", type=int, default=None, help="override the detected transition")
    p.add_argument("--transition-fraction", type=float, default=0.1)
    p.add_argument("--output-dir", required=True)
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    return p.parse_args(argv)


def read_records(path: str, n: int) -> list[dict]:
    if not os.path.exists(path):
        raise SystemExit(f"{PROG}: error: --data {path}: no such file")
    with open(path) as f:
        if path.endswith(".json"):
            records = json.load(f)
        else:
            records = []
            for i, line in enumerate(f, 1):
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise SystemExit(f"{PROG}: error: {path}:{i}: invalid JSON ({e.msg})") from None
    if not records:
        raise SystemExit(f"{PROG}: error: --data {path} has no records")
    return records[:n]


def conversation(rec: dict) -> tuple[Optional[str], list]:
    """(raw text, or None) and chat messages [(role, content)] of one record."""
    if "text" in rec and isinstance(rec["text"], str):
        return rec["text"], []
    for q, a in (("prompt", "response"), ("question", "answer"), ("instruction", "output")):
        if q in rec:
            return None, [("user", rec[q]), ("assistant", rec.get(a, ""))]
    msgs = rec.get("messages") or rec.get("conversations")
    if isinstance(msgs, list):
        return None, [(m.get("role", m.get("from")), m.get("content", m.get("value"))) for m in msgs]
    raise SystemExit(f"{PROG}: error: record without 'text', prompt/response, question/answer or messages: {rec}")


def load_model(load_dir: str, tp: int = 1, pp: int = 1):
    from megatron_zero.checkpointing.sources import resolve_decoder
    from megatron_zero.models.llama import ModelConfigError, RuntimeOptions, build_llama_model, validate

    src = resolve_decoder(load_dir, flag="--load-dir")
    opts = RuntimeOptions(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    try:
        validate(src.cfg, opts)
    except ModelConfigError as e:
        raise SystemExit(f"{PROG}: error: {e}") from None
    model = build_llama_model(src.cfg, opts)
    src.load_into([model])
    return src.cfg, model.eval()


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    parallel = tp * pp > 1
    if parallel and (args.metric != "position-kl" or args.mode != "teacher-forced"):
        raise SystemExit(f"{PROG}: error: with TP/PP > 1 the analysis is --metric position-kl, --mode teacher-forced")
    import torch
    import torch.distributed as dist
    from tqdm import tqdm

    from megatron_zero.analysis.trajectory import (detect_transition, greedy_continue, parallel_trajectory_kl,
                                                   trajectory_kl)
    from megatron_zero.data.chat_template import Message, chat_template_for
    from megatron_zero.data.tokenizers import load_tokenizer
    from megatron_zero.parallel.initialize import initialize_parallel

    from megatron_zero.parallel.initialize import ParallelConfigError

    try:
        initialize_parallel(tp, pp)
    except ParallelConfigError as e:
        raise SystemExit(f"{PROG}: error: {e}") from None
    rank0 = dist.get_rank() == 0
    cfg, model = load_model(args.load_dir, tp, pp)
    tok = load_tokenizer(args.tokenizer or args.load_dir)
    template = None
    records = read_records(args.data, args.num_samples)
    per_sample = []
    for rec in tqdm(records, desc="samples", unit="sample", file=sys.stdout, disable=not rank0):
        text, msgs = conversation(rec)
        if text is not None:
            ids = tok.encode(text)
        else:
            template = template or chat_template_for(tok)
            messages = [Message(r, c) for r, c in msgs]
            if args.mode == "generated":
                prompt = template.encode([m for m in messages if m.role != "assistant"], add_generation_prompt=True)
                ids = prompt.input_ids + greedy_continue(model, prompt.input_ids, cfg.vocab_size,
                                                         args.max_new_tokens, template.stop_token_ids)
            else:
                ids = template.encode(messages).input_ids
        ids = ids[: args.max_length]
        if len(ids) < 2:
            continue
        if parallel:
            kl = parallel_trajectory_kl(model, torch.tensor([ids]), cfg.vocab_size)
            if rank0:
                per_sample.append(kl[0])
        else:
            per_sample.append(trajectory_kl(model, torch.tensor([ids]), cfg.vocab_size, args.metric)[0])
    if not rank0:
        return 0
    if not per_sample:
        raise SystemExit(f"{PROG}: error: no sample of --data has 2 or more tokens")
    kl = torch.stack(per_sample)
    median = kl.median(dim=0).values
    detected = detect_transition(median, args.transition_fraction)
    transition = args.transition_layer if args.transition_layer is not None else detected
    os.makedirs(args.output_dir, exist_ok=True)
    result = {
        "model": {"load_dir": os.path.abspath(args.load_dir), "name": cfg.name, "num_layers": cfg.num_layers},
        "data": {"path": os.path.abspath(args.data), "num_samples": len(per_sample), "mode": args.mode,
                 "max_length": args.max_length},
        "metric": args.metric,
        "metric_definition": ("Eq. 4: KL over positions between q_l and p, the probabilities of the true next "
                              "tokens from norm(X_l) W^T and norm(X_{L-1}) W^T, each normalised over positions and "
                              "clamped at 1e-6" if args.metric == "position-kl" else
                              "logit lens: KL over the vocabulary between layer l's and the final next-token "
                              "distributions, averaged over positions"),
        "per_sample": kl.tolist(), "median": median.tolist(),
        "detected_transition_layer": detected, "transition_layer": transition,
        "transition_rule": f"first layer from which the median stays <= {args.transition_fraction} x its maximum",
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    with open(os.path.join(args.output_dir, "trajectory.json"), "w") as f:
        json.dump(result, f, indent=2)
    plot(kl, median, transition, cfg.name, os.path.join(args.output_dir, "trajectory.png"))
    print(f"[{PROG}] median KL per layer: " + " ".join(f"{x:.3g}" for x in median.tolist()))
    print(f"[{PROG}] transition layer {transition} (detected {detected}); wrote {args.output_dir}/trajectory.json "
          f"and trajectory.png")
    return 0


def plot(kl, median, transition: int, name: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for row in kl:
        ax.plot(row.numpy(), color="tab:blue", alpha=min(0.5, 8.0 / len(kl)), lw=0.8)
    ax.plot(median.numpy(), color="tab:blue", lw=2.5, label="median")
    ax.axvline(transition, color="tab:red", ls="--", label=f"transition (layer {transition})")
    ax.set_xlabel("layer")
    ax.set_ylabel("KL(q_l || p)")
    ax.set_title(f"prediction trajectory: {name}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
