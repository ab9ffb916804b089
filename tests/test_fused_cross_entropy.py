"""Fused weighted vocab-parallel cross-entropy: the CPU C++ extension (same header as the CUDA kernel) and the
PyTorch path against F.cross_entropy(reduction="none") * weights / normaliser, forward and backward, for one shard
and for a vocabulary split over TP=2 (in one process, and over gloo); the CUDA kernel compiles with nvcc."""
import os
import shutil
import subprocess

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from megatron_zero.loss import fused_cross_entropy as fce
from megatron_zero.loss.length_weighted import (
    global_length_stats,
    response_lengths,
    token_weights,
    weighted_loss,
)

BUILD_DIR = "/tmp/megatron_zero_test_build/weighted_ce_cpu"
NORMALISER = 7.0


@pytest.fixture(scope="module")
def cpu_kernel():
    """Compile (once, cached in BUILD_DIR) and register the CPU kernels."""
    fce.load_cpu_extension(BUILD_DIR)
    assert fce.kernel_available("cpu")
    return "kernel"


@pytest.fixture(params=["torch", "kernel"])
def impl(request):
    if request.param == "kernel":
        request.getfixturevalue("cpu_kernel")
    return request.param


def _problem(rows=29, vocab=1000, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=g, dtype=torch.float64) * 4
    target = torch.randint(0, vocab, (rows,), generator=g)
    weights = torch.rand(rows, generator=g, dtype=torch.float64) * 2
    weights[[3, 10]] = 0
    target[3] = -100  # an ignored position: weight 0, any id
    grad_out = torch.randn(rows, generator=g, dtype=torch.float64)
    return logits, target, weights, grad_out


def _reference(logits, target, weights, grad_out):
    """Independent reference: float64 F.cross_entropy per token, times weight / normaliser; autograd gradient."""
    x = logits.detach().clone().requires_grad_()
    loss = F.cross_entropy(x, target.clamp(min=0), reduction="none") * weights / NORMALISER
    (loss * grad_out).sum().backward()
    return loss.detach(), x.grad


TOLERANCE = {torch.float32: {"atol": 2e-6, "rtol": 1e-5}, torch.bfloat16: {"atol": 2e-2, "rtol": 2e-2}}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_single_shard_forward_and_backward(impl, dtype):
    logits, target, weights, grad_out = _problem()
    shard = logits.to(dtype)
    ref_loss, ref_grad = _reference(shard.double(), target, weights, grad_out)
    x = shard.clone().requires_grad_()
    loss = fce.vocab_parallel_weighted_cross_entropy(x, target, weights.float(), NORMALISER, impl=impl)
    (loss * grad_out.float()).sum().backward()
    assert loss.dtype == torch.float32 and x.grad.dtype == dtype
    torch.testing.assert_close(loss.double(), ref_loss, **TOLERANCE[torch.float32])
    torch.testing.assert_close(x.grad.double(), ref_grad, **TOLERANCE[dtype])
    assert loss[3] == 0 and (x.grad[[3, 10]] == 0).all()


def test_batched_shapes(impl):
    logits, target, weights, grad_out = _problem(rows=24, vocab=300)
    ref_loss, ref_grad = _reference(logits, target, weights, grad_out)
    shape = (2, 3, 4)
    x = logits.float().view(*shape, 300).clone().requires_grad_()
    loss = fce.vocab_parallel_weighted_cross_entropy(
        x, target.view(shape), weights.float().view(shape), NORMALISER, impl=impl
    )
    (loss * grad_out.float().view(shape)).sum().backward()
    assert loss.shape == shape
    torch.testing.assert_close(loss.reshape(-1).double(), ref_loss, **TOLERANCE[torch.float32])
    torch.testing.assert_close(x.grad.reshape(-1, 300).double(), ref_grad, **TOLERANCE[torch.float32])


