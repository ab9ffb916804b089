"""Throughput / MFU benchmark of decoder training steps (``tools/benchmark.py``): target vs surrogate, and the
projected VLM training cost in the form of the paper's Table 9.

For each configuration :func:`run_config` times, on the library's Trainer
(:meth:`~megatron_zero.training.trainer.Trainer.forward` and ``step(time_phases=True)``), forward (a forward-only
pass of the global batch), forward+backward and the optimizer step (backward = forward+backward - forward), and
reports tokens/s per device, achieved TFLOP/s per device and MFU in Megatron-LM's FLOPs convention
(:mod:`megatron_zero.training.flops`), and peak memory (and the training state it holds: weights, gradients,
optimizer state). Configurations (:func:`benchmark_configs`): ``target/full`` (stage 3), ``target/frozen`` (the
baseline's pre-training stage: decoder frozen, gradients flow through it), and for a surrogate T(a, b)
(:func:`megatron_zero.surrogate.surrogate_config`) ``surrogate/translator`` (stage 1) and ``surrogate/frozen``
(stage 2). Frozen layers do no weight-gradient GEMMs: their FLOPs count 2x forward instead of 3x.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Optional

from megatron_zero.errors import UserError


def parse_span(span: str) -> tuple[int, int]:
    """``"a,b"`` -> ``(a, b)``."""
    try:
        a, b = (int(x) for x in span.split(","))
    except ValueError:
        raise ValueError(f"expected two layer indices 'a,b' (e.g. 40,78), got {span!r}") from None
    return a, b


def benchmark_configs(cfg, span: Optional[str] = None, lora: Optional[dict] = None) -> list[tuple]:
    """``(config, mode, translator layer)`` to time: the target full/frozen (and ``lora``: LoRA adapters on the
    frozen target, ``LoraConfig.to_dict()``), and T(a, b) translator/frozen."""
    import dataclasses

    from megatron_zero.surrogate import surrogate_config

    configs = [(cfg, "full", None), (cfg, "frozen", None)]
    if lora:
        configs.append((dataclasses.replace(cfg, lora=lora), "lora", None))
    if span:
        a, b = parse_span(span)
        scfg = surrogate_config(cfg, a, b)
        configs += [(scfg, "translator", scfg.surrogate["translator_index"]), (scfg, "frozen", None)]
    return configs


def freeze(model, mode: str, translator: int | None):
    """mode: full | frozen (embedding only) | translator (embedding + one decoder layer) | lora (the adapters
    only, as built)."""
    if mode == "lora":
        return
    from megatron_zero.parallel.sharding import layer_index_map

    gmap = layer_index_map(model)
    for name, p in model.named_parameters():
        train = mode == "full" or "embedding" in name
        if mode == "translator" and name.startswith("decoder.layers."):
            train = gmap[int(name.split(".")[2])] == translator
        p.requires_grad_(train)


def model_state_bytes(chunks, optimizer) -> int:
    """Bytes this rank holds in training state: weights, gradient buffers and optimizer state (fp32 main copies,
    Adam moments), each storage counted once. Measured from the live tensors, so it separates LoRA from full
    fine-tuning on CPU too, where the process's peak RSS only grows across configurations."""
    import torch

    seen, total = set(), 0

    def add(t):
        nonlocal total
        if isinstance(t, torch.Tensor) and t.numel():
            st = t.untyped_storage()
            if st.data_ptr() not in seen:
                seen.add(st.data_ptr())
                total += st.nbytes()

    for c in chunks:
        for p in c.parameters():
            add(p)
            add(getattr(p, "main_grad", None))
    for o in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(o, "optimizer", None)
        if inner is None:
            continue
        for group in inner.param_groups:
            for p in group["params"]:
                add(p)
        for state in inner.state.values():
            for v in state.values():
                add(v)
    return total


@dataclasses.dataclass(frozen=True)
class Timing:
    """How a configuration is timed (``tools/benchmark.py``'s flags, defaults resolved)."""

    global_batch_size: int
    micro_batch_size: int
    seq_length: int
    warmup: int
    iters: int
    gpu_type: str  # the datasheet peak MFU is computed against


