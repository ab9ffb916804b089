"""The fixes to megatron-core's code that megatron_zero depends on, and :func:`setup_megatron_core`.

Every fix is a :class:`Fix`: the megatron-core version it was written for, the condition under which megatron-core
takes the broken path (read from megatron-core itself where it keeps one), and the replacement. :func:`apply`
installs the fixes whose condition holds; a fix whose condition holds on another megatron-core version fails
loudly (:class:`~megatron_zero.platform.MegatronCoreVersionError`) instead of replacing private code it was not
written against.

| fix | condition | what goes wrong without it |
|---|---|---|
| ``distributed_optimizer_empty_state`` | no Apex/TE (torch Adam) | a rank with nothing to train cannot save |
| ``distributed_optimizer_reshardable_load`` | no Apex/TE (torch Adam) | reshardable load: KeyError 'step' |
| ``one_pass_rope`` | no CUDA | the unfused RoPE costs six full-size temporaries |

Each fix's test (``tests/test_platform.py``) shows the failure with megatron-core's original and its absence with
the fix.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from megatron_zero import platform
from megatron_zero.platform import MEGATRON_CORE_VERSION, require_version


# ---------------------------------------------------------------------------------------------------------
# The fixes
# ---------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Fix:
    name: str
    condition: str  # in words, for errors and docs
    needed: Callable[[], bool]  # does megatron-core take the broken path here?
    install: Callable[[], None]  # idempotent
    written_for: str = MEGATRON_CORE_VERSION


def _torch_adam_fallback() -> bool:
    """megatron-core's own record of "neither Transformer Engine nor Apex": its optimizer fell back to torch Adam."""
    from megatron.core.optimizer import distrib_optimizer

    return not distrib_optimizer.HAVE_APEX_OR_TE


def _mark(fn, original):
    fn._megatron_zero_patched = True
    fn._megatron_zero_original = original
    return fn


def _install_empty_distributed_optimizer_state() -> None:
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

    DistributedOptimizer.state_dict = _mark(state_dict, original)

    original_load = DistributedOptimizer.load_state_dict

    def load_state_dict(self, state_dict):
        # the other half: such a rank's saved groups carry step None, which the torch-Adam branch turns into a
        # tensor; with no state to give it to, any number will do
        groups = (state_dict.get("optimizer") or {}).get("param_groups") or []
        if groups and all(g.get("step", 0) is None for g in groups):
            for g in groups:
                g["step"] = 0
        return original_load(self, state_dict)

    DistributedOptimizer.load_state_dict = _mark(load_state_dict, original_load)


def _install_distributed_optimizer_reshardable_load() -> None:
    """Let the distributed optimizer load its fully reshardable checkpoint format with torch's Adam.

    Without apex/TE, megatron-core 0.16 falls back to ``torch.optim.Adam``, which keeps a per-parameter ``step``
    tensor in its state. ``load_parameter_state_from_fully_reshardable`` leaves ``step`` out of the tensors it
    restores (the count lives in the param groups) but ``_set_main_param_and_optimizer_states`` copies every
    state key of the destination, so loading died with ``KeyError: 'step'``. Keys the checkpoint does not carry
    are left as they are (``step`` is then set from the param group after the load, see
    ``megatron_zero.checkpointing.training_checkpoint``).
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

    DistributedOptimizer._set_main_param_and_optimizer_states = _mark(set_states, original)


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


class RotateHalfRope(torch.autograd.Function):
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


def _install_one_pass_rope() -> None:
    """megatron-core's unfused RoPE (used for both the bshd and the packed thd layout) -> :class:`RotateHalfRope`
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
        return RotateHalfRope.apply(t, cos, sin)

    rope_utils._apply_rotary_pos_emb_bshd = _mark(apply_bshd, original)


FIXES: tuple[Fix, ...] = (
    Fix("distributed_optimizer_empty_state", "no Apex/TE (megatron-core falls back to torch Adam)",
        _torch_adam_fallback, _install_empty_distributed_optimizer_state),
    Fix("distributed_optimizer_reshardable_load", "no Apex/TE (megatron-core falls back to torch Adam)",
        _torch_adam_fallback, _install_distributed_optimizer_reshardable_load),
    # A speed fix measured on CPU only (where megatron-core has no fused RoPE); never measured on a GPU.
    Fix("one_pass_rope", "no CUDA", lambda: not platform.HAVE_CUDA, _install_one_pass_rope),
)


def apply(fixes: tuple[Fix, ...] = FIXES) -> list[str]:
    """Install every fix whose condition holds here (version-guarded); returns their names. Idempotent."""
    platform.import_megatron_core()
    applied = []
    for fix in fixes:
        if fix.needed():
            require_version(f"fix {fix.name!r} (needed when: {fix.condition})", fix.written_for)
            fix.install()
            applied.append(fix.name)
    return applied


def setup_megatron_core() -> list[str]:
    """Make megatron-core ready for this machine: imported (:func:`megatron_zero.platform.import_megatron_core`),
    the CPU shims without CUDA (:mod:`megatron_zero.platform.cpu`), and the fixes whose conditions hold here.
    Idempotent; returns the names of the fixes in place."""
    from megatron_zero.platform import cpu

    platform.import_megatron_core()
    if not platform.HAVE_CUDA:
        cpu.install()
    return apply()
