"""What this machine can do, and the CPU compatibility layer for megatron-core.

One module answers "which accelerator stack is here?" for the whole project:

* ``HAVE_CUDA``, ``HAVE_TE`` (Transformer Engine), ``HAVE_FLASH_ATTN``, ``HAVE_APEX``, ``HAVE_DALI``;
* :func:`distributed_backend` picks ``nccl`` on GPU and ``gloo`` on CPU;
* :func:`install_cpu_compat` makes megatron-core (GPU-only as shipped) run on CPU over ``gloo``.

The compatibility layer is active only without CUDA. It maps the handful of ``torch.cuda`` entry points that
megatron-core calls unconditionally onto their CPU equivalents:

* ``torch.cuda.current_device`` -> ``torch.device("cpu")``, ``synchronize`` / ``nvtx`` push/pop -> no-ops;
* the CUDA RNG (``get_rng_state``/``set_rng_state``/``manual_seed``, also in ``torch.cuda.random`` and
  megatron's private ``_set_cuda_rng_state``) -> the CPU default generator, so megatron's RNG tracker forks
  and restores the generator that CPU kernels (dropout, init) really draw from;
* ``Tensor.cuda()`` -> identity, factory calls with ``device="cuda"`` -> CPU (a ``TorchFunctionMode``);
* ``Tensor.type()`` -> ``"torch.cuda.FloatTensor"``-style strings, which optimizer code compares against.
"""
from __future__ import annotations

import functools
import importlib.util
import logging
import os
import warnings

import torch

