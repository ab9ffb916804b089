"""The essential shims that let megatron-core (GPU-only as shipped) run on CPU over ``gloo``; only without CUDA.

:func:`install` maps the handful of ``torch.cuda`` entry points that megatron-core calls unconditionally onto
their CPU equivalents:

* ``torch.cuda.current_device`` -> ``torch.device("cpu")``, ``synchronize`` / ``nvtx`` push/pop -> no-ops;
* the CUDA RNG (``get_rng_state``/``set_rng_state``/``manual_seed``, also in ``torch.cuda.random`` and
  megatron's private ``_set_cuda_rng_state``) -> the CPU default generator, so megatron's RNG tracker forks
  and restores the generator that CPU kernels (dropout, init) really draw from;
* ``Tensor.cuda()`` -> identity, factory calls with ``device="cuda"`` -> CPU (a ``TorchFunctionMode``);
* ``Tensor.type()`` -> ``"torch.cuda.FloatTensor"``-style strings, but only inside the three megatron-core
  optimizer functions that compare against them (:data:`CUDA_TYPE_NAME_USERS`); everywhere else (any other
  library in the process) ``Tensor.type()`` is torch's own;
* megatron-core's warnings that mean nothing on CPU (the CPU RNG "changed", ``CUDA_DEVICE_MAX_CONNECTIONS``
  advice for GPU communication overlap) are filtered.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import warnings

import torch

from megatron_zero import platform

_INSTALLED = False
# (module, attribute) of the megatron-core functions that check ``tensor.type() == "torch.cuda.FloatTensor"``
# (``clip_grad_by_total_norm_fp32`` as bound in the module that calls it).
CUDA_TYPE_NAME_USERS = (
    ("megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer.__init__"),
    ("megatron.core.optimizer.optimizer", "Float16OptimizerWithFloat16Params.__init__"),
    ("megatron.core.optimizer.optimizer", "clip_grad_by_total_norm_fp32"),
)


class _CudaToCpuMode(torch.overrides.TorchFunctionMode):
    """Rewrites ``device="cuda"`` (``torch.device("cuda", i)`` or a bare index) in any torch call to the CPU."""

    @staticmethod
    def _is_cuda(dev) -> bool:
        if isinstance(dev, int) and not isinstance(dev, bool):  # a bare index means a CUDA device
            return True
        if isinstance(dev, str):
            return dev.startswith("cuda")
        if isinstance(dev, torch.device):
            return dev.type == "cuda"
        return False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs and self._is_cuda(kwargs["device"]):
            kwargs["device"] = "cpu"
        if func in (torch.Tensor.to,) and args and len(args) > 1 and self._is_cuda(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


def _cpu_tensor_type(orig_type):
    @functools.wraps(orig_type)
    def tensor_type(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None:
            name = orig_type(self)
            # "torch.FloatTensor" -> "torch.cuda.FloatTensor": optimizer code checks for CUDA types.
            return name.replace("torch.", "torch.cuda.", 1) if not name.startswith("torch.cuda.") else name
        if isinstance(dtype, str):
            dtype = dtype.replace("torch.cuda.", "torch.")
        return orig_type(self, dtype, non_blocking, **kwargs)

    return tensor_type


@contextlib.contextmanager
def cuda_type_names():
    """Within this block ``Tensor.type()`` names CPU tensors as CUDA ones (``torch.cuda.FloatTensor``)."""
    original = torch.Tensor.type
    torch.Tensor.type = _cpu_tensor_type(original)
    try:
        yield
    finally:
        torch.Tensor.type = original


def _with_cuda_type_names(fn):
    if getattr(fn, "_megatron_zero_patched", False):
        return fn

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with cuda_type_names():
            return fn(*args, **kwargs)

    wrapped._megatron_zero_patched = True
    return wrapped


def _scope_cuda_type_names() -> None:
    import importlib

    for module_name, qualname in CUDA_TYPE_NAME_USERS:
        owner = importlib.import_module(module_name)
        *path, attr = qualname.split(".")
        for part in path:
            owner = getattr(owner, part)
        setattr(owner, attr, _with_cuda_type_names(getattr(owner, attr)))


class _NoopNvtx:
    @staticmethod
    def range_push(*_a, **_k):
        return 0

    @staticmethod
    def range_pop(*_a, **_k):
        return 0

    @staticmethod
    def mark(*_a, **_k):
        return None


def install() -> bool:
    """Patch the ``torch.cuda`` entry points used by megatron-core so it runs on CPU. No-op with CUDA.

    Returns True when the layer is (now) active. Idempotent.
    """
    global _INSTALLED
    if platform.HAVE_CUDA:
        return False
    if _INSTALLED:
        return True
    platform.import_megatron_core()
    platform.silence_fallback_warnings()
    # TP communication-overlap advice for GPUs (megatron-core's tensor_parallel.layers); no such overlap on CPU
    warnings.filterwarnings("ignore", message=r".*CUDA_DEVICE_MAX_CONNECTIONS")

    def set_rng_state(state, device="cuda"):
        torch.set_rng_state(state)

    def get_rng_state(device="cuda"):
        return torch.get_rng_state()

    def manual_seed(seed):
        torch.default_generator.manual_seed(int(seed))

    cuda = torch.cuda
    # A device object, not an index: ``device=torch.cuda.current_device()`` must mean the CPU even where the
    # function mode below is not active (autograd's backward of megatron's custom Functions).
    cuda.current_device = lambda: torch.device("cpu")
    cuda.device_count = lambda: 0
    cuda.synchronize = lambda *a, **k: None
    cuda.get_rng_state = get_rng_state
    cuda.set_rng_state = set_rng_state
    cuda.manual_seed = manual_seed
    cuda.manual_seed_all = manual_seed
    cuda.random.get_rng_state = get_rng_state
    cuda.random.set_rng_state = set_rng_state
    cuda.random.manual_seed = manual_seed
    cuda.nvtx.range_push = _NoopNvtx.range_push
    cuda.nvtx.range_pop = _NoopNvtx.range_pop
    cuda.nvtx.mark = _NoopNvtx.mark
    cuda.empty_cache = lambda: None
    cuda.memory_allocated = lambda *a, **k: 0
    cuda.max_memory_allocated = lambda *a, **k: 0
    cuda.memory_reserved = lambda *a, **k: 0
    cuda.max_memory_reserved = lambda *a, **k: 0
    torch.Tensor.cuda = lambda self, *a, **k: self

    # Private megatron-core code from here on: the version it was written for, or a loud error.
    platform.require_version("CPU shim of megatron-core's optimizer type checks and RNG setter")
    _scope_cuda_type_names()
    # Megatron-core's private RNG setter goes through torch.cuda._lazy_call, which never runs on CPU.
    from megatron.core.tensor_parallel import random as mcore_random

    mcore_random._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state)
    # On CPU the "CUDA" generator *is* the CPU generator, so this warning is expected and meaningless.
    logging.getLogger(mcore_random.__name__).addFilter(
        lambda record: "CPU RNG state changed" not in record.getMessage()
    )

    mode = _CudaToCpuMode()
    mode.__enter__()  # stays active for the life of the process

    _INSTALLED = True
    return True
