#!/usr/bin/env python
"""Throughput / MFU benchmark: target vs surrogate decoder, and the projected VLM training cost (Table 9 form).

Launch like training (``torchrun --nproc-per-node N tools/benchmark.py --model llama-3.1-70b --surrogate 40,78
--tensor-model-parallel-size 8 ...``); on CPU use the tiny presets. For each configuration it times

* forward (a forward-only pass of the global batch), forward+backward, and the optimizer step
  (backward = forward+backward - forward),
* tokens/s per device, achieved TFLOP/s per device and MFU in Megatron-LM's FLOPs convention
  (GQA-aware projections, SwiGLU, causal attention halved, logits; see megatron_zero/training/flops.py),
* peak device memory (GPU) or peak RSS (CPU).

Configurations: ``target/full`` (every decoder weight trained: stage 3), ``target/frozen`` (decoder frozen,
gradients flow through it to the input side: the baseline's pre-training stage), and with ``--surrogate a,b``
``surrogate/translator`` (stage 1: the translator trains) and ``surrogate/frozen`` (stage 2). Frozen layers do
no weight-gradient GEMMs, so their FLOPs are counted as 2x forward instead of 3x (stated in the output).
The projected table multiplies measured step times by the steps each stage needs (Table A.4 data sizes by
default) and shows where the surrogate saves time.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_zero import arguments  # noqa: E402


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    arguments.add_parallel_args(p)
    arguments.add_model_args(p)
    g = p.add_argument_group("benchmark")
    g.add_argument("--surrogate", default=None, help="translator span a,b of the surrogate T(a,b), e.g. 40,78")
    g.add_argument("--seq-length", type=int, default=None, help="default: 2048 on GPU, 128 on CPU")
    g.add_argument("--micro-batch-size", type=int, default=1)
    g.add_argument("--global-batch-size", type=int, default=None, help="default: micro batch x DP x 2")
    g.add_argument("--iters", type=int, default=5, help="timed iterations per configuration")
    g.add_argument("--warmup", type=int, default=2)
    g.add_argument("--gpu-type", default=os.environ.get("MEGATRON_ZERO_GPU_TYPE", "H100"),
                   help="for MFU: H100, H200, A100, B200")
    g.add_argument("--num-gpus-projection", type=int, default=128, help="GPUs assumed in the projected cost table")
    g.add_argument("--samples", default="1165000,665000,665000,133000",
                   help="samples of: surrogate stage 1, surrogate stage 2, baseline stage 3 (full data), ours stage 3 "
                        "(20%% of the data); baseline pre-training uses the stage-3 data size")
    g.add_argument("--output-json", default=None)
    return p


def surrogate_config(cfg, span: str):
    a, b = (int(x) for x in span.split(","))
    if not 0 < a < b < cfg.num_layers:
        raise SystemExit(f"error: --surrogate {span}: need 0 < a < b < {cfg.num_layers}")
    return dataclasses.replace(cfg, num_layers=cfg.num_layers - (b - a), name=f"{cfg.name}-T({a},{b})"), a


def freeze(model, mode: str, translator: int | None):
    """mode: full | frozen (embedding only) | translator (embedding + one decoder layer)."""
    from megatron_zero.parallel.sharding import layer_index_map

    gmap = layer_index_map(model)
    for name, p in model.named_parameters():
        train = mode == "full" or "embedding" in name
        if mode == "translator" and name.startswith("decoder.layers."):
            train = gmap[int(name.split(".")[2])] == translator
        p.requires_grad_(train)


def run_config(cfg, opts, mode, translator, args, dp):
    import torch
    from megatron.core import parallel_state as ps

    from megatron_zero import platform
    from megatron_zero.data.token_windows import TokenWindows
    from megatron_zero.models.llama import build_llama_chunks
    from megatron_zero.models.llama_config import padded_vocab_size
    from megatron_zero.training.flops import PEAK_TFLOPS, decoder_flops_per_step, mfu
    from megatron_zero.training.optimizer import OptimizerOptions, build_optimizer, wrap_ddp
    from megatron_zero.training.train_step import lm_forward_step, train_step

    chunks = build_llama_chunks(cfg, opts)
    for c in chunks:
        freeze(c, mode, translator)
    trainable_layers = {"full": cfg.num_layers, "frozen": 0, "translator": 1}[mode]
    oo = OptimizerOptions(lr=1e-5, bf16=opts.bf16, use_distributed_optimizer=True)
    chunks = wrap_ddp(chunks, oo)
    opt = build_optimizer(chunks, oo)
    gbs, mbs, seq = args.global_batch_size, args.micro_batch_size, args.seq_length
    nmb = gbs // (mbs * dp)
    data = TokenWindows(torch.randint(0, cfg.vocab_size, (gbs * (seq + 1) * 2,)).numpy(), seq)
    rank = ps.get_data_parallel_rank()

    def it(i):
        return data.iteration_microbatches(i % 2, gbs, mbs, rank, dp)

    def sync():
        if platform.HAVE_CUDA:
            torch.cuda.synchronize()

    fwd, fb, optim = [], [], []
    if platform.HAVE_CUDA:
        torch.cuda.reset_peak_memory_stats()
    for i in range(args.warmup + args.iters):
        sync(); t0 = time.perf_counter()
        train_step(lm_forward_step, it(i), chunks, opt, nmb, seq, mbs, forward_only=True)
        sync(); t1 = time.perf_counter()
        from megatron.core.pipeline_parallel import get_forward_backward_func

        for c in chunks:
            c.zero_grad_buffer()
        opt.zero_grad()
        get_forward_backward_func()(forward_step_func=lm_forward_step, data_iterator=it(i), model=chunks,
                                    num_microbatches=nmb, seq_length=seq, micro_batch_size=mbs)
        sync(); t2 = time.perf_counter()
        opt.step()
        sync(); t3 = time.perf_counter()
        if i >= args.warmup:
            fwd.append(t1 - t0); fb.append(t2 - t1); optim.append(t3 - t2)
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    t_fwd, t_fb, t_opt = med(fwd), med(fb), med(optim)
    step = t_fb + t_opt
    world = torch.distributed.get_world_size()
    full_flops = decoder_flops_per_step(cfg, gbs, seq, padded_vocab_size(cfg.vocab_size, opts.tensor_model_parallel_size))
    # frozen layers: forward + input-gradient GEMMs only (2x instead of 3x forward)
    frozen_frac = 1 - trainable_layers / cfg.num_layers
    flops = full_flops * (1 - frozen_frac / 3)
    peak = PEAK_TFLOPS.get(args.gpu_type) if platform.HAVE_CUDA else None
    tflops, util = mfu(flops, step, world, peak or float("inf"))
    if platform.HAVE_CUDA:
        mem = torch.cuda.max_memory_allocated() / 2**30
    else:
        import resource

        mem = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {
        "model": cfg.name, "mode": mode, "layers": cfg.num_layers, "forward_ms": 1e3 * t_fwd,
        "backward_ms": 1e3 * max(t_fb - t_fwd, 0.0), "optimizer_ms": 1e3 * t_opt, "step_s": step,
        "tokens_per_s_per_device": gbs * seq / step / world, "tflops_per_device": tflops,
        "mfu": util if peak else None, "peak_memory_gb": mem, "global_batch": gbs, "seq_length": seq,
    }


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
    return "\n".join(lines)


def main(argv=None):
    args = arguments.parse(build_parser(), argv)
    from megatron_zero import platform
    from megatron_zero.models.llama import ModelConfigError, RuntimeOptions, validate
    from megatron_zero.models.llama_config import load_model_config
    from megatron_zero.parallel.initialize import initialize_from_args, print_rank0

    if args.model is None:
        raise SystemExit("error: --model is required (a preset such as tiny or llama-3.1-70b)")
    if args.seq_length is None:
        args.seq_length = 2048 if platform.HAVE_CUDA else 128
    cfg = load_model_config(args.model)
    opts = RuntimeOptions.from_args(args)
    configs = [(cfg, "full", None), (cfg, "frozen", None)]
    if args.surrogate:
        scfg, a = surrogate_config(cfg, args.surrogate)
        configs += [(scfg, "translator", a), (scfg, "frozen", None)]
    for c, _, _ in configs:
        try:
            validate(c, opts)
        except ModelConfigError as e:
            raise SystemExit(f"error: {c.name}: {e}")
    dp = initialize_from_args(args)
    if args.global_batch_size is None:
        args.global_batch_size = args.micro_batch_size * dp * 2
    print_rank0(f"benchmark: {platform.summary()} | TP={opts.tensor_model_parallel_size} "
                f"PP={opts.pipeline_model_parallel_size} DP={dp} | seq {args.seq_length} | "
                f"global batch {args.global_batch_size} | FLOPs: Megatron-LM convention (GQA, SwiGLU, causal/2, "
                f"logits); frozen layers counted at 2x forward")
    results = []
    for c, mode, translator in configs:
        r = run_config(c, opts, mode, translator, args, dp)
        results.append(r)
        mfu_s = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a (no GPU peak)"
        print_rank0(f"{r['model']:28s} {mode:10s} fwd {r['forward_ms']:9.1f} ms  bwd {r['backward_ms']:9.1f} ms  "
                    f"opt {r['optimizer_ms']:8.1f} ms  {r['tokens_per_s_per_device']:10.1f} tok/s/dev  "
                    f"{r['tflops_per_device']:8.4g} TFLOP/s/dev  MFU {mfu_s}  peak mem {r['peak_memory_gb']:.2f} GB")
    import torch.distributed as dist

    if args.surrogate:
        samples = [int(x) for x in args.samples.split(",")]
        print_rank0(projected_table(results, samples, args.num_gpus_projection, dist.get_world_size(),
                                    args.global_batch_size))
    if args.output_json and dist.get_rank() == 0:
        with open(args.output_json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    from megatron_zero.errors import run_main

    run_main(main)