__all__ = [
    "HAVE_CUDA",
    "HAVE_TE",
    "HAVE_FLASH_ATTN",
    "HAVE_APEX",
    "HAVE_DALI",
    "distributed_backend",
    "device",
    "install_cpu_compat",
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


# ---------------------------------------------------------------------------------------------------------
# Start-up time: importing megatron-core
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


def _silence_fallback_warnings() -> None:
    """Without a GPU megatron-core's fallback to its local implementations is expected: not worth a warning."""
    for msg in ("Transformer Engine and Apex are not installed", "Apex is not installed"):
        warnings.filterwarnings("ignore", message=msg)


def import_megatron_core() -> None:
    """Import ``megatron.core`` without its optional wandb hook (megatron's wandb logging is not used here; wandb's
    own import costs ~3 s per process) and with its import-time ``torch.compile`` decorations made lazy. Every
    process (tool, torchrun rank, test worker) pays megatron-core's import once; this halves it. wandb stays
    importable afterwards for whoever uses it (lmms-eval)."""
    import sys

    if "megatron.core" in sys.modules:
        return
    blocked = "wandb" not in sys.modules
    if blocked:
        sys.modules["wandb"] = None  # makes ``import wandb`` raise ImportError: megatron's try/except skips it
    if not HAVE_CUDA:
        _silence_fallback_warnings()
    real_compile = torch.compile
    torch.compile = _lazy_compile(real_compile)
    try:
        import megatron.core  # noqa: F401
    finally:
        torch.compile = real_compile
        if blocked and sys.modules.get("wandb", 0) is None:
            del sys.modules["wandb"]


# ---------------------------------------------------------------------------------------------------------
# CPU compatibility layer for megatron-core
# ---------------------------------------------------------------------------------------------------------
_INSTALLED = False


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


def _patch_empty_distributed_optimizer_state() -> None:
    """Without Apex/TE, ``DistributedOptimizer.state_dict`` reads Adam's step from the per-parameter state and
    asserts there is exactly one value; a rank with nothing to train (a frozen pipeline stage, normal in stage 2)
    has no state at all. Such a rank's state dict gets no step (``None``), as the TE/Apex branch already does."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer.state_dict
    if getattr(original, "_megatron_zero_patched", False):
        return

    def state_dict(self):
        inner = getattr(self, "optimizer", None)
        if inner is None or len(inner.state) > 0:
            return original(self)
        inner_state = inner.state_dict()
        out = {"optimizer": {k: v for k, v in inner_state.items() if k != "state"}}
        for group in out["optimizer"]["param_groups"]:
            del group["params"]
            group["step"] = None
        if self.grad_scaler:
            out["grad_scaler"] = self.grad_scaler.state_dict()
        return out

    state_dict._megatron_zero_patched = True
    DistributedOptimizer.state_dict = state_dict

    original_load = DistributedOptimizer.load_state_dict

    def load_state_dict(self, state_dict):
        # the other half: such a rank's saved groups carry step None, which the torch-Adam branch turns into a
        # tensor; with no state to give it to, any number will do
        groups = (state_dict.get("optimizer") or {}).get("param_groups") or []
        if groups and all(g.get("step", 0) is None for g in groups):
            for g in groups:
                g["step"] = 0
        return original_load(self, state_dict)

    DistributedOptimizer.load_state_dict = load_state_dict


def _patch_distributed_optimizer_reshardable_load() -> None:
    """Let the distributed optimizer load its fully reshardable checkpoint format with torch's Adam.

    Without apex/TE, megatron-core 0.16 falls back to ``torch.optim.Adam``, which keeps a per-parameter ``step``
    tensor in its state. ``load_parameter_state_from_fully_reshardable`` leaves ``step`` out of the tensors it
    restores (the count lives in the param groups) but ``_set_main_param_and_optimizer_states`` copies every
    state key of the destination, so loading died with ``KeyError: 'step'``. Keys the checkpoint does not carry
    are left as they are (``step`` is then set from the param group after the load, see
    ``megatron_zero.training.checkpoint``).
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer._set_main_param_and_optimizer_states
    if getattr(original, "_megatron_zero_patched", False):
        return

    def set_states(self, model_param, tensors):
        if self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            return original(self, model_param, tensors)
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        dst = {"param": main_param, **self.optimizer.state[main_param]}
        for key, value in tensors.items():
            if key == "padding":  # the DP-reshardable format's bookkeeping, not optimizer state
                continue
            if key not in dst:
                raise KeyError(f"optimizer state {key!r} in the checkpoint is not in this optimizer")
            dst[key].copy_(value)

    set_states._megatron_zero_patched = True
    DistributedOptimizer._set_main_param_and_optimizer_states = set_states


def _rotate_halves(x, cos, sin_first, sin_second, sign: float):
    """``[x1 * cos1 + sign * x2 * sin_first, x2 * cos2 - sign * x1 * sin_second]`` (halves of the last dim)."""
    h = x.shape[-1] // 2
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    x1, x2, o1, o2 = x[..., :h], x[..., h:], out[..., :h], out[..., h:]
    torch.mul(x1, cos[..., :h], out=o1)
    o1.addcmul_(x2, sin_first, value=sign)
    torch.mul(x2, cos[..., h:], out=o2)
    o2.addcmul_(x1, sin_second, value=-sign)
    return out


class _RotateHalfRope(torch.autograd.Function):
    """RoPE in megatron's default (non-interleaved) layout, ``t * cos + rotate_half(t) * sin`` with
    ``rotate_half(t) = [-t2, t1]``, written as two multiply-adds per half into one output, and its transpose as
    the backward. megatron-core's unfused CPU version builds ``rotate_half`` with a negation and a concatenation,
    then concatenates an empty pass-through part: six full-size temporaries and their autograd nodes per call,
    twice per layer. Same arithmetic, one pass."""

    @staticmethod
    def forward(ctx, t, cos, sin):
        h = t.shape[-1] // 2
        ctx.save_for_backward(cos, sin)
        return _rotate_halves(t, cos, sin[..., :h], sin[..., h:], -1.0)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        h = grad.shape[-1] // 2
        return _rotate_halves(grad, cos, sin[..., h:], sin[..., :h], 1.0), None, None


def _patch_rope() -> None:
    """megatron-core's unfused RoPE (used for both the bshd and the packed thd layout) -> :class:`_RotateHalfRope`
    where it applies (non-interleaved, no MLA reordering, rotary dim = head dim); the original otherwise."""
    from megatron.core.models.common.embeddings import rope_utils

    original = rope_utils._apply_rotary_pos_emb_bshd
    if getattr(original, "_megatron_zero_patched", False):
        return

    def apply_bshd(t, freqs, rotary_interleaved=False, multi_latent_attention=False, mscale=1.0):
        if rotary_interleaved or multi_latent_attention or freqs.shape[-1] != t.shape[-1] or t.shape[-1] % 2:
            return original(t, freqs, rotary_interleaved=rotary_interleaved,
                             multi_latent_attention=multi_latent_attention, mscale=mscale)
        cos = (torch.cos(freqs) * mscale).to(t.dtype)
        sin = (torch.sin(freqs) * mscale).to(t.dtype)
        return _RotateHalfRope.apply(t, cos, sin)

    apply_bshd._megatron_zero_patched = True
    rope_utils._apply_rotary_pos_emb_bshd = apply_bshd


def install_cpu_compat() -> bool:
    """Patch ``torch.cuda`` entry points used by megatron-core so it runs on CPU. No-op with CUDA.

    Returns True when the layer is (now) active. Idempotent.
    """
    global _INSTALLED
    if HAVE_CUDA:
        return False
    if _INSTALLED:
        return True
    _silence_fallback_warnings()

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
    torch.Tensor.type = _cpu_tensor_type(torch.Tensor.type)

    # Megatron-core's private RNG setter goes through torch.cuda._lazy_call, which never runs on CPU.
    from megatron.core.tensor_parallel import random as mcore_random

    mcore_random._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state)
    # On CPU the "CUDA" generator *is* the CPU generator, so this warning is expected and meaningless.
    logging.getLogger(mcore_random.__name__).addFilter(
        lambda record: "CPU RNG state changed" not in record.getMessage()
    )

    _patch_empty_distributed_optimizer_state()
    _patch_distributed_optimizer_reshardable_load()
    _patch_rope()

    mode = _CudaToCpuMode()
    mode.__enter__()  # stays active for the life of the process

    _INSTALLED = True
    return True
