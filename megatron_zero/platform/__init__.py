"""What this machine can do, and the one call that prepares megatron-core for it.

The package has three parts:

* this module, capability detection: ``HAVE_CUDA``, ``HAVE_TE`` (Transformer Engine), ``HAVE_FLASH_ATTN``,
  ``HAVE_APEX``, ``HAVE_DALI``; :func:`distributed_backend` (``nccl`` on GPU, ``gloo`` on CPU), :func:`device`,
  :func:`summary`. Importing it changes nothing.
* :mod:`megatron_zero.platform.cpu`: the essential shims that let megatron-core (GPU-only as shipped) run on CPU.
* :mod:`megatron_zero.platform.mcore_fixes`: importing megatron-core, and the fixes to its code, each gated on the
  condition of its bug and guarded by the megatron-core version it was written for.

:func:`import_megatron_core` (entry points call it first, through :func:`megatron_zero.errors.run_main`) and
:func:`setup_megatron_core` (called by :func:`megatron_zero.parallel.initialize.initialize_parallel` and the
few paths that use megatron-core without it) are the only places any of it is applied.
"""
from __future__ import annotations

import importlib.util
import os

import torch

__all__ = [
    "HAVE_CUDA",
    "HAVE_TE",
    "HAVE_FLASH_ATTN",
    "HAVE_APEX",
    "HAVE_DALI",
    "distributed_backend",
    "device",
    "import_megatron_core",
    "setup_megatron_core",
    "summary",
]


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


HAVE_CUDA: bool = torch.cuda.is_available()
# TE, flash-attn and apex can only be used with a GPU: on CPU they are reported absent even if importable.
HAVE_TE: bool = HAVE_CUDA and _importable("transformer_engine")
HAVE_FLASH_ATTN: bool = HAVE_CUDA and _importable("flash_attn")
HAVE_APEX: bool = HAVE_CUDA and _importable("apex")
HAVE_DALI: bool = _importable("nvidia.dali")


def distributed_backend() -> str:
    """``nccl`` with CUDA, ``gloo`` without (overridable with ``MEGATRON_ZERO_BACKEND``)."""
    return os.environ.get("MEGATRON_ZERO_BACKEND", "nccl" if HAVE_CUDA else "gloo")


def device() -> torch.device:
    """The device this process computes on (the local GPU under torchrun, else the CPU)."""
    if HAVE_CUDA:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def summary() -> str:
    """One line describing the accelerator stack, printed at start-up by the tools."""
    parts = [f"torch {torch.__version__}", "cuda" if HAVE_CUDA else "cpu"]
    for name, ok in (("te", HAVE_TE), ("flash-attn", HAVE_FLASH_ATTN), ("apex", HAVE_APEX), ("dali", HAVE_DALI)):
        parts.append(f"{name}={'yes' if ok else 'no'}")
    return ", ".join(parts)


def import_megatron_core() -> None:
    """Import megatron-core the fast and quiet way (see :func:`megatron_zero.platform.mcore_fixes.import_megatron_core`).
    No-op once it is imported."""
    from megatron_zero.platform import mcore_fixes

    mcore_fixes.import_megatron_core()


def setup_megatron_core() -> None:
    """Make megatron-core ready for this machine: imported (as :func:`import_megatron_core`), the CPU shims without
    CUDA, and the fixes whose conditions hold here. Idempotent."""
    from megatron_zero.platform import cpu, mcore_fixes

    mcore_fixes.import_megatron_core()
    if not HAVE_CUDA:
        cpu.install()
    mcore_fixes.apply()
