"""GPU acceptance run (``tools/device_gpu_check.sh`` / ``tools/gpu_check.py`` / ``make gpu-check``): what CPU CI
cannot test, in at most ~8 minutes on one H100/H200, on the local layer spec (Transformer Engine's where it is
installed). Each check is one record in ``gpu_check.json`` and a row of ``gpu_check.md``; both files are rewritten
after every check, so whatever ran is on disk even if the process dies.

Checks, in running order (cheap plumbing first):

``environment``
    Versions (Python, torch, CUDA, cuDNN, NCCL, transformers, triton, megatron-core and where it was imported
    from, nvcc), the GPU, and the third-party modules the checks import.
``matmul_peak``
    bf16 8192^3 matrix products: the TFLOP/s that MFU is measured against in this run (and the datasheet's).
``nccl_step``
    The process group's backend (NCCL on a GPU), an all-reduce on it, and a training step (DDP, distributed
    optimizer) whose gradient reduction goes through it. One GPU: a world of one.
``sdpa_kernel``
    Which of PyTorch's SDPA kernels our attention (:class:`~megatron_zero.models.attention.SDPACoreAttention`)
    actually ran, forward and backward, read from the profiler: flash / cuDNN / efficient, not math.
``cross_entropy_kernel``
    The fused weighted cross-entropy CUDA kernel (``csrc/``, built here with nvcc through torch's
    ``cpp_extension``, in the background from the start of the run) vs ``F.cross_entropy`` at V=128256: values
    and gradients (fp32 logits), then speed and peak memory on bf16 logits against ``log_softmax + gather``.
``throughput_bf16``
    A Llama-3.1-8B-shaped decoder slice (full width, 4 layers, seq 4096, distributed optimizer): tokens/s,
    TFLOP/s, MFU (Megatron FLOP convention, :mod:`megatron_zero.training.flops`).
``vs_transformers``
    The same shape in plain transformers (``LlamaForCausalLM``, bf16, SDPA, ``torch.optim.AdamW``), steps
    alternating with ours: the tokens/s ratio ours/theirs.
``packed_vlm_stage2``
    A packed stage-2 VLM step (CLIP ViT-L/14-336 + adapter + the decoder slice, stage-2 freezing) on the
    LLaVA-1.5-shaped length mix: real tokens/s and the real-token fraction.
``surrogate_vs_target``
    Step time of a surrogate-sized slice (fewer layers) over the target slice's, against their FLOP ratio.
``generation_kv_cache``
    KV-cached greedy generation with the VLM (image + prompt per row): new tokens/s.
``te_vs_local_bf16`` / ``fp8_step`` / ``throughput_fp8`` / ``dali_vs_pillow``
    Transformer Engine and DALI-GPU paths (NVIDIA's container): "not installed here" where they are absent.

Statuses: ``ok``, ``mismatch`` (ran, outside tolerance), ``error`` (an exception: its traceback is in the record),
``crashed`` (the process died during the check: a resumed run records it, with the log's tail), ``not installed
here``, ``not run`` (the time budget was spent). A check's failure never stops the others; a CUDA error that
poisons the process's context ends it with exit status 3 so that the driver resumes in a fresh one. The issue's
GPU goals (MFU, the ratio to transformers, the kernel's speed-up, the surrogate ratio) are reported as measured
in each record's ``goals`` and never fail a check.

``dry_run=True`` runs the same code on CPU at tiny sizes (fp32, the PyTorch loss path for the kernel): plumbing
only, in the test suite. Without a GPU and without ``dry_run`` :func:`main` refuses in one line.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import faulthandler
import functools
import gc
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from megatron_zero import platform

TOL = {
    "logits_rel": 0.05,  # max |logits_te - logits_local| / max |logits_local|
    "loss_rel": 0.01,
    "grad_norm_rel": 0.05,
    "fp8_loss_rel": 0.02,
    "ce_value_abs": 1e-4,  # fp32 logits
    "ce_grad_abs": 1e-6,
    "flop_ratio_rel": 0.25,  # |time ratio / FLOP ratio - 1|: a sanity bound; the goal (10%) is a goal
}
GOALS = {"mfu": 0.45, "vs_transformers": 1.3, "kernel_speedup": 2.0, "surrogate_flop_ratio_rel": 0.10}
NOT_INSTALLED = "not installed here"
EXIT_CUDA_POISONED = 3  # a CUDA error left the context unusable: resume the remaining checks in a fresh process
CHECK_HANG_S = 240  # dump every thread's stack to the log if one check runs longer (a hang leaves a trace)


@dataclasses.dataclass
class Sizes:
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    vocab_size: int
    num_layers: int
    seq_length: int
    surrogate_layers: int
    ce_tokens: int
    ce_vocab: int
    vision: str
    vlm_samples: int
    iters: int
    warmup: int
    matmul_n: int
    peer_rounds: int
    gen_prompts: int
    gen_new_tokens: int


FULL = Sizes(4096, 14336, 32, 8, 128256, 4, 4096, 2, 8192, 128256, "clip-vit-l-14-336", 16, 5, 2, 8192, 4, 8, 64)
DRY = Sizes(64, 128, 4, 2, 512, 2, 64, 1, 64, 1000, "tiny-clip", 8, 1, 1, 128, 1, 2, 4)


class NotInstalled(Exception):
    """A check's software is absent on this machine: the record says "not installed here", not a failure."""