@pytest.mark.parametrize("ops_name", ["torch", "torch-one-row-chunks", "kernel"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tp2_split_in_one_process(ops_name, dtype, request):
    """Two vocabulary shards through the per-row steps, the TP all-reduces done by hand (max, then sums)."""
    if ops_name == "kernel":
        request.getfixturevalue("cpu_kernel")
    ops = {"torch": fce.TorchOps(), "torch-one-row-chunks": fce.TorchOps(chunk_elements=500),
           "kernel": fce.KernelOps()}[ops_name]
    logits, target, weights, grad_out = _problem(vocab=1000)
    shards = [s.to(dtype).contiguous() for s in logits.chunk(2, dim=1)]
    ref_loss, ref_grad = _reference(torch.cat(shards, dim=1).double(), target, weights, grad_out)
    starts = [0, 500]
    global_max = torch.maximum(*[ops.row_max(s) for s in shards])
    partial = [ops.sum_exp_target(s, global_max, target, v0) for s, v0 in zip(shards, starts)]
    sum_exp = partial[0][0] + partial[1][0]
    target_logit = partial[0][1] + partial[1][1]
    lse = global_max + sum_exp.log()
    scale = (weights / NORMALISER).float()
    loss = torch.where(scale != 0, (lse - target_logit) * scale, torch.zeros_like(lse))
    torch.testing.assert_close(loss.double(), ref_loss, **TOLERANCE[torch.float32])
    grads = [ops.logit_grad(s, target, lse, (scale * grad_out).float(), v0) for s, v0 in zip(shards, starts)]
    assert all(g.dtype == dtype for g in grads)
    torch.testing.assert_close(torch.cat(grads, dim=1).double(), ref_grad, **TOLERANCE[dtype])


def _tp_worker(rank, world_size, init_file, use_kernel, results):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        if use_kernel:
            fce.load_cpu_extension(BUILD_DIR)
        logits, target, weights, grad_out = _problem()
        out = {}
        for impl in ("torch", "kernel") if use_kernel else ("torch",):
            x = logits.float().chunk(world_size, dim=1)[rank].contiguous().requires_grad_()
            loss = fce.vocab_parallel_weighted_cross_entropy(
                x, target, weights.float(), NORMALISER, group=dist.group.WORLD, impl=impl
            )
            (loss * grad_out.float()).sum().backward()
            out[impl] = (loss.detach(), x.grad)
        results[rank] = out
    finally:
        dist.destroy_process_group()


def test_tp2_over_gloo(cpu_kernel, tmp_path):
    logits, target, weights, grad_out = _problem()
    ref_loss, ref_grad = _reference(logits, target, weights, grad_out)
    results = mp.Manager().dict()
    mp.spawn(_tp_worker, args=(2, str(tmp_path / "init"), True, results), nprocs=2)
    for impl in ("torch", "kernel"):
        for rank in range(2):
            loss, grad = results[rank][impl]
            torch.testing.assert_close(loss.double(), ref_loss, **TOLERANCE[torch.float32])  # same on both ranks
        grad = torch.cat([results[rank][impl][1] for rank in range(2)], dim=1)
        torch.testing.assert_close(grad.double(), ref_grad, **TOLERANCE[torch.float32])


def test_with_length_weights_equals_weighted_loss_of_plain_ce(impl):
    g = torch.Generator().manual_seed(3)
    loss_mask = torch.rand(4, 16, generator=g) < 0.5
    segment_ids = torch.sort(torch.randint(0, 3, (4, 16), generator=g), dim=1).values
    logits = torch.randn(4, 16, 50, generator=g)
    labels = torch.randint(0, 50, (4, 16), generator=g)
    stats = global_length_stats(response_lengths(loss_mask, segment_ids)[0], "length-weighted")
    w = token_weights(loss_mask, segment_ids, stats)
    fused = fce.vocab_parallel_weighted_cross_entropy(logits, labels, w, stats.num_tokens, impl=impl).sum()
    ce = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view(4, 16)
    torch.testing.assert_close(fused, weighted_loss(ce, w, stats))


def test_bad_arguments_are_rejected():
    logits, target, weights, _ = _problem(rows=12, vocab=10)
    with pytest.raises(ValueError, match="expected target and weights of shape"):
        fce.vocab_parallel_weighted_cross_entropy(logits, target[:3], weights[:3], 1.0)
    with pytest.raises(ValueError, match="normaliser must be > 0"):
        fce.vocab_parallel_weighted_cross_entropy(logits, target, weights, 0.0)
    with pytest.raises(ValueError, match="impl must be"):
        fce.vocab_parallel_weighted_cross_entropy(logits, target, weights, 1.0, impl="triton")


def _nvcc():
    return shutil.which("nvcc") or next((p for p in ["/usr/local/cuda/bin/nvcc"] if os.path.exists(p)), None)


@pytest.mark.skipif(_nvcc() is None, reason="nvcc not found on PATH or in /usr/local/cuda/bin")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_cuda_kernel_compiles_with_nvcc(arch, tmp_path):
    """The .cu compiles standalone (no torch headers) with the flags torch's extension builds pass to nvcc
    (``COMMON_NVCC_FLAGS``: no implicit half/bfloat16 conversions; the first GPU run failed on exactly those), so a
    broken kernel cannot land without a GPU in CI."""
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS

    assert "-D__CUDA_NO_HALF_CONVERSIONS__" in COMMON_NVCC_FLAGS
    source = fce.CSRC_DIR / "weighted_ce_kernel.cu"
    cmd = [_nvcc(), "-c", f"-arch={arch}", "-std=c++17", *COMMON_NVCC_FLAGS, f"-I{fce.CSRC_DIR}", str(source),
           "-o", str(tmp_path / f"weighted_ce_{arch}.o")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / f"weighted_ce_{arch}.o").stat().st_size > 0
