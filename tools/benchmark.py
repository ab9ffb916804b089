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
default) and shows where the surrogate saves time. The logic is :mod:`megatron_zero_dev.benchmark`; the
surrogate is :func:`megatron_zero.surrogate.surrogate_config` (T(a, b) needs ``0 <= a < b < L-1``).

``--project-only`` needs no GPU and runs nothing: it projects each stage's hours from the FLOP model and the paper's
Table A.4 data sizes for ``--num-gpus-projection`` GPUs of ``--gpu-type`` (or ``--peak-tflops``) at an assumed
``--mfu`` or one measured by the GPU check (``--mfu-from gpu_check.json``), beside the paper's Table 9, with the MFU
at which the projection meets the paper's hours and what the surrogate saves
(:mod:`megatron_zero_dev.cost_planner`; defaults: Llama-3.1-70B, T(40,78), 128 A100 as in the paper).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_zero import arguments  # noqa: E402


def build_parser():
    p = arguments.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    arguments.add_parallel_args(p)
    arguments.add_model_args(p)
    g = p.add_argument_group("benchmark")
    g.add_argument("--surrogate", default=None, help="translator span a,b of the surrogate T(a,b), e.g. 40,78")
    g.add_argument("--seq-length", type=int, default=None, help="default: 2048 on GPU, 128 on CPU")
    g.add_argument("--micro-batch-size", type=int, default=1)
    g.add_argument("--global-batch-size", type=int, default=None, help="default: micro batch x DP x 2")
    g.add_argument("--iters", type=int, default=5, help="timed iterations per configuration")
    g.add_argument("--warmup", type=int, default=2)
    g.add_argument("--gpu-type", default=os.environ.get("MEGATRON_ZERO_GPU_TYPE"),
                   help="for MFU: H100, H200, A100, B200 (default: H100 when timing, A100 with --project-only)")
    g.add_argument("--num-gpus-projection", type=int, default=128, help="GPUs assumed in the projected cost table")
    g.add_argument("--samples", default="1165000,665000,665000,133000",
                   help="samples of: surrogate stage 1, surrogate stage 2, baseline stage 3 (full data), ours stage 3 "
                        "(20%% of the data); baseline pre-training uses the stage-3 data size")
    g.add_argument("--lora-rank", type=int, default=None,
                   help="also time LoRA training of the target (adapters only, base frozen) next to full fine-tuning")
    g.add_argument("--lora-targets", default="q,v", help="LoRA targets for --lora-rank (subset of q,k,v,o,gate,up,down)")
    g.add_argument("--output-json", default=None)
    pl = p.add_argument_group("cost planner (--project-only)")
    pl.add_argument("--project-only", action="store_true",
                    help="no timing, no GPU: project each stage's hours from the FLOP model (defaults: --model "
                         "llama-3.1-70b --surrogate 40,78)")
    pl.add_argument("--mfu", type=float, default=0.40, help="assumed model FLOPs utilisation (default 0.40)")
    pl.add_argument("--mfu-from", default=None,
                    help="gpu_check.json of a GPU check: its measured bf16 MFU (against --gpu-type's datasheet peak)")
    pl.add_argument("--peak-tflops", type=float, default=None, help="bf16 dense peak per GPU (default: --gpu-type's)")
    pl.add_argument("--vision", default="clip-vit-l-14-336", help="encoder preset")
    pl.add_argument("--vl-samples", type=int, default=665_000, help="LLaVA-1.5-665K (Table A.4)")
    pl.add_argument("--text-samples", type=int, default=500_000, help="GenQA-500K, ours stage 1 (Table A.4)")
    pl.add_argument("--decoder-data-fraction", type=float, default=0.2,
                    help="data fraction of our decoder fine-tuning (Table 9: 20%%)")
    pl.add_argument("--vl-tokens", type=float, default=850.0, help="mean decoder positions per image sample")
    pl.add_argument("--text-tokens", type=float, default=1180.0, help="mean decoder positions per text sample")
    pl.add_argument("--encoder-trainable-layers", type=int, default=8, help="encoder layers trained (Sec. A.9: 8)")
    return p


def main(argv=None):
    run, args = arguments.parse_tool(build_parser(), argv)
    if args.project_only:
        from megatron_zero_dev.cost_planner import ProjectionRequest, project

        return project(ProjectionRequest(**{f.name: getattr(args, f.name)
                                            for f in dataclasses.fields(ProjectionRequest)}))
    args.gpu_type = args.gpu_type or "H100"
    from megatron_zero import platform
    from megatron_zero.config import ConfigError
    from megatron_zero.models.llama import ModelConfigError, RuntimeOptions, validate
    from megatron_zero.models.llama_config import load_model_config
    from megatron_zero.parallel.initialize import initialize_from_config, print_rank0
    from megatron_zero_dev.benchmark import Timing, benchmark_configs, check_iterations, projected_table, run_config

    check_iterations(args.iters, args.warmup)

    if args.model is None:
        raise ConfigError("--model is required (a preset such as tiny or llama-3.1-70b)")
    if args.seq_length is None:
        args.seq_length = 2048 if platform.HAVE_CUDA else 128
    cfg = load_model_config(args.model)
    opts = RuntimeOptions.from_config(run.parallel, run.model)
    from megatron_zero.models.lora import LoraConfig

    lora = LoraConfig(args.lora_rank, targets=tuple(args.lora_targets.split(","))).to_dict() if args.lora_rank else None
    try:
        configs = benchmark_configs(cfg, args.surrogate, lora)
    except ValueError as e:
        raise ConfigError(f"--surrogate {args.surrogate}: {e}") from None
    for c, _, _ in configs:
        try:
            validate(c, opts)
        except ModelConfigError as e:
            raise ConfigError(f"{c.name}: {e}") from None
    dp = initialize_from_config(run.parallel, args.seed)
    if args.global_batch_size is None:
        args.global_batch_size = args.micro_batch_size * dp * 2
    print_rank0(f"benchmark: {platform.summary()} | TP={opts.tensor_model_parallel_size} "
                f"PP={opts.pipeline_model_parallel_size} DP={dp} | seq {args.seq_length} | "
                f"global batch {args.global_batch_size} | FLOPs: Megatron-LM convention (GQA, SwiGLU, causal/2, "
                f"logits); frozen layers counted at 2x forward")
    timing = Timing(args.global_batch_size, args.micro_batch_size, args.seq_length, args.warmup, args.iters,
                    args.gpu_type)
    results = []
    for c, mode, translator in configs:
        r = run_config(c, opts, mode, translator, timing, dp)
        results.append(r)
        mfu_s = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a (no GPU peak)"
        print_rank0(f"{r['model']:28s} {mode:10s} fwd {r['forward_ms']:9.1f} ms  bwd {r['backward_ms']:9.1f} ms  "
                    f"opt {r['optimizer_ms']:8.1f} ms  {r['tokens_per_s_per_device']:10.1f} tok/s/dev  "
                    f"{r['tflops_per_device']:8.4g} TFLOP/s/dev  MFU {mfu_s}  peak mem {r['peak_memory_gb']:.2f} GB  "
                    f"state {r['model_state_gb']:.3g} GB")
        if r["warning"]:
            print_rank0(f"warning: {r['model']} {mode}: {r['warning']}")
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