class Context:
    def __init__(self, dry_run: bool):
        self.dry_run = dry_run
        self.sizes = DRY if dry_run else FULL
        self.device = platform.device()
        self.dtype = torch.bfloat16 if not dry_run else torch.float32
        self.peak_tflops: Optional[float] = None  # measured by matmul_peak
        self.target_throughput: Optional[dict] = None  # throughput_bf16's, reused by surrogate_vs_target
        self.kernel_build: Optional[concurrent.futures.Future] = None

    def llama(self, num_layers: Optional[int] = None):
        from megatron_zero.models.llama_config import LlamaConfig

        s = self.sizes
        n = num_layers or s.num_layers
        return LlamaConfig(num_layers=n, hidden_size=s.hidden_size, ffn_hidden_size=s.ffn_hidden_size,
                           num_attention_heads=s.num_attention_heads, num_query_groups=s.num_query_groups,
                           vocab_size=s.vocab_size, max_position_embeddings=max(s.seq_length, 128),
                           rope_theta=500000.0, rope_scaling_factor=8.0, name=f"llama-3.1-8b-shaped-{n}l")

    def vlm(self):
        """The checks' VLM config: the vision preset of these sizes + adapter + the :meth:`llama` slice."""
        from megatron_zero.models.clip_vit import get_vision_preset
        from megatron_zero.models.vlm import VLMConfig
        from megatron_zero_dev.packing_benchmark import IMAGE_TOKEN_ID

        return VLMConfig(self.llama(), get_vision_preset(self.sizes.vision), IMAGE_TOKEN_ID)

    def opts(self, use_te: bool = False, fp8: Optional[str] = None):
        from megatron_zero.models.llama import RuntimeOptions

        return RuntimeOptions(params_dtype=self.dtype, bf16=self.dtype == torch.bfloat16, use_te=use_te, fp8=fp8)

    def sync(self):
        if platform.HAVE_CUDA:
            torch.cuda.synchronize()

    def free(self):
        gc.collect()
        if platform.HAVE_CUDA:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()


def _result(ok: Optional[bool], metrics: dict, note: str = "", goals: Optional[list] = None) -> dict:
    rec = {"ok": ok, "metrics": metrics, "note": note}
    if goals:
        rec["goals"] = goals
    return rec


def _goal(name: str, measured: Optional[float], target: float, higher_is_better: bool = True) -> dict:
    met = None if measured is None else (measured >= target if higher_is_better else measured <= target)
    return {"goal": name, "measured": measured, "target": target, "met": met}


def _require_te():
    if not platform.HAVE_TE:
        raise NotInstalled("Transformer Engine is not installed here (NVIDIA's container has it: Dockerfile)")


def _tokens(ctx: Context, batch: int, seq: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, ctx.sizes.vocab_size, (batch, seq + 1), generator=g).to(ctx.device)


def _forward_loss(model, tokens):
    inp, tgt = tokens[:, :-1], tokens[:, 1:]
    pos = torch.arange(inp.shape[1], device=inp.device).expand_as(inp)
    logits = model(inp, pos, None)
    loss = F.cross_entropy(logits.float().flatten(0, 1), tgt.flatten())
    return logits, loss


def _timed(ctx: Context, fn: Callable[[], object], repeats: int) -> float:
    """Median wall seconds of ``fn`` over ``repeats`` calls (the device synchronised around each)."""
    times = []
    for _ in range(repeats):
        ctx.sync()
        t0 = time.perf_counter()
        fn()
        ctx.sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# --- plumbing -----------------------------------------------------------------------------------------------------

def _version(module: str) -> Optional[str]:
    try:
        m = __import__(module)
    except Exception as e:  # noqa: BLE001  (absent or broken: both are findings)
        return f"not importable ({type(e).__name__}: {e})"
    return str(getattr(m, "__version__", "?"))


def check_environment(ctx: Context) -> dict:
    import megatron.core

    nvcc = shutil.which("nvcc")
    nvcc_version = None
    if nvcc:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
        nvcc_version = out.strip().splitlines()[-1] if out.strip() else None
    metrics = {
        "python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if platform.HAVE_CUDA else None,
        "nccl": ".".join(map(str, torch.cuda.nccl.version())) if platform.HAVE_CUDA else None,
        "megatron_core": megatron.core.__version__, "megatron_core_from": os.path.dirname(megatron.core.__file__),
        "nvcc": nvcc_version, "platform": platform.summary(),
    }
    for module in ("transformers", "triton", "einops", "PIL", "yaml", "tqdm", "transformer_engine", "nvidia.dali"):
        metrics[module] = _version(module)
    if platform.HAVE_CUDA:
        props = torch.cuda.get_device_properties(0)
        metrics.update(gpu=props.name, gpu_memory_gb=round(props.total_memory / 2**30, 1),
                       compute_capability=f"{props.major}.{props.minor}", gpus_visible=torch.cuda.device_count())
    return _result(True, metrics, "what this run ran on")


def check_matmul_peak(ctx: Context) -> dict:
    n = ctx.sizes.matmul_n
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(ctx.device, ctx.dtype)
    b = torch.randn(n, n, generator=g).to(ctx.device, ctx.dtype)
    _timed(ctx, lambda: a @ b, 3)
    dt = _timed(ctx, lambda: a @ b, 10)
    tflops = 2 * n ** 3 / dt / 1e12
    ctx.peak_tflops = tflops
    datasheet = _datasheet_peak()
    metrics = {"n": n, "dtype": str(ctx.dtype).replace("torch.", ""), "tflops": tflops, "datasheet_tflops": datasheet,
               "fraction_of_datasheet": tflops / datasheet if datasheet else None}
    return _result(math.isfinite(tflops) and tflops > 0, metrics,
                   f"{n}^3 products, median of 10 after 3 warm-ups: the peak MFU is measured against")


def _datasheet_peak() -> Optional[float]:
    from megatron_zero.training.flops import PEAK_TFLOPS

    if not platform.HAVE_CUDA:
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def check_nccl(ctx: Context) -> dict:
    import torch.distributed as dist

    from megatron_zero.models.llama import build_llama_chunks

    backend = dist.get_backend()
    world = dist.get_world_size()
    t = torch.full((1 << 20,), float(dist.get_rank() + 1), device=ctx.device)
    dist.all_reduce(t)
    ctx.sync()
    reduced_ok = bool((t == world * (world + 1) / 2).all())
    s = ctx.sizes
    cfg = dataclasses.replace(ctx.llama(2), hidden_size=256, ffn_hidden_size=512, vocab_size=1024, name="nccl-step")
    torch.manual_seed(0)
    trainer = _lm_trainer(ctx, build_llama_chunks(cfg, ctx.opts()), 2, min(s.seq_length, 256),
                          vocab_size=cfg.vocab_size)
    _, losses = _lm_steps(ctx, trainer, 2)
    del trainer
    expected = "nccl" if platform.HAVE_CUDA else "gloo"
    metrics = {"backend": backend, "world_size": world, "all_reduce_ok": reduced_ok,
               "nccl_version": ".".join(map(str, torch.cuda.nccl.version())) if platform.HAVE_CUDA else None,
               "step_losses": losses}
    ok = backend == expected and reduced_ok and all(math.isfinite(x) for x in losses)
    return _result(ok, metrics, f"world of {world}: the collectives run on {backend}; traffic between GPUs is not "
                                f"exercised with one GPU")