def run_config(cfg, opts, mode, translator, timing: Timing, dp):
    """Time one configuration with ``timing``. Returns one result row."""
    import torch
    from megatron.core import parallel_state as ps

    from megatron_zero import platform
    from megatron_zero.models.llama import build_llama_chunks
    from megatron_zero.models.llama_config import padded_vocab_size
    from megatron_zero.training.flops import PEAK_TFLOPS, decoder_training_flops, mfu
    from megatron_zero.training.train_step import lm_forward_step
    from megatron_zero_dev.steps import alternating_token_batches, step_trainer

    chunks = build_llama_chunks(cfg, opts)
    for c in chunks:
        freeze(c, mode, translator)
    trainable_params = sum(p.numel() for c in chunks for p in c.parameters() if p.requires_grad)
    trainable_layers = {"full": cfg.num_layers, "frozen": 0, "translator": 1, "lora": 0}[mode]  # (adapter
    # GEMMs are left out of the FLOPs: r << hidden)
    gbs, mbs, seq = timing.global_batch_size, timing.micro_batch_size, timing.seq_length
    tokens = torch.randint(0, cfg.vocab_size, (gbs * (seq + 1) * 2,))
    trainer = step_trainer(chunks, lm_forward_step, alternating_token_batches(tokens, seq, gbs, mbs,
                                                                              ps.get_data_parallel_rank(), dp),
                           steps=timing.warmup + timing.iters, seq_length=seq, global_batch_size=gbs,
                           micro_batch_size=mbs, lr=1e-5, bf16=opts.bf16, distributed_optimizer=True)

    def sync():
        if platform.HAVE_CUDA:
            torch.cuda.synchronize()

    fwd, fb, optim = [], [], []
    if platform.HAVE_CUDA:
        torch.cuda.reset_peak_memory_stats()
    for i in range(timing.warmup + timing.iters):
        sync(); t0 = time.perf_counter()
        trainer.forward(i)
        sync(); t1 = time.perf_counter()
        r = trainer.step(i, time_phases=True)
        if i >= timing.warmup:
            fwd.append(t1 - t0); fb.append(r.forward_backward_s); optim.append(r.optimizer_s)
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    t_fwd, t_fb, t_opt = med(fwd), med(fb), med(optim)
    step = t_fb + t_opt
    world = torch.distributed.get_world_size()
    flops = decoder_training_flops(cfg, gbs, seq, trainable_layers,
                                   padded_vocab_size(cfg.vocab_size, opts.tensor_model_parallel_size))
    peak = PEAK_TFLOPS.get(timing.gpu_type) if platform.HAVE_CUDA else None
    tflops, util = mfu(flops, step, world, peak or float("inf"))
    if platform.HAVE_CUDA:
        mem = torch.cuda.max_memory_allocated() / 2**30
    else:
        import resource

        mem = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {
        "model": cfg.name, "mode": mode, "layers": cfg.num_layers, "forward_ms": 1e3 * t_fwd,
        "backward_ms": 1e3 * (t_fb - t_fwd), "optimizer_ms": 1e3 * t_opt, "step_s": step,
        "warning": None if t_fb > t_fwd else (
            f"forward+backward ({1e3 * t_fb:.1f} ms) measured no slower than forward alone ({1e3 * t_fwd:.1f} ms): "
            f"timing noise dominates, the backward time is meaningless; use more --iters"),
        "tokens_per_s_per_device": gbs * seq / step / world, "tflops_per_device": tflops,
        "mfu": util if peak else None, "peak_memory_gb": mem,
        "model_state_gb": model_state_bytes(trainer.chunks, trainer.optimizer) / 2**30, "global_batch": gbs,
        "seq_length": seq, "trainable_params_this_rank": trainable_params,
    }


MIN_TIMED_ITERS = 3  # a median of fewer timed iterations is one noisy sample


class BenchmarkArgumentError(UserError, ValueError):
    """Benchmark settings that cannot give meaningful numbers."""


def check_iterations(iters: int, warmup: int) -> None:
    if iters < MIN_TIMED_ITERS:
        raise BenchmarkArgumentError(f"--iters {iters}: need at least {MIN_TIMED_ITERS} timed iterations per "
                                     f"configuration (the median of fewer is one noisy sample)")
    if warmup < 0:
        raise BenchmarkArgumentError(f"--warmup {warmup}: must be >= 0")


def projected_table(results, samples, num_gpus, world, gbs):
    """Table 9 form: hours per stage for the baseline and the surrogate approach, from measured step times."""
    s1, s2, s3_full, s3_ours = samples
    scale = world / num_gpus  # measured on `world` devices; assume perfect scaling to num_gpus

    def hours(res, n):
        return res["step_s"] * (n / gbs) * scale / 3600 if res else float("nan")

    target = [r for r in results if "-T(" not in r["model"]]
    t_full = next((r for r in target if r["mode"] == "full"), None)
    t_frozen = next((r for r in target if r["mode"] == "frozen"), None)
    s_tr = next((r for r in results if "-T(" in r["model"] and r["mode"] == "translator"), None)
    s_fr = next((r for r in results if "-T(" in r["model"] and r["mode"] == "frozen"), None)
    base = (hours(t_frozen, s3_full), 0.0, hours(t_full, s3_full))
    ours = (hours(s_tr, s1), hours(s_fr, s2), hours(t_full, s3_ours))
    lines = [f"Projected training hours on {num_gpus} devices (measured step times x steps; Table 9 form)",
             f"{'method':10s} {'# gpu':>6s} {'pre.':>10s} {'ft. enc.':>10s} {'ft. dec.':>10s} {'total hours':>12s}"]
    for name, row in (("baseline", base), ("ours", ours)):
        lines.append(f"{name:10s} {num_gpus:6d} " + " ".join(f"{h:10.4g}" for h in row) + f" {sum(row):12.4g}")
    if sum(base) == sum(base) and sum(ours) == sum(ours):
        lines.append(f"cost reduction: {100 * (1 - sum(ours) / sum(base)):.1f}%")
    noisy = [f"{r['model']} {r['mode']}" for r in results if r.get("warning")]
    if noisy:
        lines.append(f"warning: timing noise dominates ({', '.join(noisy)}: backward measured <= 0): the projection "
                     f"is not meaningful; rerun with more --iters")
    return "\n".join(lines)
