"""GPU acceptance run (``make gpu-check`` / ``tools/gpu_check.py``): what CPU CI cannot test, in ~8 minutes on
one H100/H200, from a fresh checkout on NVIDIA's PyTorch container (or any CUDA torch + Transformer Engine).

Checks (each one record in ``gpu_check.json`` and a row of ``gpu_check.md``; any mismatch -> exit status 1):

``te_vs_local_bf16``
    The same weights (canonical tensors copied across) in the TE spec and the local spec, bf16: logits, loss and
    gradient norm agree within bf16 tolerance (:data:`TOL`).
``fp8_step``
    One training step (DDP, distributed optimizer, megatron schedule) with ``fp8="hybrid"`` runs, is finite and
    its loss is within :data:`TOL` ``["fp8_loss_rel"]`` of the bf16 step's on the same weights and batch.
``cross_entropy_kernel``
    The fused weighted cross-entropy CUDA kernel vs the PyTorch reference (``impl="torch"``) and
    ``F.cross_entropy`` at vocabulary 128256: values, gradients, peak memory and speed.
``dali_vs_pillow``
    DALI's GPU pipeline (nvJPEG) vs the Pillow reference on real photos (scikit-image), within the tolerance the
    CPU tests use (:data:`megatron_zero.data.images.DALI_MAX_ABS_DIFF` / ``DALI_MEAN_ABS_DIFF``).
``throughput_bf16`` / ``throughput_fp8``
    A Llama-3.1-8B-shaped decoder (full width, a few layers), seq 4096: tokens/s and MFU (Megatron FLOP
    convention, :mod:`megatron_zero.training.flops`).
``packed_vlm_stage2``
    A packed stage-2 VLM step (CLIP ViT-L/14-336 + adapter + those decoder layers, stage-2 freezing) on the
    LLaVA-1.5-shaped length mix of :mod:`megatron_zero_dev.packing_benchmark`: real tokens/s, real fraction.
``surrogate_vs_target``
    Step time of a surrogate (fewer layers) over the target's, against the ratio of their FLOPs.

Without a GPU :func:`main` refuses in one line; ``dry_run=True`` runs every check on CPU at tiny sizes, with the
local spec standing in for TE and fp32 for FP8 (records say so), to exercise the plumbing in the test suite.
"""
from __future__ import annotations

import dataclasses
import gc
import json
import math
import os
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
    "flop_ratio_rel": 0.25,  # |time ratio / FLOP ratio - 1|
}


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
    num_image_tokens: int
    vlm_samples: int
    iters: int
    warmup: int


FULL = Sizes(4096, 14336, 32, 8, 128256, 4, 4096, 2, 8192, 128256, "clip-vit-l-14-336", 579, 16, 3, 2)
DRY = Sizes(64, 128, 4, 2, 512, 2, 64, 1, 64, 1000, "tiny-clip", 19, 8, 1, 1)


class Context:
    def __init__(self, dry_run: bool):
        self.dry_run = dry_run
        self.sizes = DRY if dry_run else FULL
        self.device = platform.device()
        self.use_te = bool(platform.HAVE_TE) and not dry_run
        self.dtype = torch.bfloat16 if not dry_run else torch.float32

    def llama(self, num_layers: Optional[int] = None):
        from megatron_zero.models.llama_config import LlamaConfig

        s = self.sizes
        return LlamaConfig(num_layers=num_layers or s.num_layers, hidden_size=s.hidden_size,
                           ffn_hidden_size=s.ffn_hidden_size, num_attention_heads=s.num_attention_heads,
                           num_query_groups=s.num_query_groups, vocab_size=s.vocab_size,
                           max_position_embeddings=max(s.seq_length, 128), rope_theta=500000.0,
                           rope_scaling_factor=8.0, name=f"llama-3.1-8b-shaped-{num_layers or s.num_layers}l")

    def opts(self, use_te: Optional[bool] = None, fp8: Optional[str] = None):
        from megatron_zero.models.llama import RuntimeOptions

        bf16 = self.dtype == torch.bfloat16
        return RuntimeOptions(params_dtype=self.dtype, bf16=bf16, use_te=self.use_te if use_te is None else use_te,
                              fp8=fp8 if not self.dry_run else None)

    def sync(self):
        if platform.HAVE_CUDA:
            torch.cuda.synchronize()

    def free(self):
        gc.collect()
        if platform.HAVE_CUDA:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()