_SDPA_BACKENDS = (("cudnn", "cudnn"), ("flash", "flash"), ("efficient", "efficient"), ("math", "math"))


def check_sdpa(ctx: Context) -> dict:
    from torch.profiler import ProfilerActivity, profile

    from megatron_zero.models.llama import build_llama_model

    cfg = ctx.llama(1)
    torch.manual_seed(0)
    model = build_llama_model(cfg, ctx.opts())
    tokens = _tokens(ctx, 1, ctx.sizes.seq_length)
    _, loss = _forward_loss(model, tokens)  # warm-up outside the profile
    loss.backward()
    model.zero_grad(set_to_none=True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        _, loss = _forward_loss(model, tokens)
        loss.backward()
        ctx.sync()
    ops = sorted({e.key for e in prof.key_averages() if e.key.startswith("aten::_scaled_dot_product")
                  or e.key.startswith("aten::_flash_attention") or e.key.startswith("aten::_efficient_attention")
                  or e.key.startswith("aten::_cudnn_attention")})
    found = sorted({name for key, name in _SDPA_BACKENDS for op in ops if key in op})
    del model
    fused = [b for b in found if b != "math"]
    ok = bool(fused) and "math" not in found
    return _result(ok, {"backends": found, "aten_ops": ops, "seq_length": ctx.sizes.seq_length,
                        "gqa": cfg.num_query_groups != cfg.num_attention_heads},
                   "SDPACoreAttention, causal, grouped KV heads, forward + backward" +
                   ("" if ok else ": the math fallback ran (or no fused kernel): attention is unfused"))


# --- the loss kernel ----------------------------------------------------------------------------------------------

def start_kernel_build(ctx: Context) -> None:
    """Build the CUDA loss kernel in a background thread (nvcc runs in subprocesses) while the first checks run."""
    if ctx.dry_run or not platform.HAVE_CUDA:
        return
    from megatron_zero.loss.fused_cross_entropy import load_cuda_extension

    build_dir = os.environ.get("GPU_CHECK_BUILD_DIR") or tempfile.mkdtemp(prefix="megatron_zero_wce_")
    os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 4))
    pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="kernel-build")
    t0 = time.time()

    def build():
        load_cuda_extension(build_dir)
        return time.time() - t0

    ctx.kernel_build = pool.submit(build)
    pool.shutdown(wait=False)


def check_cross_entropy(ctx: Context) -> dict:
    from megatron_zero.loss.fused_cross_entropy import kernel_available, vocab_parallel_weighted_cross_entropy

    n, v = ctx.sizes.ce_tokens, ctx.sizes.ce_vocab
    metrics: dict = {}
    if ctx.kernel_build is not None:
        metrics["build_s"] = ctx.kernel_build.result(timeout=420)  # re-raises a build failure with its log
    impl = "torch" if ctx.dry_run else "kernel"
    if not ctx.dry_run and not kernel_available(ctx.device):
        return _result(False, metrics, "the CUDA kernel was built but registers no CUDA kernels")
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, v, (n,), generator=g).to(ctx.device)
    weights = torch.ones(n, device=ctx.device)

    def fused(x):
        return vocab_parallel_weighted_cross_entropy(x, target, weights, float(n), impl=impl)

    def log_softmax_gather(x):
        return -x.float().log_softmax(-1).gather(-1, target[:, None])[:, 0] / n

    def cross_entropy(x):
        return F.cross_entropy(x.float(), target, reduction="none") / n

    candidates = (("fused", fused), ("log_softmax_gather", log_softmax_gather), ("F.cross_entropy", cross_entropy))
    # 1. correctness on fp32 logits: values and gradients against F.cross_entropy
    logits32 = (torch.randn(n, v, generator=g) * 2).to(ctx.device)
    ref = None
    for name, fn in candidates[::-1]:
        x = logits32.clone().requires_grad_(True)
        loss = fn(x)
        loss.sum().backward()
        if ref is None:
            ref = (loss.detach(), x.grad)
            continue
        metrics[f"{name}_value_abs"] = float((loss.detach() - ref[0]).abs().max())
        metrics[f"{name}_grad_abs"] = float((x.grad - ref[1]).abs().max())
        del x, loss
    del logits32, ref
    # 2. speed and memory on bf16 logits (what the model emits), forward + backward
    logits = (torch.randn(n, v, generator=g) * 2).to(ctx.device, ctx.dtype)
    logits_gb = logits.numel() * logits.element_size() / 2**30
    for name, fn in candidates:
        x = logits.clone().requires_grad_(True)
        step = _fwd_bwd(fn, x)
        step()
        ctx.free()
        base = torch.cuda.memory_allocated() if platform.HAVE_CUDA else 0
        metrics[f"{name}_ms"] = 1e3 * _timed(ctx, step, 5 if not ctx.dry_run else 1)
        if platform.HAVE_CUDA:
            # beyond the logits and their gradient (both unavoidable): temporaries such as an fp32 copy
            metrics[f"{name}_extra_peak_gb"] = (torch.cuda.max_memory_allocated() - base) / 2**30
        del x, step
    metrics.update(tokens=n, vocab=v, logits_gb=logits_gb)
    speedup = metrics["log_softmax_gather_ms"] / metrics["fused_ms"]
    metrics["speedup_vs_log_softmax_gather"] = speedup
    metrics["speedup_vs_cross_entropy"] = metrics["F.cross_entropy_ms"] / metrics["fused_ms"]
    ok = all(metrics[f"{k}_value_abs"] <= TOL["ce_value_abs"] and metrics[f"{k}_grad_abs"] <= TOL["ce_grad_abs"]
             for k in ("fused", "log_softmax_gather"))
    goals = [_goal(">= 2x log_softmax + gather", speedup, GOALS["kernel_speedup"])]
    if platform.HAVE_CUDA:
        # no fp32 copy of the logits: the fused path's temporaries stay below one fp32 logits tensor
        goals.append(_goal("no fp32 copy of the logits (extra GB < fp32 logits GB)",
                           metrics["fused_extra_peak_gb"], 2 * logits_gb, higher_is_better=False))
    return _result(ok, metrics, f"{n} tokens x vocab {v}: values/gradients on fp32 logits vs F.cross_entropy; "
                                f"time and memory on {str(ctx.dtype).replace('torch.', '')} logits, forward + backward"
                   + ("; dry-run: the PyTorch path stands in for the kernel" if ctx.dry_run else ""), goals)


