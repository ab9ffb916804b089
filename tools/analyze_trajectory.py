#!/usr/bin/env python
"""Measure a target LLM's prediction trajectory (paper Sec. 1.1, Eq. 1-4) and find its transition point.

    python tools/analyze_trajectory.py --load-dir Llama-3.2-3B-Instruct --data genqa.jsonl --num-samples 300 \\
        --output-dir outputs/traj-3b
    torchrun --nproc-per-node 8 tools/analyze_trajectory.py --load-dir Llama-3.1-70B-Instruct --data genqa.jsonl \\
        --tensor-model-parallel-size 4 --pipeline-model-parallel-size 2 --dtype bf16 --output-dir outputs/traj-70b

``--load-dir``: an HF Llama directory (each rank reads only its shard of the safetensors), a megatron_zero
``torch_dist`` checkpoint or a VLM checkpoint (its decoder); the format is detected. Launch exactly TP x PP
processes (the analysis uses no data parallelism). ``--tokenizer`` defaults to the checkpoint's tokenizer.

``--data``: JSONL (or a JSON list) of records, either ``{"text": ...}`` (raw text, tokenised with a BOS token
when the tokenizer has one) or a question/response pair -- ``{"prompt","response"}``, ``{"question","answer"}``,
``{"instruction","output"}`` or ``{"messages": [{"role","content"}, ...]}`` -- to which the tokenizer's chat
template is applied. The first ``--num-samples`` records are analysed (sequences cut at ``--max-length``).

``--mode teacher-forced`` feeds the records as they are (the paper's Fig. 3). ``--mode generated`` (A.7) greedily
generates the response to each question (a raw text is continued) and analyses prompt + generated response.

``--metric position-kl`` is Eq. 4 (a KL over *positions*); ``vocab-kl`` the logit-lens KL over the vocabulary.
The transition layer is :func:`megatron_zero.analysis.trajectory.detect_transition` on the median curve (the
first layer from which the median stays at or below ``--transition-fraction`` x its maximum), unless
``--transition-layer`` overrides it. Writes ``trajectory.json`` (per-layer KL per sample, median, transition,
metric definition, model and data provenance) and ``trajectory.png`` (as the paper's Fig. 3).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
import time
from typing import Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PROG = "analyze_trajectory"


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load-dir", required=True, help="HF Llama directory, megatron_zero or VLM checkpoint")
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
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="model weights and activations")
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


# ---------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------
def read_records(path: str, n: int) -> list[dict]:
    """The first ``n`` records of a JSONL file or a JSON list."""
    if not os.path.isfile(path):
        raise SystemExit(f"{PROG}: error: --data {path}: no such file")
    with open(path) as f:
        if path.endswith(".json"):
            try:
                records = json.load(f)
            except json.JSONDecodeError as e:
                raise SystemExit(f"{PROG}: error: --data {path}: invalid JSON ({e})") from None
            if not isinstance(records, list):
                raise SystemExit(f"{PROG}: error: --data {path}: expected a JSON list of records")
        else:
            records = []
            for i, line in enumerate(f, 1):
                if len(records) == n:
                    break
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise SystemExit(f"{PROG}: error: {path}:{i}: invalid JSON ({e.msg})") from None
    if not records:
        raise SystemExit(f"{PROG}: error: --data {path} has no records")
    return records[:n]


def conversation(rec: dict, where: str) -> tuple[Optional[str], list[tuple[str, str]]]:
    """(raw text, or None) and the chat messages ``[(role, content)]`` of one record."""
    if not isinstance(rec, dict):
        raise SystemExit(f"{PROG}: error: {where}: a record must be a JSON object, got {type(rec).__name__}")
    if isinstance(rec.get("text"), str):
        return rec["text"], []
    for q, a in (("prompt", "response"), ("question", "answer"), ("instruction", "output")):
        if q in rec:
            return None, [("user", str(rec[q]))] + ([("assistant", str(rec[a]))] if a in rec else [])
    msgs = rec.get("messages") or rec.get("conversations")
    if isinstance(msgs, list) and all(isinstance(m, dict) for m in msgs):
        roles = {"human": "user", "gpt": "assistant"}
        return None, [(roles.get(m.get("role", m.get("from")), m.get("role", m.get("from"))),
                       m.get("content", m.get("value"))) for m in msgs]
    raise SystemExit(f"{PROG}: error: {where}: a record needs 'text', prompt/response, question/answer, "
                     f"instruction/output or 'messages'; got keys {sorted(rec)}")


@dataclasses.dataclass
class Sample:
    index: int  # record number in --data
    prompt: list[int]  # what generated mode continues
    ids: list[int]  # what teacher-forced mode analyses


def encode_records(records: list[dict], tok, data_path: str) -> list[Sample]:
    """Token ids of each record: raw text (BOS + text), or the chat template applied to the conversation."""
    from megatron_zero.data.chat_template import Message, chat_template_for

    template = None
    samples = []
    for i, rec in enumerate(records):
        text, msgs = conversation(rec, f"--data {data_path} record {i + 1}")
        if text is not None:
            ids = ([tok.bos_id] if tok.bos_id is not None else []) + tok.encode(text)
            samples.append(Sample(i, ids, ids))
            continue
        if template is None:
            try:
                template = chat_template_for(tok)
            except ValueError as e:
                raise SystemExit(f"{PROG}: error: --tokenizer: {e}") from None
        messages = [Message(r, c) for r, c in msgs]
        try:
            full = template.encode(messages).input_ids
            last_answer = max((j for j, m in enumerate(messages) if m.role == "assistant"), default=len(messages))
            prompt = template.encode(messages[:last_answer], add_generation_prompt=True).input_ids
        except (ValueError, KeyError) as e:
            raise SystemExit(f"{PROG}: error: --data {data_path} record {i + 1}: {e}") from None
        samples.append(Sample(i, prompt, full))
    return samples


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------
def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    import torch
    import torch.distributed as dist
    from tqdm import tqdm

    from megatron_zero.analysis.trajectory import (
        METRIC_DEFINITIONS,
        TRANSITION_RULE,
        TrajectoryAnalyzer,
        detect_transition,
        pad_batch,
    )
    from megatron_zero.evaluation.text_model import EvaluationError, ParallelTextModel
    from megatron_zero.parallel.initialize import ParallelConfigError

    records = read_records(args.data, args.num_samples)
    for i, rec in enumerate(records):  # fail on bad data before loading the model
        conversation(rec, f"--data {args.data} record {i + 1}")
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    try:
        lm = ParallelTextModel(args.load_dir, tp, pp, dtype=args.dtype, tokenizer=args.tokenizer)
    except (EvaluationError, ParallelConfigError) as e:
        raise SystemExit(f"{PROG}: error: {e}") from None
    rank0 = dist.get_rank() == 0
    cfg = lm.cfg
    if args.transition_layer is not None and not 0 <= args.transition_layer < cfg.num_layers:
        raise SystemExit(f"{PROG}: error: --transition-layer {args.transition_layer} is outside the model's "
                         f"{cfg.num_layers} layers")
    analyzer = TrajectoryAnalyzer(lm.model, cfg.vocab_size)
    samples = encode_records(records, lm.tokenizer, args.data)
    max_length = min(args.max_length, cfg.max_position_embeddings)
    stop_ids: set[int] = set()
    if args.mode == "generated":
        from megatron_zero.data.chat_template import chat_template_for

        try:
            stop_ids = set(chat_template_for(lm.tokenizer).stop_token_ids)
        except ValueError:
            pass
        if lm.tokenizer.eos_id is not None:
            stop_ids.add(lm.tokenizer.eos_id)

    kept: list[Sample] = []
    rows: list[torch.Tensor] = []
    responses: list[int] = []
    num_tokens: list[int] = []
    bar = tqdm(total=len(samples), desc="trajectory", unit="sample", file=sys.stdout, disable=not rank0)
    for start in range(0, len(samples), args.batch_size):
        batch = samples[start:start + args.batch_size]
        if args.mode == "generated":
            prompts = [s.prompt[:max_length - 1] for s in batch]
            new = lm.generate_greedy(prompts, args.max_new_tokens,
                                     lambda i, out, prompts=prompts: out[-1] in stop_ids
                                     or len(prompts[i]) + len(out) >= max_length)
            seqs = [p + n for p, n in zip(prompts, new)]
        else:
            seqs = [s.ids[:max_length] for s in batch]
            new = [[] for _ in batch]
        usable = [i for i, seq in enumerate(seqs) if len(seq) >= 2]
        if usable:
            tokens, lengths = pad_batch([seqs[i] for i in usable])
            rows.extend(analyzer(tokens, lengths, args.metric))
            num_tokens.extend(lengths)
            kept.extend(batch[i] for i in usable)
            responses.extend(len(new[i]) for i in usable)
        bar.update(len(batch))
    bar.close()
    if not kept:
        raise SystemExit(f"{PROG}: error: no sample of --data {args.data} has 2 or more tokens")
    if not rank0:
        return 0

    kl = torch.stack(rows)
    median = kl.quantile(0.5, dim=0)  # the median (the mean of the middle two for an even count)
    detected = detect_transition(median, args.transition_fraction)
    transition = args.transition_layer if args.transition_layer is not None else detected
    result = {
        "metric": args.metric,
        "metric_definition": METRIC_DEFINITIONS[args.metric],
        "num_layers": cfg.num_layers,
        "median": median.tolist(),
        "detected_transition_layer": detected,
        "transition_layer": transition,
        "transition_override": args.transition_layer is not None,
        "transition_rule": TRANSITION_RULE.format(fraction=args.transition_fraction),
        "per_sample": kl.tolist(),
        "sample_record_index": [s.index for s in kept],
        "sample_num_tokens": num_tokens,
        "model": {"load_dir": os.path.abspath(args.load_dir), "name": cfg.name, "config": cfg.to_dict(),
                  "tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp, "dtype": args.dtype},
        "data": {"path": os.path.abspath(args.data), "sha256": file_sha256(args.data),
                 "tokenizer": os.path.abspath(args.tokenizer or args.load_dir), "mode": args.mode,
                 "num_records": len(samples), "num_samples": len(kept), "max_length": max_length,
                 **({"max_new_tokens": args.max_new_tokens, "generated_tokens": responses}
                    if args.mode == "generated" else {})},
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "trajectory.json"), "w") as f:
        json.dump(result, f, indent=1)
    plot(kl, median, transition, f"{cfg.name} ({args.mode}, {len(kept)} samples)", args.metric,
         os.path.join(args.output_dir, "trajectory.png"))
    print(f"[{PROG}] median {args.metric} per layer: " + " ".join(f"{x:.3g}" for x in median.tolist()))
    print(f"[{PROG}] transition layer {transition} (detected {detected}); wrote "
          f"{os.path.join(args.output_dir, 'trajectory.json')} and trajectory.png")
    return 0


def plot(kl, median, transition: int, title: str, metric: str, path: str) -> None:
    """Fig. 3: every sample's curve thin and transparent, the median bold, the transition marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6, 4))
    layers = range(kl.shape[1])
    for row in kl:
        ax.plot(layers, row.numpy(), color="tab:blue", alpha=min(0.5, 10.0 / len(kl)), lw=0.6)
    ax.plot(layers, median.numpy(), color="navy", lw=2.5, label="median")
    ax.axvline(transition, color="tab:red", ls="--", lw=1.2)
    right_half = transition > (kl.shape[1] - 1) / 2
    ax.annotate(f"transition: layer {transition}", xy=(transition, float(median[transition])),
                xytext=(0.35 if right_half else 0.65, 0.6), textcoords="axes fraction", color="tab:red",
                ha="center", arrowprops={"arrowstyle": "->", "color": "tab:red"})
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("layer")
    ax.set_ylabel("KL(q_l || p)" if metric == "position-kl" else "vocabulary KL to the final prediction")
    ax.set_title(title)
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    from megatron_zero.errors import run_main

    run_main(main)