def _tokens(ctx: Context, batch: int, seq: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, ctx.sizes.vocab_size, (batch, seq + 1), generator=g).to(ctx.device)


def _forward_loss(model, tokens):
    inp, tgt = tokens[:, :-1], tokens[:, 1:]
    pos = torch.arange(inp.shape[1], device=inp.device).expand_as(inp)
    logits = model(inp, pos, None)
    loss = F.cross_entropy(logits.float().flatten(0, 1), tgt.flatten())
    return logits, loss


def check_te_vs_local(ctx: Context) -> dict:
    from megatron_zero.models.llama import build_llama_model
    from megatron_zero.parallel import sharding

    cfg = ctx.llama(2)
    seq = min(ctx.sizes.seq_length, 2048)
    torch.manual_seed(0)
    te = build_llama_model(cfg, ctx.opts(use_te=ctx.use_te))
    canonical = sharding.gather_canonical([te], vocab_size=cfg.vocab_size)
    local = build_llama_model(cfg, ctx.opts(use_te=False))
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
    return {"ok": ok, "metrics": metrics, "note": "" if ctx.use_te else "dry-run: the local spec stands in for TE"}


def _train_setup(ctx: Context, chunks):
    from megatron_zero.training.optimizer import OptimizerOptions, build_optimizer, wrap_ddp

    oo = OptimizerOptions(lr=1e-5, bf16=ctx.dtype == torch.bfloat16, use_distributed_optimizer=True)
    chunks = wrap_ddp(chunks, oo)
    return chunks, build_optimizer(chunks, oo)


def _lm_steps(ctx: Context, chunks, opt, n: int, seq: int, gbs: int = 1) -> tuple[list[float], list[float]]:
    """``n`` training steps on random tokens; (step times, losses)."""
    from megatron_zero.data.token_windows import TokenWindows
    from megatron_zero.training.train_step import lm_forward_step, train_step

    data = TokenWindows(torch.randint(0, ctx.sizes.vocab_size, (gbs * (seq + 1) * 2,),
                                      generator=torch.Generator().manual_seed(1)).numpy(), seq)
    times, losses = [], []
    for i in range(n):
        ctx.sync()
        t0 = time.perf_counter()
        r = train_step(lm_forward_step, data.iteration_microbatches(i % 2, gbs, 1, 0, 1), chunks, opt, gbs, seq, 1)
        ctx.sync()
        times.append(time.perf_counter() - t0)
        losses.append(r.loss)
    return times, losses


def check_fp8_step(ctx: Context) -> dict:
    from megatron_zero.models.llama import build_llama_model
    from megatron_zero.parallel import sharding

    cfg = ctx.llama(2)
    seq = min(ctx.sizes.seq_length, 2048)
    torch.manual_seed(0)
    ref = build_llama_model(cfg, ctx.opts())
    canonical = sharding.gather_canonical([ref], vocab_size=cfg.vocab_size)
    fp8 = build_llama_model(cfg, ctx.opts(fp8="hybrid"))
    sharding.load_canonical(fp8, canonical)
    losses = {}
    for name, m in (("bf16", ref), ("fp8", fp8)):
        chunks, opt = _train_setup(ctx, [m])
        _, (loss,) = _lm_steps(ctx, chunks, opt, 1, seq)
        losses[name] = loss
    rel = abs(losses["fp8"] - losses["bf16"]) / abs(losses["bf16"])
    ok = math.isfinite(losses["fp8"]) and rel <= TOL["fp8_loss_rel"]
    return {"ok": ok, "metrics": {"loss_bf16": losses["bf16"], "loss_fp8": losses["fp8"], "loss_rel": rel},
            "note": "" if not ctx.dry_run else "dry-run: fp32 stands in for FP8"}


