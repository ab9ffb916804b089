"""Padded vs packed VLM training throughput on a LLaVA-1.5-shaped length mix (``tools/benchmark_packing.py``).

The length mix (:func:`llava_length_mix`) imitates LLaVA-1.5's 665k instruction mix at ``--seq-length 4096``
with 579 image positions per image (the paper's convention), every length then divided by ``--scale`` (16 on CPU:
rows of 256 positions, 36 image positions) so that a CPU step keeps the 4096 setting's proportions. Per sample,
drawn with a seeded numpy generator:

========================  =====  ======  ======================================================================
kind                      share  images  turns and lengths (tokens at scale 1; user turn ~ N(14, 4) + 5 header)
========================  =====  ======  ======================================================================
VQA / OCR short answers   35%    1       2-12 turns, answers of 1-6 tokens (VQAv2, GQA, OCR-VQA, TextCaps)
detailed / reasoning      25%    1       1 turn, answer log-normal, median 160 (LLaVA detail, reasoning)
conversation              25%    1       2-6 turns, answers log-normal, median 60 (LLaVA conversation)
region / grounding         9%    1       3-8 turns, answers of 5-15 tokens (RefCOCO, VG)
text only                  6%    0       1-4 turns, answers log-normal, median 250, long tail (ShareGPT)
========================  =====  ======  ======================================================================

plus a 24-token system/BOS prefix. Samples longer than ``--seq-length`` are truncated (as the data pipeline does).

The benchmark trains a small Llama decoder on these samples through the real data path
(:class:`~megatron_zero.training.vlm_batches.VLMBatches`: padded one sample per row, or packed into THD rows) and
the real step (:meth:`~megatron_zero.training.trainer.Trainer.step`: megatron schedule, AdamW). Image positions
enter the decoder as placeholder-token embeddings (the decoder's cost does not depend on what fills a position).
Padded and packed steps alternate on the same global batches, so machine load affects both alike.
"""
from __future__ import annotations

import dataclasses
import time
from functools import partial
from typing import Optional

import numpy as np
import torch

from megatron_zero.data.datasets import Sample

IMAGE_TOKEN_ID = 5
KINDS = ("vqa", "detail", "conversation", "region", "text")
SHARES = (0.35, 0.25, 0.25, 0.09, 0.06)


def _turn_lengths(kind: str, rng: np.random.Generator) -> list[tuple[int, int]]:
    user = lambda: int(max(3, rng.normal(14, 4))) + 5  # noqa: E731  (question + header tokens)
    if kind == "vqa":
        return [(user(), int(rng.integers(1, 7)) + 1) for _ in range(int(rng.integers(2, 13)))]
    if kind == "detail":
        return [(user(), int(rng.lognormal(np.log(160), 0.4)) + 1)]
    if kind == "conversation":
        return [(user(), int(rng.lognormal(np.log(60), 0.6)) + 1) for _ in range(int(rng.integers(2, 7)))]
    if kind == "region":
        return [(user(), int(rng.integers(5, 16)) + 1) for _ in range(int(rng.integers(3, 9)))]
    return [(user() + int(rng.lognormal(np.log(40), 1.0)), int(rng.lognormal(np.log(250), 0.9)) + 1)
            for _ in range(int(rng.integers(1, 5)))]


def llava_length_mix(n: int, seq_length: int = 4096, num_image_tokens: int = 579, scale: int = 1, seed: int = 0,
                     vocab_size: int = 32000) -> list[Sample]:
    """``n`` samples shaped like LLaVA-1.5's mix (see the module docstring), every length divided by ``scale``,
    truncated to ``seq_length`` positions after expanding images to ``num_image_tokens``."""
    rng = np.random.default_rng(seed)
    kinds = rng.choice(len(KINDS), size=n, p=SHARES)
    samples = []
    for k, kind_i in enumerate(kinds):
        kind = KINDS[kind_i]
        images = 0 if kind == "text" else 1
        ids, mask = [], []

        def add(count, loss):
            count = max(1, int(round(count / scale)))
            ids.extend(rng.integers(10, vocab_size, count).tolist())
            mask.extend([loss] * count)

        add(24, False)
        if images:
            ids.append(IMAGE_TOKEN_ID)
            mask.append(False)
        for u, a in _turn_lengths(kind, rng):
            add(u, False)
            add(a, True)
        budget = seq_length - images * (num_image_tokens - 1)
        ids, mask = ids[:budget], mask[:budget]
        samples.append(Sample(np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=bool),
                              [f"image-{k}"] * images, source=kind, id=str(k)))
    return samples