def _fwd_bwd(loss_fn, x: torch.Tensor) -> Callable[[], None]:
    def step():
        x.grad = None
        loss_fn(x).sum().backward()

    return step


# --- training steps -----------------------------------------------------------------------------------------------

def _trainer(ctx: Context, chunks, forward_step, make_iterator, steps: int, seq: int, gbs: int = 1):
    """The library's Trainer over ``chunks`` (its step is what the checks time): distributed optimizer, AdamW at a
    constant lr 1e-5, micro batch 1."""
    from megatron_zero_dev.steps import step_trainer

    return step_trainer(chunks, forward_step, make_iterator, steps=steps, seq_length=seq, global_batch_size=gbs,
                        lr=1e-5, bf16=ctx.dtype == torch.bfloat16, distributed_optimizer=True)


def _lm_trainer(ctx: Context, chunks, steps: int, seq: int, gbs: int = 1, vocab_size: Optional[int] = None):
    """:func:`_trainer` on random tokens (two global batches, alternating)."""
    from megatron_zero.training.train_step import lm_forward_step
    from megatron_zero_dev.steps import alternating_token_batches

    vocab = vocab_size or ctx.sizes.vocab_size
    tokens = torch.randint(0, vocab, (gbs * (seq + 1) * 2,), generator=torch.Generator().manual_seed(1))
    return _trainer(ctx, chunks, lm_forward_step, alternating_token_batches(tokens, seq, gbs), steps, seq, gbs)


def _lm_steps(ctx: Context, trainer, n: int) -> tuple[list[float], list[float]]:
    """``n`` training steps (iterations 0 .. n-1); (step times, losses)."""
    times, losses = [], []
    for i in range(n):
        ctx.sync()
        t0 = time.perf_counter()
        r = trainer.step(i)
        ctx.sync()
        times.append(time.perf_counter() - t0)
        losses.append(r.loss)
    return times, losses


def _throughput(ctx: Context, fp8: Optional[str] = None, num_layers: Optional[int] = None,
                use_te: bool = False) -> dict:
    from megatron_zero.models.llama import build_llama_chunks
    from megatron_zero.models.llama_config import padded_vocab_size
    from megatron_zero.training.flops import decoder_flops_per_step, mfu

    cfg = ctx.llama(num_layers)
    seq = ctx.sizes.seq_length
    torch.manual_seed(0)
    steps = ctx.sizes.warmup + ctx.sizes.iters
    trainer = _lm_trainer(ctx, build_llama_chunks(cfg, ctx.opts(use_te=use_te, fp8=fp8)), steps + 1, seq)
    times, losses = _lm_steps(ctx, trainer, steps)
    profile_top = _profile_top(ctx, functools.partial(trainer.step, steps))  # one more step, off the clock
    step = statistics.median(times[ctx.sizes.warmup:])
    flops = decoder_flops_per_step(cfg, 1, seq, padded_vocab_size(cfg.vocab_size, 1))
    tflops, util = mfu(flops, step, 1, ctx.peak_tflops or float("inf"))
    datasheet = _datasheet_peak()
    peak_mem = torch.cuda.max_memory_allocated() / 2**30 if platform.HAVE_CUDA else None
    del trainer
    ctx.free()
    return {"layers": cfg.num_layers, "seq_length": seq, "step_s": step, "tokens_per_s": seq / step,
            "tflops": tflops, "mfu": util if ctx.peak_tflops else None,
            "mfu_datasheet": tflops / datasheet if datasheet else None, "peak_memory_gb": peak_mem,
            "flops_per_step": flops, "loss": losses[-1], "finite": all(math.isfinite(x) for x in losses),
            "profile_top": profile_top}


