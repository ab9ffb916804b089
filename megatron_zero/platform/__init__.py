"""What this machine can do, and the one call that prepares megatron-core for it.

The package has three parts:

* this module, capability detection: ``HAVE_CUDA``, ``HAVE_TE`` (Transformer Engine), ``HAVE_FLASH_ATTN``,
  ``HAVE_APEX``, ``HAVE_DALI``; :func:`distributed_backend` (``nccl`` on GPU, ``gloo`` on CPU), :func:`device`,
  :func:`summary`; the installed megatron-core's version and the guard :func:`require_version`;
  :func:`import_megatron_core` (entry points call it first, through :func:`megatron_zero.errors.run_main`).
  Importing the module changes nothing.
* :mod:`megatron_zero.platform.cpu`: the essential shims that let megatron-core (GPU-only as shipped) run on CPU.
* :mod:`megatron_zero.platform.mcore_fixes`: the fixes to megatron-core's code, each gated on the condition of
  its bug and guarded by the megatron-core version it was written for; and
  :func:`~megatron_zero.platform.mcore_fixes.setup_megatron_core` (import + CPU shims + fixes), called by
  :func:`megatron_zero.parallel.initialize.initialize_parallel` and the few paths that use megatron-core
  without it.
"""
from __future__ import annotations

import functools
import importlib.util
import os
import sys
import warnings

from typing import Optional

import torch

__all__ = [
    "HAVE_CUDA",
    "HAVE_TE",
    "HAVE_FLASH_ATTN",
    "HAVE_APEX",
    "HAVE_DALI",
    "distributed_backend",
    "device",
    "die_with_parent",
    "import_megatron_core",
    "megatron_core_version",
    "require_version",
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


def die_with_parent(sig: int, parent: Optional[int] = None) -> bool:
    """Ask the kernel (Linux ``PR_SET_PDEATHSIG``) to send ``sig`` to this process when its parent dies, and send it
    now if the parent already died before the request (re-parented: ``getppid()`` is no longer ``parent``, or is
    1). For helper processes of a rank (checkpoint writers, their results Manager) and ranks under a launcher.
    False where the request is not possible (not Linux)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, int(sig), 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return False
    ppid = os.getppid()
    if ppid == 1 or (parent is not None and ppid != parent):
        os.kill(os.getpid(), sig)
    return True


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


# ---------------------------------------------------------------------------------------------------------
# megatron-core: its version, and importing it
# ---------------------------------------------------------------------------------------------------------
MEGATRON_CORE_VERSION = "0.16.1"


class MegatronCoreVersionError(RuntimeError):
    """A fix to megatron-core's private code meets a megatron-core version it was not written for."""


def megatron_core_version() -> str:
    from megatron.core import package_info

    return package_info.__version__


def require_version(what: str, written_for: str = MEGATRON_CORE_VERSION) -> None:
    """Raise unless the installed megatron-core is the version ``what`` was written for."""
    found = megatron_core_version()
    if found != written_for:
        raise MegatronCoreVersionError(
            f"megatron_zero's {what} replaces private megatron-core code written for megatron-core {written_for}, "
            f"but megatron-core {found} is installed: install megatron-core=={written_for} (setup.py pins it), "
            f"or check that megatron-core {found} still needs it and update megatron_zero.platform"
        )


# ---------------------------------------------------------------------------------------------------------
# Importing megatron-core
# ---------------------------------------------------------------------------------------------------------
def _lazy_compile(real_compile):
    """``torch.compile`` that compiles on the first call instead of at decoration: megatron-core decorates its
    fusions with ``torch.compile`` at import time, which imports dynamo and inductor (seconds) even in runs that
    never call a fused kernel."""

    def compile_(model=None, **kwargs):
        if model is None:
            return lambda fn: compile_(fn, **kwargs)
        compiled = None

        @functools.wraps(model)
        def call(*args, **kw):
            nonlocal compiled
            if compiled is None:
                compiled = real_compile(model, **kwargs)
            return compiled(*args, **kw)

        return call

    return compile_


def silence_fallback_warnings() -> None:
    """Without a GPU megatron-core's fallback to its local implementations is expected: not worth a warning."""
    for msg in ("Transformer Engine and Apex are not installed", "Apex is not installed"):
        warnings.filterwarnings("ignore", message=msg)


def import_megatron_core() -> None:
    """Import ``megatron.core`` without its optional wandb hook (megatron's wandb logging is not used here; wandb's
    own import costs ~3 s per process) and with its import-time ``torch.compile`` decorations made lazy. Every
    process (tool, torchrun rank, test worker) pays megatron-core's import once; this halves it. wandb stays
    importable afterwards for whoever uses it (lmms-eval). ``torch.compile`` is itself again afterwards."""
    if "megatron.core" in sys.modules:
        return
    blocked = "wandb" not in sys.modules
    if blocked:
        sys.modules["wandb"] = None  # makes ``import wandb`` raise ImportError: megatron's try/except skips it
    if not HAVE_CUDA:
        silence_fallback_warnings()
    real_compile = torch.compile
    torch.compile = _lazy_compile(real_compile)
    try:
        import megatron.core  # noqa: F401
    finally:
        torch.compile = real_compile
        if blocked and sys.modules.get("wandb", 0) is None:
            del sys.modules["wandb"]