@dataclasses.dataclass
class PackingBenchmarkConfig:
    seq_length: int = 256
    num_image_tokens: int = 36
    scale: int = 16
    global_batch_size: int = 128
    micro_batch_size: int = 1  # rows per micro-batch: the unit rows are rounded up to (as in the SLURM jobs)
    num_samples: int = 4096
    rounds: int = 3  # alternating (padded, packed) pairs timed, after one warm-up pair
    num_layers: int = 2
    hidden_size: int = 128
    ffn_hidden_size: int = 384
    num_attention_heads: int = 4
    num_query_groups: int = 2
    vocab_size: int = 2048
    seed: int = 0


def _forward_step(data_iterator, model):
    from megatron_zero.training.train_step import lm_loss_func
    from megatron_zero.training.vlm_batches import packed_seq_params

    b = next(data_iterator)
    out = model(b["tokens"], b["position_ids"], None, labels=b["labels"], packed_seq_params=packed_seq_params(b))
    return out, partial(lm_loss_func, b["loss_mask"], token_weights=b.get("token_weights"))


def run_packing_benchmark(cfg: PackingBenchmarkConfig, log=print) -> dict:
    """Alternate padded and packed training steps on the same global batches; returns per-mode medians and the
    packed/padded ratio of real tokens/s. Needs initialised parallel state (a world of one)."""
    from megatron_zero.config import DataConfig, RunConfig, TrainingConfig
    from megatron_zero.models.llama import RuntimeOptions, build_llama_model
    from megatron_zero.models.llama_config import LlamaConfig
    from megatron_zero.training.vlm_batches import VLMBatches
    from megatron_zero_dev.steps import AssembledAhead, step_trainer

    samples = llava_length_mix(cfg.num_samples, cfg.seq_length, cfg.num_image_tokens, cfg.scale, cfg.seed,
                               cfg.vocab_size)
    lcfg = LlamaConfig(num_layers=cfg.num_layers, hidden_size=cfg.hidden_size, ffn_hidden_size=cfg.ffn_hidden_size,
                       num_attention_heads=cfg.num_attention_heads, num_query_groups=cfg.num_query_groups,
                       vocab_size=cfg.vocab_size, max_position_embeddings=cfg.seq_length, rope_theta=10000.0,
                       rope_scaling_factor=None, name="packing-bench")
    trainers, batches = {}, {}
    for mode in ("padded", "packed"):
        torch.manual_seed(cfg.seed)
        chunks = [build_llama_model(lcfg, RuntimeOptions())]
        run = RunConfig(training=TrainingConfig(micro_batch_size=cfg.micro_batch_size,
                                                global_batch_size=cfg.global_batch_size, seq_length=cfg.seq_length,
                                                seed=cfg.seed), data=DataConfig(pack_sequences=mode == "packed"))
        batches[mode] = VLMBatches.from_config(
            samples, run, pad_id=0, image_token_id=IMAGE_TOKEN_ID, num_image_embeddings=cfg.num_image_tokens,
            load_image=lambda path: torch.zeros(1))
        batches[mode] = AssembledAhead(batches[mode].iteration)  # assembly is not timed
        trainers[mode] = step_trainer(chunks, _forward_step, batches[mode], steps=cfg.rounds + 1,
                                      seq_length=cfg.seq_length, global_batch_size=cfg.global_batch_size,
                                      micro_batch_size=cfg.micro_batch_size, lr=1e-4)
    rows = {m: [] for m in trainers}
    for r in range(cfg.rounds + 1):
        for mode in ("padded", "packed"):
            batches[mode].prepare(r)
            t0 = time.perf_counter()
            res = trainers[mode].step(r)
            dt = time.perf_counter() - t0
            row = {"round": r, "step_s": dt, "real_tokens": res.real_tokens, "computed_tokens": res.computed_tokens,
                   "micro_batches": res.num_microbatches, "loss": res.loss}
            if r > 0:
                rows[mode].append(row)
            log(f"round {r}{' (warm-up)' if r == 0 else ''} {mode:6s}: {dt:7.2f} s  "
                f"real {res.real_tokens:6d} / computed {res.computed_tokens:6d} positions "
                f"({100 * res.real_tokens / res.computed_tokens:5.1f}%)  {res.real_tokens / dt:9.1f} real tok/s  "
                f"loss {res.loss:.4f}")
    out = {"config": dataclasses.asdict(cfg)}
    for mode, rs in rows.items():
        real = sum(x["real_tokens"] for x in rs)
        computed = sum(x["computed_tokens"] for x in rs)
        rates = sorted(x["real_tokens"] / x["step_s"] for x in rs)
        out[mode] = {"real_token_fraction": real / computed, "real_tokens_per_s": real / sum(x["step_s"] for x in rs),
                     "real_tokens_per_s_min": rates[0], "real_tokens_per_s_max": rates[-1], "steps": rs}
    ratios = [b["real_tokens"] / b["step_s"] / (a["real_tokens"] / a["step_s"])
              for a, b in zip(rows["padded"], rows["packed"])]
    out["speedup_real_tokens_per_s"] = out["packed"]["real_tokens_per_s"] / out["padded"]["real_tokens_per_s"]
    out["speedup_per_round"] = ratios
    out["losses_equal"] = all(abs(a["loss"] - b["loss"]) < 1e-4 * max(1, abs(a["loss"]))
                              for a, b in zip(rows["padded"], rows["packed"]))
    return out