def check_cross_entropy(ctx: Context) -> dict:
    from megatron_zero.loss.fused_cross_entropy import kernel_available, vocab_parallel_weighted_cross_entropy

    n, v = ctx.sizes.ce_tokens, ctx.sizes.ce_vocab
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(n, v, generator=g) * 2).to(ctx.device)
    target = torch.randint(0, v, (n,), generator=g).to(ctx.device)
    weights = torch.ones(n, device=ctx.device)
    impl = "kernel" if not ctx.dry_run else "torch"
    if not ctx.dry_run and not kernel_available(ctx.device):
        return {"ok": False, "metrics": {}, "note": "the CUDA kernel is not built (pip install -e . builds csrc/)"}
    results = {}
    for name, fn in (
        ("fused", lambda x: vocab_parallel_weighted_cross_entropy(x, target, weights, float(n), impl=impl)),
        ("torch_reference", lambda x: vocab_parallel_weighted_cross_entropy(x, target, weights, float(n),
                                                                            impl="torch")),
        ("F.cross_entropy", lambda x: F.cross_entropy(x, target, reduction="none") / n),
    ):
        x = logits.clone().requires_grad_(True)
        ctx.free()
        base = torch.cuda.memory_allocated() if platform.HAVE_CUDA else 0
        ctx.sync()
        t0 = time.perf_counter()
        loss = fn(x)
        loss.sum().backward()
        ctx.sync()
        dt = time.perf_counter() - t0
        peak = (torch.cuda.max_memory_allocated() - base) / 2**30 if platform.HAVE_CUDA else float("nan")
        results[name] = (loss.detach(), x.grad.detach(), dt, peak)
    ref_loss, ref_grad = results["F.cross_entropy"][:2]
    metrics = {}
    for name, (loss, grad, dt, peak) in results.items():
        metrics[f"{name}_ms"] = 1e3 * dt
        metrics[f"{name}_peak_gb"] = peak
        if name != "F.cross_entropy":
            metrics[f"{name}_value_abs"] = float((loss - ref_loss).abs().max())
            metrics[f"{name}_grad_abs"] = float((grad - ref_grad).abs().max())
    ok = all(metrics[f"{k}_value_abs"] <= TOL["ce_value_abs"] and metrics[f"{k}_grad_abs"] <= TOL["ce_grad_abs"]
             for k in ("fused", "torch_reference"))
    return {"ok": ok, "metrics": metrics, "note": f"{n} tokens x vocab {v}, fp32 logits" +
            ("" if not ctx.dry_run else "; dry-run: the PyTorch path stands in for the kernel")}


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
    from megatron_zero.data.images import DALI_MAX_ABS_DIFF, DALI_MEAN_ABS_DIFF, DaliImageLoader, PillowImageLoader

    if not platform.HAVE_DALI:
        return {"ok": None if ctx.dry_run else False, "metrics": {},
                "note": "nvidia.dali is not installed (pip install nvidia-dali-cuda120)"}
    device = "gpu" if not ctx.dry_run else "cpu"
    with tempfile.TemporaryDirectory() as d:
        paths = _write_photos(d)
        pil = torch.cat([b.images for b in PillowImageLoader(paths, batch_size=len(paths))])
        dali = torch.cat([b.images.cpu() for b in DaliImageLoader(paths, batch_size=len(paths), device=device)])
    diff = (pil - dali).abs()
    metrics = {"max_abs": float(diff.max()), "mean_abs": float(diff.mean()), "images": len(paths)}
    ok = metrics["max_abs"] <= DALI_MAX_ABS_DIFF and metrics["mean_abs"] <= DALI_MEAN_ABS_DIFF
    return {"ok": ok, "metrics": metrics, "note": f"DALI on {device}, scikit-image photos"}


