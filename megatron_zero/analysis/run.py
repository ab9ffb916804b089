"""The trajectory analysis as ``tools/analyze_trajectory.py`` runs it: records in, ``trajectory.json`` and the
Fig. 3 plot out (the metric and the transition rule are :mod:`megatron_zero.analysis.trajectory`).

:func:`read_records` / :func:`encode_records` turn ``--data`` (JSONL or a JSON list of ``{"text"}`` records or
question/response pairs) into token ids; :func:`analyze` runs the model (a
:class:`~megatron_zero.evaluation.text_model.ParallelTextModel`, any checkpoint the resolver reads, TP x PP) over
them, teacher-forced or on its own greedy responses; :func:`trajectory_record` builds ``trajectory.json``'s content
and :func:`plot` draws every sample's curve with the median and the transition.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
from typing import Optional

from megatron_zero.errors import UserError


class TrajectoryInputError(UserError, ValueError):
    """Bad ``--data`` records or analysis settings."""


def read_records(path: str, n: int) -> list[dict]:
    """The first ``n`` records of a JSONL file or a JSON list."""
    if not os.path.isfile(path):
        raise TrajectoryInputError(f"--data {path}: no such file")
    with open(path) as f:
        if path.endswith(".json"):
            try:
                records = json.load(f)
            except json.JSONDecodeError as e:
                raise TrajectoryInputError(f"--data {path}: invalid JSON ({e})") from None
            if not isinstance(records, list):
                raise TrajectoryInputError(f"--data {path}: expected a JSON list of records")
        else:
            records = []
            for i, line in enumerate(f, 1):
                if len(records) == n:
                    break
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise TrajectoryInputError(f"{path}:{i}: invalid JSON ({e.msg})") from None
    if not records:
        raise TrajectoryInputError(f"--data {path} has no records")
    return records[:n]


def conversation(rec: dict, where: str) -> tuple[Optional[str], list[tuple[str, str]]]:
    """(raw text, or None) and the chat messages ``[(role, content)]`` of one record."""
    if not isinstance(rec, dict):
        raise TrajectoryInputError(f"{where}: a record must be a JSON object, got {type(rec).__name__}")
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
    raise TrajectoryInputError(f"{where}: a record needs 'text', prompt/response, question/answer, "
                     f"instruction/output or 'messages'; got keys {sorted(rec)}")


@dataclasses.dataclass
class Sample:
    index: int  # record number in --data
    prompt: list[int]  # what generated mode continues
    ids: list[int]  # what teacher-forced mode analyses


def encode_records(records: list[dict], tok, data_path: str, model_family: str | None = None) -> list[Sample]:
    """Token ids of each record: raw text (BOS + text), or the chat template applied to the conversation
    (``model_family``: the decoder's, which tells Qwen2.5's template from Qwen3's)."""
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
                template = chat_template_for(tok, model_family=model_family)
            except ValueError as e:
                raise TrajectoryInputError(f"--tokenizer: {e}") from None
        messages = [Message(r, c) for r, c in msgs]
        try:
            full = template.encode(messages).input_ids
            last_answer = max((j for j, m in enumerate(messages) if m.role == "assistant"), default=len(messages))
            prompt = template.encode(messages[:last_answer], add_generation_prompt=True).input_ids
        except (ValueError, KeyError) as e:
            raise TrajectoryInputError(f"--data {data_path} record {i + 1}: {e}") from None
        samples.append(Sample(i, prompt, full))
    return samples


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def analyze(lm, samples: list[Sample], metric: str, mode: str, batch_size: int, max_length: int,
            max_new_tokens: int, progress: bool = True):
    """Per-sample KL rows (``metric``) of every sample with 2+ tokens; generated mode first greedily answers each
    prompt. Returns ``(rows, kept samples, generated lengths, token counts)``. Collective over the model's world."""
    import torch  # noqa: F401
    from tqdm import tqdm

    from megatron_zero.analysis.trajectory import TrajectoryAnalyzer, pad_batch

    analyzer = TrajectoryAnalyzer(lm.model, lm.cfg.vocab_size)
    stop_ids: set[int] = set()
    if mode == "generated":
        from megatron_zero.data.chat_template import chat_template_for

        try:
            stop_ids = set(chat_template_for(lm.tokenizer, model_family=lm.cfg.family).stop_token_ids)
        except ValueError:
            pass
        if lm.tokenizer.eos_id is not None:
            stop_ids.add(lm.tokenizer.eos_id)
    kept: list[Sample] = []
    rows, responses, num_tokens = [], [], []
    bar = tqdm(total=len(samples), desc="trajectory", unit="sample", file=sys.stdout, disable=not progress)
    for start in range(0, len(samples), batch_size):
        batch = samples[start:start + batch_size]
        if mode == "generated":
            prompts = [s.prompt[:max_length - 1] for s in batch]
            new = lm.generate_greedy(prompts, max_new_tokens,
                                     lambda i, out, prompts=prompts: out[-1] in stop_ids
                                     or len(prompts[i]) + len(out) >= max_length)
            seqs = [p + n for p, n in zip(prompts, new)]
        else:
            seqs = [s.ids[:max_length] for s in batch]
            new = [[] for _ in batch]
        usable = [i for i, seq in enumerate(seqs) if len(seq) >= 2]
        if usable:
            tokens, lengths = pad_batch([seqs[i] for i in usable])
            rows.extend(analyzer(tokens, lengths, metric))
            num_tokens.extend(lengths)
            kept.extend(batch[i] for i in usable)
            responses.extend(len(new[i]) for i in usable)
        bar.update(len(batch))
    bar.close()
    return rows, kept, responses, num_tokens


@dataclasses.dataclass(frozen=True)
class TrajectorySettings:
    """What a trajectory run was told (``tools/analyze_trajectory.py``'s flags), as ``trajectory.json`` records it."""

    pretrained_checkpoint: str
    data: str
    tokenizer: Optional[str]
    metric: str
    mode: str
    transition_fraction: float
    transition_layer: Optional[int] = None  # an override of the detected transition
    max_new_tokens: Optional[int] = None  # --mode generated
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    bf16: bool = False


def trajectory_record(run: TrajectorySettings, cfg, kl, median, detected: int, crossing: float, transition: int,
                      kept, num_tokens, responses, num_records: int, max_length: int) -> dict:
    """The content of ``trajectory.json``."""
    from megatron_zero.analysis.trajectory import METRIC_DEFINITIONS, TRANSITION_RULE

    return {
        "metric": run.metric,
        "metric_definition": METRIC_DEFINITIONS[run.metric],
        "num_layers": cfg.num_layers,
        "median": median.tolist(),
        "detected_transition_layer": detected,
        "transition_crossing": crossing,
        "transition_layer": transition,
        "transition_override": run.transition_layer is not None,
        "transition_rule": TRANSITION_RULE.format(fraction=run.transition_fraction),
        "per_sample": kl.tolist(),
        "sample_record_index": [s.index for s in kept],
        "sample_num_tokens": num_tokens,
        "model": {"load_dir": os.path.abspath(run.pretrained_checkpoint), "name": cfg.name, "config": cfg.to_dict(),
                  "tensor_model_parallel_size": run.tensor_model_parallel_size,
                  "pipeline_model_parallel_size": run.pipeline_model_parallel_size,
                  "dtype": "bf16" if run.bf16 else "fp32"},
        "data": {"path": os.path.abspath(run.data), "sha256": file_sha256(run.data),
                 "tokenizer": os.path.abspath(run.tokenizer or run.pretrained_checkpoint), "mode": run.mode,
                 "num_records": num_records, "num_samples": len(kept), "max_length": max_length,
                 **({"max_new_tokens": run.max_new_tokens, "generated_tokens": responses}
                    if run.mode == "generated" else {})},
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


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