def format_summary(result: dict) -> str:
    p, q = result["padded"], result["packed"]
    ratios = result["speedup_per_round"]
    return "\n".join([
        f"{'layout':8s} {'real-token fraction':>20s} {'real tok/s':>12s} {'(min-max per step)':>22s}",
        f"{'padded':8s} {100 * p['real_token_fraction']:19.1f}% {p['real_tokens_per_s']:12.1f} "
        f"{p['real_tokens_per_s_min']:10.1f}-{p['real_tokens_per_s_max']:<10.1f}",
        f"{'packed':8s} {100 * q['real_token_fraction']:19.1f}% {q['real_tokens_per_s']:12.1f} "
        f"{q['real_tokens_per_s_min']:10.1f}-{q['real_tokens_per_s_max']:<10.1f}",
        f"packed / padded real tokens/s: {result['speedup_real_tokens_per_s']:.2f}x "
        f"(per round {min(ratios):.2f}-{max(ratios):.2f}x); same losses: {result['losses_equal']}",
    ])


def length_mix_summary(samples: list[Sample], num_image_tokens: int, seq_length: int) -> dict:
    """Share of each kind and the padded real-token fraction of the mix (one sample per ``seq_length`` row)."""
    lengths = np.array([s.expanded_length(num_image_tokens) for s in samples])
    kinds = {k: float(np.mean([s.source == k for s in samples])) for k in KINDS}
    return {"kinds": kinds, "mean_length": float(lengths.mean()), "p50": float(np.median(lengths)),
            "p99": float(np.percentile(lengths, 99)), "max": int(lengths.max()),
            "padded_real_fraction": float(lengths.mean() / seq_length)}


def check_goals(result: dict, min_fraction: float = 0.95, min_speedup: float = 2.5) -> Optional[str]:
    """None when the packed layout meets the goals, else the reason."""
    f = result["packed"]["real_token_fraction"]
    s = result["speedup_real_tokens_per_s"]
    if f < min_fraction or s < min_speedup:
        return f"packed real-token fraction {100 * f:.1f}% (goal {100 * min_fraction:.0f}%), speed-up {s:.2f}x " \
               f"(goal {min_speedup}x)"
    return None