def _peak_tflops() -> Optional[float]:
    from megatron_zero.training.flops import PEAK_TFLOPS

    if not platform.HAVE_CUDA:
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def _throughput(ctx: Context, fp8: Optional[str], num_layers: Optional[int] = None) -> dict:
    from megatron_zero.models.llama import build_llama_chunks
    from megatron_zero.models.llama_config import padded_vocab_size
    from megatron_zero.training.flops import decoder_flops_per_step, mfu

    cfg = ctx.llama(num_layers)
    seq = ctx.sizes.seq_length
    torch.manual_seed(0)
    chunks, opt = _train_setup(ctx, build_llama_chunks(cfg, ctx.opts(fp8=fp8)))
    times, losses = _lm_steps(ctx, chunks, opt, ctx.sizes.warmup + ctx.sizes.iters, seq)
    step = sorted(times[ctx.sizes.warmup:])[len(times[ctx.sizes.warmup:]) // 2]
    flops = decoder_flops_per_step(cfg, 1, seq, padded_vocab_size(cfg.vocab_size, 1))
    peak = _peak_tflops()
    tflops, util = mfu(flops, step, 1, peak or float("inf"))
    del chunks, opt
    ctx.free()
    return {"layers": cfg.num_layers, "seq_length": seq, "step_s": step, "tokens_per_s": seq / step,
            "tflops": tflops, "mfu": util if peak else None, "flops_per_step": flops,
            "loss": losses[-1], "finite": all(math.isfinite(x) for x in losses)}


def check_throughput(ctx: Context, fp8: Optional[str]) -> dict:
    m = _throughput(ctx, fp8)
    note = "Llama-3.1-8B width, %d layers, seq %d, micro batch 1" % (m["layers"], m["seq_length"])
    if ctx.dry_run:
        note += "; dry-run: tiny sizes, fp32"
    return {"ok": m["finite"], "metrics": m, "note": note}


def check_packed_vlm(ctx: Context) -> dict:
    from megatron.core import parallel_state as ps

    from megatron_zero.models.clip_vit import get_vision_preset
    from megatron_zero.models.freezing import apply_freezing
    from megatron_zero.models.vlm import VLMConfig, build_vlm_chunks
    from megatron_zero_dev.packing_benchmark import IMAGE_TOKEN_ID, llava_length_mix
    from megatron_zero.training.train_step import train_step
    from megatron_zero.training.vlm_batches import VLMBatches, vlm_forward_step

    s = ctx.sizes
    vision = get_vision_preset(s.vision)
    cfg = VLMConfig(ctx.llama(), vision, IMAGE_TOKEN_ID)
    torch.manual_seed(0)
    chunks = build_vlm_chunks(cfg, ctx.opts())
    apply_freezing(chunks, "stage2", min(8, vision.num_layers), None, False)
    chunks, opt = _train_setup(ctx, chunks)
    e = cfg.num_image_embeddings
    samples = llava_length_mix(s.vlm_samples * (s.iters + s.warmup), s.seq_length, e, 1 if not ctx.dry_run else 64,
                               vocab_size=s.vocab_size)
    img = torch.randn(3, vision.image_size, vision.image_size)
    batches = VLMBatches(samples, image_token_id=IMAGE_TOKEN_ID, num_image_embeddings=e, seq_length=s.seq_length,
                         pad_id=0, global_batch_size=s.vlm_samples, micro_batch_size=1, dp_rank=0, dp_size=1, seed=0,
                         load_image=lambda p: img, dp_group=ps.get_data_parallel_group(), pack_sequences=True)
    times, fractions, reals, losses = [], [], [], []
    for i in range(s.warmup + s.iters):
        step = batches.iteration(i)
        seq, mbs = step.schedule_shape
        ctx.sync()
        t0 = time.perf_counter()
        r = train_step(vlm_forward_step, step, chunks, opt, step.num_microbatches, seq, mbs)
        ctx.sync()
        if i >= s.warmup:
            times.append(time.perf_counter() - t0)
            reals.append(step.real_tokens)
            fractions.append(step.real_tokens / step.computed_tokens)
        losses.append(r.loss)
    del chunks, opt
    ctx.free()
    metrics = {"real_tokens_per_s": sum(reals) / sum(times), "real_token_fraction": sum(fractions) / len(fractions),
               "step_s": sum(times) / len(times), "samples_per_step": s.vlm_samples, "loss": losses[-1]}
    return {"ok": all(math.isfinite(x) for x in losses), "metrics": metrics,
            "note": f"{vision.name} + adapter + {cfg.decoder.num_layers} decoder layers, stage-2 freezing, packed "
                    f"rows of {s.seq_length}"}


def check_surrogate_ratio(ctx: Context) -> dict:
    target = _throughput(ctx, None)
    surrogate = _throughput(ctx, None, ctx.sizes.surrogate_layers)
    time_ratio = surrogate["step_s"] / target["step_s"]
    flop_ratio = surrogate["flops_per_step"] / target["flops_per_step"]
    metrics = {"target_layers": target["layers"], "surrogate_layers": surrogate["layers"], "time_ratio": time_ratio,
               "flop_ratio": flop_ratio, "time_over_flop_ratio": time_ratio / flop_ratio}
    ok = abs(time_ratio / flop_ratio - 1) <= TOL["flop_ratio_rel"] or ctx.dry_run
    return {"ok": ok, "metrics": metrics,
            "note": "dry-run: ratio not judged (tiny sizes)" if ctx.dry_run else "full training steps, bf16"}


CHECKS: list[tuple[str, Callable[[Context], dict]]] = [
    ("te_vs_local_bf16", check_te_vs_local),
    ("fp8_step", check_fp8_step),
    ("cross_entropy_kernel", check_cross_entropy),
    ("dali_vs_pillow", check_dali),
    ("throughput_bf16", lambda ctx: check_throughput(ctx, None)),
    ("throughput_fp8", lambda ctx: check_throughput(ctx, "hybrid")),
    ("packed_vlm_stage2", check_packed_vlm),
    ("surrogate_vs_target", check_surrogate_ratio),
]


def run_checks(dry_run: bool, only: Optional[list[str]] = None, log=print) -> dict:
    """Every check (or ``only`` these), each isolated: an exception fails that check, not the run."""
    from megatron_zero.parallel import initialize

    ctx = Context(dry_run)
    initialize.initialize_parallel(1, 1, seed=0)
    t_start = time.time()
    records = []
    for name, fn in CHECKS:
        if only and name not in only:
            continue
        t0 = time.time()
        try:
            rec = fn(ctx)
        except Exception as e:  # noqa: BLE001  (a failed check is a result)
            rec = {"ok": False, "metrics": {}, "note": f"{type(e).__name__}: {e}",
                   "traceback": traceback.format_exc(limit=6)}
        rec = {"check": name, **rec, "seconds": round(time.time() - t0, 1)}
        ctx.free()
        records.append(rec)
        status = {True: "ok", False: "MISMATCH", None: "skipped"}[rec["ok"]]
        log(f"[{status}] {name} ({rec['seconds']} s): {_short(rec['metrics'])} {rec['note']}")
    return {"dry_run": dry_run, "device": torch.cuda.get_device_name() if platform.HAVE_CUDA else "cpu",
            "platform": platform.summary(), "seconds": round(time.time() - t_start, 1), "tolerances": TOL,
            "checks": records, "ok": all(r["ok"] is not False for r in records)}


def _short(metrics: dict) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())


