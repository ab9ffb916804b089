"""Weighted cross-entropy over a vocab-parallel logits shard, fused forward and backward.

Each tensor-parallel (TP) rank holds the logits of its slice of the vocabulary, ``[..., shard_vocab]`` with ids
``[vocab_start, vocab_start + shard_vocab)`` (Megatron's layout: ``vocab_start = tp_rank * shard_vocab``). Per token
``t`` with target ``y_t``, loss weight ``w_t`` and a global normaliser ``n`` (see
:mod:`megatron_zero.loss.length_weighted`), :func:`vocab_parallel_weighted_cross_entropy` returns

    loss_t = w_t * (logsumexp_v x_tv - x_t,y_t) / n          (0 where w_t == 0)

with three steps, as megatron's ``vocab_parallel_cross_entropy``: the local row max (all-reduce MAX over the TP
group), the local sum of ``exp(x - max)`` and the target logit picked by the shard that owns it (one all-reduce SUM
of both), then ``lse = max + log(sum)``. The backward pass needs no communication:
``d loss_t / d x_tv = g_t * w_t / n * (exp(x_tv - lse_t) - [v == y_t])``.

Memory: neither direction materialises a softmax. Forward keeps only O(rows) statistics (the logits themselves are
saved, not copied); backward writes the gradient, one shard-sized tensor, directly. The compiled kernels (``csrc/``)
stream over each row in float32 registers, whatever the logits dtype. The pure PyTorch path works on row chunks
of at most ``chunk_elements`` float32 temporaries.

Implementations (``impl``): ``"kernel"`` calls ``torch.ops.megatron_zero.wce_*``, registered by the setup.py build
(module ``megatron_zero_kernels``, CUDA and CPU kernels) or by :func:`load_cpu_extension` (JIT, CPU kernels only)
or :func:`load_cuda_extension` (JIT with nvcc, both);
``"torch"`` is the pure PyTorch path; ``"auto"`` takes the kernel when one is registered for the logits' device.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Literal, Protocol

import torch
import torch.distributed as dist

__all__ = [
    "CSRC_DIR",
    "KernelOps",
    "TorchOps",
    "kernel_available",
    "load_cpu_extension",
    "load_cuda_extension",
    "vocab_parallel_weighted_cross_entropy",
]

CSRC_DIR = Path(__file__).resolve().parents[2] / "csrc"
SETUP_PY_MODULE = "megatron_zero_kernels"
_OP_NAMES = ("wce_row_max", "wce_sum_exp_target", "wce_logit_grad")
DEFAULT_CHUNK_ELEMENTS = 1 << 24  # float32 temporaries of the PyTorch path: 64 MiB

Impl = Literal["auto", "kernel", "torch"]


class RowOps(Protocol):
    """The three per-row steps; every statistic is float32 ``[rows]``, logits are contiguous ``[rows, shard_vocab]``."""

    def row_max(self, logits: torch.Tensor) -> torch.Tensor: ...

    def sum_exp_target(
        self, logits: torch.Tensor, global_max: torch.Tensor, target: torch.Tensor, vocab_start: int
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def logit_grad(
        self, logits: torch.Tensor, target: torch.Tensor, lse: torch.Tensor, scale: torch.Tensor, vocab_start: int
    ) -> torch.Tensor: ...


class KernelOps:
    """The compiled kernels from ``csrc/`` (``torch.ops.megatron_zero``)."""

    def row_max(self, logits):
        return torch.ops.megatron_zero.wce_row_max(logits)

    def sum_exp_target(self, logits, global_max, target, vocab_start):
        return torch.ops.megatron_zero.wce_sum_exp_target(logits, global_max, target, vocab_start)

    def logit_grad(self, logits, target, lse, scale, vocab_start):
        return torch.ops.megatron_zero.wce_logit_grad(logits, target, lse, scale, vocab_start)


class TorchOps:
    """Pure PyTorch steps over row chunks, so float32 temporaries stay below ``chunk_elements``."""

    def __init__(self, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS):
        self.chunk_elements = chunk_elements

    def _chunks(self, logits: torch.Tensor):
        rows_per_chunk = max(1, self.chunk_elements // max(1, logits.shape[1]))
        for start in range(0, logits.shape[0], rows_per_chunk):
            yield slice(start, min(start + rows_per_chunk, logits.shape[0]))

    def row_max(self, logits):
        return logits.amax(dim=1).float()

    @staticmethod
    def _local_target(target: torch.Tensor, vocab_start: int, shard_vocab: int):
        local = target - vocab_start
        in_shard = (local >= 0) & (local < shard_vocab)
        return local.clamp(0, shard_vocab - 1), in_shard

    def sum_exp_target(self, logits, global_max, target, vocab_start):
        sum_exp = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        for rows in self._chunks(logits):
            shifted = logits[rows].float() - global_max[rows, None]  # a new float32 chunk, never the logits
            sum_exp[rows] = shifted.exp_().sum(dim=1)
        local, in_shard = self._local_target(target, vocab_start, logits.shape[1])
        picked = logits.gather(1, local[:, None]).squeeze(1).float()
        return sum_exp, torch.where(in_shard, picked, torch.zeros_like(picked))

    def logit_grad(self, logits, target, lse, scale, vocab_start):
        grad = torch.empty_like(logits)
        local, in_shard = self._local_target(target, vocab_start, logits.shape[1])
        target_scale = torch.where(in_shard, scale, torch.zeros_like(scale))
        for rows in self._chunks(logits):
            if logits.dtype == torch.float32:  # compute straight into the gradient
                probs = torch.sub(logits[rows], lse[rows, None], out=grad[rows])
            else:
                probs = logits[rows].float().sub_(lse[rows, None])
            probs.exp_().mul_(scale[rows, None])
            probs.scatter_add_(1, local[rows, None], -target_scale[rows, None])  # minus the one-hot
            if probs.dtype != grad.dtype:
                grad[rows] = probs
        return grad


_OPS_FOR_IMPL: dict[str, RowOps] = {"kernel": KernelOps(), "torch": TorchOps()}


def _import_setup_py_build() -> None:
    """Import the setup.py-built extension if installed; importing it registers the kernels."""
    try:
        importlib.import_module(SETUP_PY_MODULE)
    except ImportError:
        pass


def kernel_available(device: torch.device | str) -> bool:
    """Whether compiled kernels are registered for ``device`` (after trying the setup.py build)."""
    _import_setup_py_build()
    key = "CUDA" if torch.device(device).type == "cuda" else "CPU"
    return all(
        hasattr(torch.ops.megatron_zero, name)
        and torch._C._dispatch_has_kernel_for_dispatch_key(f"megatron_zero::{name}", key)
        for name in _OP_NAMES
    )


def load_cpu_extension(build_directory: str | Path | None = None, verbose: bool = False) -> None:
    """JIT-compile and load the CPU kernels (``csrc/weighted_ce_binding.cpp`` + ``csrc/weighted_ce_cpu.cpp``).

    A no-op when the kernels are already registered (by the setup.py build or an earlier call): the op namespace
    can be defined only once per process. ``build_directory`` caches the build between processes.
    """
    if kernel_available("cpu"):
        return
    _jit_load("megatron_zero_kernels_cpu_jit", ["weighted_ce_binding.cpp", "weighted_ce_cpu.cpp"], [],
              build_directory, verbose)


def load_cuda_extension(build_directory: str | Path | None = None, verbose: bool = False) -> None:
    """JIT-compile and load the CUDA and CPU kernels (the setup.py build's sources, with ``nvcc`` through torch's
    ``cpp_extension``) for a machine where ``pip install -e .`` did not build them. Same rules as
    :func:`load_cpu_extension`; it must come before it in a process (one definition of the op namespace)."""
    if kernel_available("cuda"):
        return
    _jit_load("megatron_zero_kernels_cuda_jit", ["weighted_ce_binding.cpp", "weighted_ce_cpu.cpp",
                                                 "weighted_ce_kernel.cu"], ["-DWITH_CUDA"], build_directory, verbose)


def _jit_load(name: str, files: list[str], defines: list[str], build_directory, verbose: bool) -> None:
    from torch.utils import cpp_extension

    sources = [CSRC_DIR / f for f in files]
    missing = [str(p) for p in sources if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{name}: kernel sources not found: {missing} (expected in {CSRC_DIR})")
    if build_directory is not None:
        Path(build_directory).mkdir(parents=True, exist_ok=True)
    cpp_extension.load(
        name=name,
        sources=[str(p) for p in sources],
        extra_include_paths=[str(CSRC_DIR)],
        extra_cflags=["-O3", *defines],
        extra_cuda_cflags=["-O3", *defines],
        build_directory=None if build_directory is None else str(build_directory),
        is_python_module=False,
        verbose=verbose,
    )


def _resolve_ops(impl: Impl, device: torch.device) -> RowOps:
    if impl == "auto":
        impl = "kernel" if kernel_available(device) else "torch"
    if impl not in _OPS_FOR_IMPL:
        raise ValueError(f"vocab_parallel_weighted_cross_entropy: impl must be auto, kernel or torch, got {impl!r}")
    if impl == "kernel" and not kernel_available(device):
        raise RuntimeError(
            f"vocab_parallel_weighted_cross_entropy: impl='kernel' but no compiled kernel is registered for "
            f"{device.type}; build with MEGATRON_ZERO_BUILD_EXT=1 (setup.py) or call load_cpu_extension()"
        )
    return _OPS_FOR_IMPL[impl]


def _all_reduce(tensor: torch.Tensor, op, group: dist.ProcessGroup | None) -> None:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(tensor, op=op, group=group)


class _VocabParallelWeightedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, weights, normaliser, vocab_start, group, ops):
        shard_vocab = logits.shape[-1]
        logits_2d = logits.reshape(-1, shard_vocab).contiguous()
        target_1d = target.reshape(-1).to(torch.long).contiguous()
        weights_1d = weights.reshape(-1).to(device=logits.device, dtype=torch.float32)

        global_max = ops.row_max(logits_2d)
        _all_reduce(global_max, dist.ReduceOp.MAX, group)
        sum_exp, target_logit = ops.sum_exp_target(logits_2d, global_max, target_1d, vocab_start)
        sums = torch.stack([sum_exp, target_logit])
        _all_reduce(sums, dist.ReduceOp.SUM, group)
        lse = global_max + sums[0].log()

        scale = weights_1d / normaliser
        loss = torch.where(weights_1d != 0, (lse - sums[1]) * scale, torch.zeros_like(lse))
        ctx.save_for_backward(logits_2d, target_1d, lse, scale)
        ctx.vocab_start, ctx.ops, ctx.logits_shape = vocab_start, ops, logits.shape
        return loss.view(target.shape)

    @staticmethod
    def backward(ctx, grad_loss):
        logits_2d, target_1d, lse, scale = ctx.saved_tensors
        row_scale = (grad_loss.reshape(-1).float() * scale).contiguous()
        grad = ctx.ops.logit_grad(logits_2d, target_1d, lse, row_scale, ctx.vocab_start)
        return grad.view(ctx.logits_shape), None, None, None, None, None, None


def vocab_parallel_weighted_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    weights: torch.Tensor,
    normaliser: float,
    group: dist.ProcessGroup | None = None,
    vocab_start: int | None = None,
    impl: Impl = "auto",
) -> torch.Tensor:
    """Per-token ``weights * CE / normaliser`` over a vocab-parallel logits shard (see the module docstring).

    Args:
        logits: ``[..., shard_vocab]`` float32/float16/bfloat16, this TP rank's vocabulary slice.
        target: ``[...]`` global token ids; rows with weight 0 may hold any id (e.g. an ignore index).
        weights: ``[...]`` per-token loss weights, 0 for tokens without loss (not differentiated).
        normaliser: the global normaliser ``n`` (a positive number), e.g. the global batch's loss-token count.
        group: the TP process group; ``None`` (or a group of one) means the shard is the whole vocabulary.
        vocab_start: first vocabulary id of the shard; defaults to ``rank_in_group * shard_vocab``.
        impl: ``"auto"``, ``"kernel"`` or ``"torch"``.

    Returns:
        float32 ``[...]``, the same on every rank of the TP group; its sum is the weighted loss of these tokens.
    """
    if target.shape != logits.shape[:-1] or weights.shape != target.shape:
        raise ValueError(
            f"vocab_parallel_weighted_cross_entropy: expected target and weights of shape {tuple(logits.shape[:-1])}, "
            f"got {tuple(target.shape)} and {tuple(weights.shape)}"
        )
    if not normaliser > 0:
        raise ValueError(f"vocab_parallel_weighted_cross_entropy: normaliser must be > 0, got {normaliser}")
    if vocab_start is None:
        tp_rank = dist.get_rank(group) if group is not None and dist.get_world_size(group) > 1 else 0
        vocab_start = tp_rank * logits.shape[-1]
    ops = _resolve_ops(impl, logits.device)
    return _VocabParallelWeightedCrossEntropy.apply(
        logits, target, weights.detach(), float(normaliser), int(vocab_start), group, ops
    )
