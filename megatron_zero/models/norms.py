"""Normalisation layers for megatron-core's local (non-TE) spec that also work with sequence parallelism.

megatron-core's ``WrappedTorchNorm`` (its fallback without apex/TE) refuses sequence parallelism. These
layers compute the same function as ``torch.nn.RMSNorm`` / ``torch.nn.LayerNorm`` (same state-dict names) and
mark their parameters ``sequence_parallel`` so megatron's ``finalize_model_grads`` all-reduces their
gradients over the tensor-parallel group, as it does for TE's norms.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class Norm(torch.nn.Module):
    """``config.normalization`` ("RMSNorm" or "LayerNorm") over the last dimension, megatron spec signature."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_unused):
        super().__init__()
        self.kind = config.normalization
        if self.kind not in ("RMSNorm", "LayerNorm"):
            raise ValueError(f"unsupported normalization {self.kind!r} (RMSNorm or LayerNorm)")
        self.hidden_size, self.eps = hidden_size, eps
        dtype = getattr(config, "params_dtype", torch.float32)
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=dtype))
        self.bias = torch.nn.Parameter(torch.zeros(hidden_size, dtype=dtype)) if self.kind == "LayerNorm" else None
        for p in self.parameters():
            setattr(p, "sequence_parallel", bool(getattr(config, "sequence_parallel", False)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "RMSNorm":
            return F.rms_norm(x, (self.hidden_size,), self.weight, self.eps)
        return F.layer_norm(x, (self.hidden_size,), self.weight, self.bias, self.eps)