def markdown(result: dict) -> str:
    lines = [f"GPU check on {result['device']} ({result['platform']}), {result['seconds']} s"
             + (" -- DRY RUN (CPU, tiny sizes: plumbing only, no GPU result)" if result["dry_run"] else ""), "",
             "| check | result | metrics | note |", "|---|---|---|---|"]
    for r in result["checks"]:
        status = {True: "ok", False: "**MISMATCH**", None: "skipped"}[r["ok"]]
        lines.append(f"| {r['check']} | {status} | {_short(r['metrics'])} | {r['note']} |")
    tp = {r["check"]: r["metrics"] for r in result["checks"] if r["check"].startswith("throughput") and r["metrics"]}
    if tp:
        lines += ["", "| precision | layers | seq | tokens/s | TFLOP/s | MFU |", "|---|---|---|---|---|---|"]
        for name, m in tp.items():
            mfu_s = f"{100 * m['mfu']:.1f}%" if m.get("mfu") is not None else "n/a"
            lines.append(f"| {name.split('_')[1]} | {m['layers']} | {m['seq_length']} | {m['tokens_per_s']:.0f} | "
                         f"{m['tflops']:.1f} | {mfu_s} |")
    return "\n".join(lines) + "\n"


def main(dry_run: bool = False, output_dir: str = "gpu_check_results", only: Optional[list[str]] = None) -> int:
    """Run, write ``<output_dir>/gpu_check.json`` and ``gpu_check.md``; 0 if all ok, 1 on a mismatch, 2 without a
    GPU (unless ``dry_run``)."""
    import sys

    if not platform.HAVE_CUDA and not dry_run:
        print("error: gpu_check needs a CUDA GPU (none is visible); --dry-run exercises its plumbing on CPU",
              file=sys.stderr)
        return 2
    result = run_checks(dry_run, only, log=lambda m: print(m, flush=True))
    os.makedirs(output_dir, exist_ok=True)
    for name, text in (("gpu_check.json", json.dumps(result, indent=2)), ("gpu_check.md", markdown(result))):
        tmp = os.path.join(output_dir, name + ".tmp")
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, os.path.join(output_dir, name))
    print(markdown(result))
    print(f"wrote {output_dir}/gpu_check.json and gpu_check.md; {'all ok' if result['ok'] else 'MISMATCH'}")
    return 0 if result["ok"] else 1