def _profile_top(ctx: Context, step: Callable[[], object], top: int = 12) -> list[dict]:
    """Where one step's time goes (the issue asks misses to come with it): the ``top`` operators by self time on
    the GPU (self CPU time without one), with their share of the step's total and their call counts."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if platform.HAVE_CUDA else [])
    with profile(activities=activities) as prof:
        step()
        ctx.sync()
    attr = "self_device_time_total" if platform.HAVE_CUDA else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, attr, 0) > 0]
    total = sum(getattr(e, attr) for e in events) or 1.0
    events.sort(key=lambda e: getattr(e, attr), reverse=True)
    return [{"op": e.key[:90], "ms": round(getattr(e, attr) / 1e3, 3), "share": round(getattr(e, attr) / total, 4),
             "calls": e.count} for e in events[:top]]


def _throughput_note(ctx: Context, m: dict, what: str) -> str:
    note = (f"{what}: Llama-3.1-8B width, {m['layers']} layers, seq {m['seq_length']}, micro batch 1, distributed "
            f"optimizer; MFU against the matmul peak measured in this run")
    return note + ("; dry-run: tiny sizes, fp32" if ctx.dry_run else "")


def check_throughput(ctx: Context) -> dict:
    m = _throughput(ctx)
    ctx.target_throughput = m
    return _result(m["finite"], m, _throughput_note(ctx, m, "local spec, bf16"),
                   [_goal(">= 45% MFU (bf16, local spec)", m["mfu"], GOALS["mfu"])])


def check_throughput_fp8(ctx: Context) -> dict:
    _require_te()
    m = _throughput(ctx, fp8="hybrid", use_te=True)
    return _result(m["finite"], m, _throughput_note(ctx, m, "TE spec, FP8 hybrid"))


class _TransformersStep:
    """One training step of plain transformers: ``LlamaForCausalLM`` (SDPA attention) in ``dtype``, its own loss,
    ``torch.optim.AdamW``."""

    def __init__(self, ctx: Context, tokens: torch.Tensor):
        from transformers import LlamaConfig as HFLlamaConfig
        from transformers import LlamaForCausalLM

        s = ctx.sizes
        hf = HFLlamaConfig(vocab_size=s.vocab_size, hidden_size=s.hidden_size, intermediate_size=s.ffn_hidden_size,
                           num_hidden_layers=s.num_layers, num_attention_heads=s.num_attention_heads,
                           num_key_value_heads=s.num_query_groups, max_position_embeddings=max(s.seq_length, 128),
                           rope_theta=500000.0, tie_word_embeddings=False, attention_dropout=0.0)
        torch.manual_seed(0)
        with torch.device(ctx.device):
            self.model = LlamaForCausalLM._from_config(hf, attn_implementation="sdpa", dtype=ctx.dtype)
        self.model.train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-5)
        self.tokens = tokens

    def __call__(self) -> float:
        out = self.model(input_ids=self.tokens, labels=self.tokens)
        out.loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(out.loss)


def check_vs_transformers(ctx: Context) -> dict:
    from megatron_zero.models.llama import build_llama_chunks

    s = ctx.sizes
    torch.manual_seed(0)
    rounds = s.warmup + s.peer_rounds
    trainer = _lm_trainer(ctx, build_llama_chunks(ctx.llama(), ctx.opts()), rounds, s.seq_length)
    theirs = _TransformersStep(ctx, _tokens(ctx, 1, s.seq_length - 1))
    times = {"megatron_zero": [], "transformers": []}
    losses = {"megatron_zero": [], "transformers": []}

    def ours_step(i):
        t, loss = _lm_steps(ctx, trainer, 1)  # the same batch every round, as theirs
        return t[0], loss[0]

    def theirs_step(i):
        ctx.sync()
        t0 = time.perf_counter()
        loss = theirs()
        ctx.sync()
        return time.perf_counter() - t0, loss

    sides = {"megatron_zero": ours_step, "transformers": theirs_step}
    for r in range(rounds):
        order = list(sides) if r % 2 == 0 else list(sides)[::-1]  # alternate who goes first
        for name in order:
            dt, loss = sides[name](r)
            losses[name].append(loss)
            if r >= s.warmup:
                times[name].append(dt)
    trainer = theirs = None  # both models go before anything else runs
    ctx.free()
    ratios = [t / o for o, t in zip(times["megatron_zero"], times["transformers"], strict=True)]
    ratio = statistics.median(ratios)
    metrics = {"megatron_zero_tokens_per_s": s.seq_length / statistics.median(times["megatron_zero"]),
               "transformers_tokens_per_s": s.seq_length / statistics.median(times["transformers"]),
               "ratio_median": ratio, "ratio_min": min(ratios), "ratio_max": max(ratios), "rounds": len(ratios),
               "loss_megatron_zero": losses["megatron_zero"][-1], "loss_transformers": losses["transformers"][-1]}
    finite = all(math.isfinite(x) for v in losses.values() for x in v)
    dtype = str(ctx.dtype).replace("torch.", "")
    return _result(finite, metrics, f"same shape and tokens, {dtype}; ours: local spec, distributed optimizer (fp32 "
                                    f"main weights); theirs: LlamaForCausalLM, SDPA, AdamW on {dtype} weights; steps "
                                    f"alternate, ratio of tokens/s per round",
                   [_goal(">= 1.3x transformers' tokens/s", ratio, GOALS["vs_transformers"])])


def check_packed_vlm(ctx: Context) -> dict:
    from megatron_zero.config import DataConfig, RunConfig, TrainingConfig
    from megatron_zero.models.freezing import apply_freezing
    from megatron_zero.models.vlm import build_vlm_chunks
    from megatron_zero.training.vlm_batches import VLMBatches, vlm_forward_step
    from megatron_zero_dev.packing_benchmark import IMAGE_TOKEN_ID, llava_length_mix
    from megatron_zero_dev.steps import AssembledAhead

    s = ctx.sizes
    cfg = ctx.vlm()
    vision = cfg.vision
    torch.manual_seed(0)
    chunks = build_vlm_chunks(cfg, ctx.opts())
    apply_freezing(chunks, "stage2", min(8, vision.num_layers), None, False)
    steps = s.warmup + s.iters
    # each batch is assembled before the clock starts (from ``packed``, made below once the trainer is built)
    batches = AssembledAhead(lambda i: packed.iteration(i))
    trainer = _trainer(ctx, chunks, vlm_forward_step, batches, steps, s.seq_length, s.vlm_samples)
    e = cfg.num_image_embeddings
    samples = llava_length_mix(s.vlm_samples * (s.iters + s.warmup), s.seq_length, e, 1 if not ctx.dry_run else 64,
                               vocab_size=s.vocab_size)
    img = torch.randn(3, vision.image_size, vision.image_size)
    run = RunConfig(training=TrainingConfig(micro_batch_size=1, global_batch_size=s.vlm_samples,
                                            seq_length=s.seq_length, seed=0), data=DataConfig(pack_sequences=True))
    packed = VLMBatches.from_config(samples, run, pad_id=0, image_token_id=IMAGE_TOKEN_ID, num_image_embeddings=e,
                                    load_image=lambda path: img)
    times, fractions, reals, losses = [], [], [], []
    for i in range(steps):
        batches.prepare(i)
        ctx.sync()
        t0 = time.perf_counter()
        r = trainer.step(i)
        ctx.sync()
        if i >= s.warmup:
            times.append(time.perf_counter() - t0)
            reals.append(r.real_tokens)
            fractions.append(r.real_tokens / r.computed_tokens)
        losses.append(r.loss)
    del chunks, trainer
    ctx.free()
    metrics = {"real_tokens_per_s": sum(reals) / sum(times), "real_token_fraction": sum(fractions) / len(fractions),
               "step_s": sum(times) / len(times), "samples_per_step": s.vlm_samples, "loss": losses[-1]}
    return _result(all(math.isfinite(x) for x in losses), metrics,
                   f"{vision.name} + adapter + {cfg.decoder.num_layers} decoder layers, stage-2 freezing, packed "
                   f"rows of {s.seq_length}")


def check_surrogate_ratio(ctx: Context) -> dict:
    target = ctx.target_throughput or _throughput(ctx)
    surrogate = _throughput(ctx, num_layers=ctx.sizes.surrogate_layers)
    time_ratio = surrogate["step_s"] / target["step_s"]
    flop_ratio = surrogate["flops_per_step"] / target["flops_per_step"]
    rel = abs(time_ratio / flop_ratio - 1)
    metrics = {"target_layers": target["layers"], "surrogate_layers": surrogate["layers"], "time_ratio": time_ratio,
               "flop_ratio": flop_ratio, "time_over_flop_ratio": time_ratio / flop_ratio}
    ok = rel <= TOL["flop_ratio_rel"] or ctx.dry_run
    return _result(ok, metrics, "dry-run: ratio not judged (tiny sizes)" if ctx.dry_run else
                   "full training steps, bf16; the target's are throughput_bf16's",
                   [_goal("time ratio within 10% of the FLOP ratio", rel, GOALS["surrogate_flop_ratio_rel"],
                          higher_is_better=False)])


def check_generation(ctx: Context) -> dict:
    from megatron_zero.inference.generate import SamplingOptions, generate
    from megatron_zero.models.vlm import build_vlm
    from megatron_zero_dev.packing_benchmark import IMAGE_TOKEN_ID

    s = ctx.sizes
    cfg = ctx.vlm()
    torch.manual_seed(0)
    model = build_vlm(cfg, ctx.opts())
    g = torch.Generator().manual_seed(0)
    prompts = [[1, IMAGE_TOKEN_ID, *torch.randint(10, s.vocab_size, (24 + 4 * i,), generator=g).tolist()]
               for i in range(s.gen_prompts)]
    images = [torch.randn(1, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g).to(ctx.dtype)
              for _ in prompts]
    options = SamplingOptions(max_new_tokens=s.gen_new_tokens)
    generate(model, prompts, images, SamplingOptions(max_new_tokens=2))  # warm-up
    ctx.sync()
    t0 = time.perf_counter()
    out = generate(model, prompts, images, options)
    ctx.sync()
    dt = time.perf_counter() - t0
    new = sum(len(o) for o in out)
    del model
    metrics = {"prompts": len(prompts), "new_tokens": new, "seconds": dt, "tokens_per_s": new / dt,
               "tokens_per_s_per_row": new / dt / len(prompts)}
    return _result(new == len(prompts) * s.gen_new_tokens, metrics,
                   f"greedy, KV cache (megatron-core StaticInferenceContext), {len(prompts)} rows with one image each, "
                   f"{s.gen_new_tokens} new tokens per row, {cfg.decoder.num_layers}-layer slice")


# --- Transformer Engine and DALI (NVIDIA's container) -------------------------------------------------------------

def check_te_vs_local(ctx: Context) -> dict:
    _require_te()
    from megatron_zero.models.llama import build_llama_model
    from megatron_zero.parallel import sharding

    cfg = ctx.llama(2)
    seq = min(ctx.sizes.seq_length, 2048)
    torch.manual_seed(0)
    te = build_llama_model(cfg, ctx.opts(use_te=True))
    canonical = sharding.gather_canonical([te], vocab_size=cfg.vocab_size)
    local = build_llama_model(cfg, ctx.opts())
    sharding.load_canonical(local, canonical)
    tokens = _tokens(ctx, 1, seq)
    out = {}
    for name, m in (("te", te), ("local", local)):
        logits, loss = _forward_loss(m, tokens)
        loss.backward()
        gn = math.sqrt(sum(float(p.grad.float().pow(2).sum()) for p in m.parameters() if p.grad is not None))
        out[name] = (logits.detach()[..., :cfg.vocab_size].float(), float(loss), gn)
    (lt, st, gt), (ll, sl, gl) = out["te"], out["local"]
    metrics = {"logits_rel": float((lt - ll).abs().max() / ll.abs().max()), "loss_te": st, "loss_local": sl,
               "loss_rel": abs(st - sl) / abs(sl), "grad_norm_te": gt, "grad_norm_local": gl,
               "grad_norm_rel": abs(gt - gl) / gl}
    ok = all(metrics[k] <= TOL[k] for k in ("logits_rel", "loss_rel", "grad_norm_rel"))
    del te, local
    return _result(ok, metrics, "the same weights in both specs, bf16")


def check_fp8_step(ctx: Context) -> dict:
    _require_te()
    from megatron_zero.models.llama import build_llama_model
    from megatron_zero.parallel import sharding

    cfg = ctx.llama(2)
    seq = min(ctx.sizes.seq_length, 2048)
    torch.manual_seed(0)
    ref = build_llama_model(cfg, ctx.opts(use_te=True))
    canonical = sharding.gather_canonical([ref], vocab_size=cfg.vocab_size)
    fp8 = build_llama_model(cfg, ctx.opts(use_te=True, fp8="hybrid"))
    sharding.load_canonical(fp8, canonical)
    losses = {}
    for name, m in (("bf16", ref), ("fp8", fp8)):
        _, (loss,) = _lm_steps(ctx, _lm_trainer(ctx, [m], 1, seq), 1)
        losses[name] = loss
    rel = abs(losses["fp8"] - losses["bf16"]) / abs(losses["bf16"])
    ok = math.isfinite(losses["fp8"]) and rel <= TOL["fp8_loss_rel"]
    return _result(ok, {"loss_bf16": losses["bf16"], "loss_fp8": losses["fp8"], "loss_rel": rel},
                   "one step each on the same weights and batch")


def _write_photos(directory: str) -> list[str]:
    from PIL import Image
    from skimage import data

    paths = []
    for name in ("astronaut", "chelsea", "coffee", "rocket"):
        p = os.path.join(directory, f"{name}.jpg")
        Image.fromarray(getattr(data, name)()).save(p, quality=95)
        paths.append(p)
    return paths


def check_dali(ctx: Context) -> dict:
    if not platform.HAVE_DALI:
        raise NotInstalled("nvidia.dali is not installed here (NVIDIA's container has it: Dockerfile)")
    from megatron_zero.data.images import DALI_MAX_ABS_DIFF, DALI_MEAN_ABS_DIFF, DaliImageLoader, PillowImageLoader

    device = "gpu" if platform.HAVE_CUDA else "cpu"
    with tempfile.TemporaryDirectory() as d:
        paths = _write_photos(d)
        pil = torch.cat([b.images for b in PillowImageLoader(paths, batch_size=len(paths))])
        dali = torch.cat([b.images.cpu() for b in DaliImageLoader(paths, batch_size=len(paths), device=device)])
    diff = (pil - dali).abs()
    metrics = {"max_abs": float(diff.max()), "mean_abs": float(diff.mean()), "images": len(paths)}
    ok = metrics["max_abs"] <= DALI_MAX_ABS_DIFF and metrics["mean_abs"] <= DALI_MEAN_ABS_DIFF
    return _result(ok, metrics, f"DALI on {device}, scikit-image photos")


CHECKS: list[tuple[str, Callable[[Context], dict]]] = [
    ("environment", check_environment),
    ("matmul_peak", check_matmul_peak),
    ("nccl_step", check_nccl),
    ("sdpa_kernel", check_sdpa),
    ("cross_entropy_kernel", check_cross_entropy),
    ("throughput_bf16", check_throughput),
    ("vs_transformers", check_vs_transformers),
    ("packed_vlm_stage2", check_packed_vlm),
    ("surrogate_vs_target", check_surrogate_ratio),
    ("generation_kv_cache", check_generation),
    ("te_vs_local_bf16", check_te_vs_local),
    ("fp8_step", check_fp8_step),
    ("throughput_fp8", check_throughput_fp8),
    ("dali_vs_pillow", check_dali),
]

def _status(rec: dict) -> str:
    return {True: "ok", False: "mismatch", None: "skipped"}[rec["ok"]]


def _cuda_poisoned() -> bool:
    """Whether the CUDA context is unusable after an error (a sticky error fails every later CUDA call)."""
    if not platform.HAVE_CUDA:
        return False
    try:
        torch.cuda.synchronize()
        torch.zeros(1, device="cuda").item()
        return False
    except Exception:  # noqa: BLE001
        return True


def run_check(ctx: Context, name: str, fn: Callable[[Context], dict]) -> dict:
    """One check, isolated: an exception becomes an ``error`` record with its traceback."""
    t0 = time.time()
    faulthandler.dump_traceback_later(CHECK_HANG_S, exit=False)
    try:
        rec = fn(ctx)
        rec["status"] = _status(rec)
    except NotInstalled as e:
        rec = _result(None, {}, str(e))
        rec["status"] = NOT_INSTALLED
    except Exception as e:  # noqa: BLE001  (a failed check is a result)
        rec = _result(False, {}, f"{type(e).__name__}: {str(e)[:500]}")
        rec.update(status="error", traceback=traceback.format_exc(limit=12))
    finally:
        faulthandler.cancel_dump_traceback_later()
    rec = {"check": name, "status": rec.pop("status"), **rec, "seconds": round(time.time() - t0, 1)}
    ctx.free()
    return rec


class Results:
    """The JSON + Markdown files, rewritten after every change (atomically), and resumable after a crash."""

    def __init__(self, dry_run: bool, output_dir: str, resume: bool, previous_exit: Optional[int], log_file: str):
        self.output_dir = output_dir
        self.path = os.path.join(output_dir, "gpu_check.json")
        self.data = None
        if resume and os.path.isfile(self.path):
            with open(self.path) as f:
                self.data = json.load(f)
            for rec in self.data["checks"]:
                if rec["status"] == "running":
                    code = "killed at the time limit" if previous_exit in (124, 137) else f"exit {previous_exit}"
                    rec.update(status="crashed", ok=False,
                               note=f"the process died during this check ({code}); resumed in a fresh process",
                               traceback=_tail(log_file))
            self.data["resumed"] = self.data.get("resumed", 0) + 1
        if self.data is None:
            self.data = {"dry_run": dry_run, "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                         "command": " ".join(sys.argv), "checks": [], "resumed": 0}
        self.data.update(device=torch.cuda.get_device_name() if platform.HAVE_CUDA else "cpu",
                         platform=platform.summary(), tolerances=TOL, goals=GOALS)

    def done(self) -> set:
        return {r["check"] for r in self.data["checks"]}

    def put(self, rec: dict) -> None:
        checks = [r for r in self.data["checks"] if r["check"] != rec["check"]]
        self.data["checks"] = checks + [rec]
        self.write()

    def write(self) -> None:
        recs = self.data["checks"]
        self.data["ok"] = all(r["ok"] is not False for r in recs)
        self.data["complete"] = all(r["status"] not in ("running", "not run") for r in recs)
        self.data["seconds"] = round(sum(r.get("seconds", 0) for r in recs), 1)
        os.makedirs(self.output_dir, exist_ok=True)
        for name, text in (("gpu_check.json", json.dumps(self.data, indent=2, default=str)),
                           ("gpu_check.md", markdown(self.data))):
            tmp = os.path.join(self.output_dir, name + ".tmp")
            with open(tmp, "w") as f:
                f.write(text)
            os.replace(tmp, os.path.join(self.output_dir, name))


def _tail(path: Optional[str], chars: int = 4000) -> Optional[str]:
    if not path or not os.path.isfile(path):
        return None
    with open(path, errors="replace") as f:
        return f.read()[-chars:]


def run_checks(dry_run: bool, output_dir: str, only: Optional[list[str]] = None, log=print, resume: bool = False,
               time_budget: Optional[float] = None, previous_exit: Optional[int] = None,
               log_file: Optional[str] = None, checks: Optional[list] = None) -> tuple[dict, int]:
    """Every check (or ``only`` these) not already in a resumed file, each isolated; results written after each.
    Returns (results, exit status): 0 all ok, 1 a check failed, 3 the CUDA context was poisoned (resume)."""
    results = Results(dry_run, output_dir, resume, previous_exit, log_file)
    todo = [(n, fn) for n, fn in (checks or CHECKS) if (not only or n in only) and n not in results.done()]
    t_start = time.time()
    ctx = Context(dry_run)
    if todo and (time_budget is None or time_budget > 0):
        from megatron_zero.parallel import initialize

        try:
            initialize.initialize_parallel(1, 1, seed=0)
        except Exception as e:  # noqa: BLE001  (every check will say why it could not run)
            log(f"parallel initialisation failed: {type(e).__name__}: {e}")
        if any(n == "cross_entropy_kernel" for n, _ in todo):
            start_kernel_build(ctx)
    for name, fn in todo:
        if time_budget is not None and time.time() - t_start >= time_budget:
            results.put({"check": name, "status": "not run", "ok": None, "metrics": {}, "seconds": 0,
                         "note": "the run's time budget was spent before this check"})
            log(f"[not run] {name}: time budget spent")
            continue
        results.put({"check": name, "status": "running", "ok": False, "metrics": {}, "note": "", "seconds": 0})
        rec = run_check(ctx, name, fn)
        results.put(rec)
        log(f"[{rec['status']}] {name} ({rec['seconds']} s): {_short(rec['metrics'])} {rec['note']}")
        if rec.get("traceback"):
            log(rec["traceback"])
        if rec["status"] == "error" and _cuda_poisoned():
            log("the CUDA context is unusable after this error: exiting for a fresh process to resume")
            return results.data, EXIT_CUDA_POISONED
    return results.data, 0 if results.data["ok"] else 1


def _short(metrics: dict) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        if isinstance(v, list) and v and isinstance(v[0], float):
            return "[" + ", ".join(f"{x:.4g}" for x in v) + "]"
        return str(v)

    return ", ".join(f"{k}={fmt(v)}" for k, v in metrics.items() if k != "profile_top")


def markdown(result: dict) -> str:
    head = (f"GPU check on {result['device']} ({result['platform']}), {result['seconds']} s of checks, started "
            f"{result['started']}; command: `{result['command']}`")
    if result["dry_run"]:
        head += " -- DRY RUN (CPU, tiny sizes: plumbing only, no GPU result)"
    lines = [head, "", "| check | status | seconds | metrics | note |", "|---|---|---|---|---|"]
    for r in result["checks"]:
        status = r["status"] if r["ok"] is not False else f"**{r['status'].upper()}**"
        lines.append(f"| {r['check']} | {status} | {r.get('seconds', '')} | {_short(r['metrics'])} | "
                     f"{r['note'].replace('|', '/')} |")
    goals = [(r["check"], g) for r in result["checks"] for g in r.get("goals", [])]
    if goals:
        lines += ["", "| goal | check | measured | target | met |", "|---|---|---|---|---|"]
        for check, g in goals:
            m = "n/a" if g["measured"] is None else f"{g['measured']:.3g}"
            lines.append(f"| {g['goal']} | {check} | {m} | {g['target']} | "
                         f"{ {True: 'yes', False: '**no**', None: 'n/a'}[g['met']]} |")
    tp = {r["check"]: r["metrics"] for r in result["checks"] if r["check"].startswith("throughput") and r["metrics"]}
    if tp:
        lines += ["", "| precision | layers | seq | tokens/s | TFLOP/s | MFU (measured peak) | MFU (datasheet) |",
                  "|---|---|---|---|---|---|---|"]
        pct = lambda x: f"{100 * x:.1f}%" if x is not None else "n/a"  # noqa: E731
        for name, m in tp.items():
            lines.append(f"| {name.split('_')[1]} | {m['layers']} | {m['seq_length']} | {m['tokens_per_s']:.0f} | "
                         f"{m['tflops']:.1f} | {pct(m.get('mfu'))} | {pct(m.get('mfu_datasheet'))} |")
    for name, m in tp.items():
        if m.get("profile_top"):
            lines += ["", f"### {name}: where one step's time goes (profiler, self time)", "",
                      "| operator | ms | share | calls |", "|---|---|---|---|"]
            lines += [f"| `{e['op']}` | {e['ms']:.2f} | {100 * e['share']:.1f}% | {e['calls']} |"
                      for e in m["profile_top"]]
    crashed = [r for r in result["checks"] if r.get("traceback")]
    for r in crashed:
        lines += ["", f"### {r['check']}: {r['status']}", "", "```", r["traceback"].rstrip(), "```"]
    return "\n".join(lines) + "\n"


def main(dry_run: bool = False, output_dir: str = "gpu_check_results", only: Optional[list[str]] = None,
         resume: bool = False, time_budget: Optional[float] = None, previous_exit: Optional[int] = None,
         log_file: Optional[str] = None) -> int:
    """Run, write ``<output_dir>/gpu_check.json`` and ``gpu_check.md``; 0 if all ok, 1 on a failed check, 2
    without a GPU (unless ``dry_run``), 3 when a fresh process must resume (see :func:`run_checks`)."""
    if not platform.HAVE_CUDA and not dry_run:
        print("error: gpu_check needs a CUDA GPU (none is visible); --dry-run exercises its plumbing on CPU",
              file=sys.stderr)
        return 2
    result, code = run_checks(dry_run, output_dir, only, log=lambda m: print(m, flush=True), resume=resume,
                              time_budget=time_budget, previous_exit=previous_exit, log_file=log_file)
    print(markdown(result))
    print(f"wrote {output_dir}/gpu_check.json and gpu_check.md; "
          f"{'all ok' if result['ok'] else 'FAILED: ' + ', '.join(r['check'] for r in result['checks'] if r['ok'] is False)}")
    return code
