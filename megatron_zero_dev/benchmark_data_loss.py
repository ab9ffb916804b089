"""Benchmarks of the image loaders and the fused weighted cross-entropy (``tools/benchmark_data_loss.py``).

:func:`bench_images`: images/s of the Pillow loader, the DALI CPU pipeline and (with CUDA) the DALI GPU pipeline on
generated JPEGs. :func:`bench_loss`: time (forward + backward) and peak memory of the weighted cross-entropy -- the
compiled kernel, the chunked PyTorch path and the naive ``log_softmax`` + ``gather`` -- each method in its own
subprocess (``python -m megatron_zero_dev.benchmark_data_loss METHOD ...``), since peak RSS never goes down.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from megatron_zero import platform
from megatron_zero.data.images import DaliImageLoader, PillowImageLoader
from megatron_zero.loss import fused_cross_entropy as fce

REPO = Path(__file__).resolve().parents[2]

LLAMA3_VOCAB = 128256


def make_jpegs(folder: Path, count: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    paths = []
    for i in tqdm(range(count), desc="generating JPEGs"):
        w, h = int(rng.integers(480, 800)), int(rng.integers(360, 600))
        yy, xx = np.mgrid[0:h, 0:w]
        phase = rng.uniform(0, 6.28, 3)
        image = np.stack([127 + 120 * np.sin(xx / (20 + 10 * c) + yy / 37 + phase[c]) for c in range(3)], -1)
        path = folder / f"{i:05d}.jpg"
        Image.fromarray(image.astype(np.uint8)).save(path, quality=90)
        paths.append(str(path))
    return paths


def images_per_second(loader, count: int) -> float:
    next(iter(loader))  # warm-up (pipeline build, worker start)
    start = time.perf_counter()
    seen = sum(len(batch.indices) for batch in loader)
    if platform.HAVE_CUDA:
        torch.cuda.synchronize()
    assert seen == count, (seen, count)
    return count / (time.perf_counter() - start)


def bench_images(count: int, batch_size: int, workers: int) -> dict:
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_jpegs(Path(tmp), count)
        results["pillow"] = images_per_second(PillowImageLoader(paths, batch_size, num_workers=workers), count)
        if platform.HAVE_DALI:
            results["dali_cpu"] = images_per_second(
                DaliImageLoader(paths, batch_size, device="cpu", num_threads=workers), count
            )
            if platform.HAVE_CUDA:
                results["dali_gpu"] = images_per_second(
                    DaliImageLoader(paths, batch_size, device="gpu", num_threads=workers), count
                )
    return results


def _peak_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def _naive_loss(logits, target, weights, normaliser):
    logp = F.log_softmax(logits.float(), dim=-1)
    return -(logp.gather(-1, target[:, None]).squeeze(1) * weights) / normaliser


def run_loss_method(method: str, tokens: int, vocab: int, dtype: str, repeats: int, build_dir: str | None) -> dict:
    """One method, in this process: median ms of forward + backward, and the peak memory it added beyond the inputs
    (the logits' gradient, one logits-sized tensor, is part of every method's peak)."""
    device = platform.device()
    if method == "kernel" and device.type == "cpu":
        fce.load_cpu_extension(build_dir)
    g = torch.Generator(device=device).manual_seed(0)
    logits = torch.randn(tokens, vocab, generator=g, device=device).to(getattr(torch, dtype))
    target = torch.randint(0, vocab, (tokens,), generator=g, device=device)
    weights = torch.rand(tokens, generator=g, device=device)

    def step():
        x = logits.detach().requires_grad_()
        if method == "naive":
            loss = _naive_loss(x, target, weights, tokens)
        else:
            loss = fce.vocab_parallel_weighted_cross_entropy(x, target, weights, tokens, impl=method)
        loss.sum().backward()
        return x.grad

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _peak_rss_bytes()
    step()  # warm-up (counted in the peak: it allocates what every step does)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda" else _peak_rss_bytes()) - base
    return {"ms": float(np.median(times)), "peak_extra_MiB": peak / 2**20}


def bench_loss(tokens: int, vocab: int, dtype: str, repeats: int, build_dir: str | None) -> dict:
    methods = ["naive", "torch"]
    if not platform.HAVE_CUDA or fce.kernel_available("cuda"):  # CPU: the JIT build
        methods.insert(0, "kernel")
    results = {}
    for method in methods:  # a fresh process each: peak RSS never goes down
        cmd = [sys.executable, "-m", __name__, method, str(tokens), str(vocab), dtype, str(repeats), build_dir or ""]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
        results[method] = json.loads(out.stdout.strip().splitlines()[-1])
    return results


if __name__ == "__main__":  # one loss method in this process (see bench_loss); prints its JSON
    method, tokens, vocab, dtype, repeats, build_dir = sys.argv[1:7]
    print(json.dumps(run_loss_method(method, int(tokens), int(vocab), dtype, int(repeats), build_dir or None)))
