"""megatron_zero.platform: importing the package changes nothing; each megatron-core fix is needed (megatron-core's
original fails the test's case) and works (the fixed version passes it); the version guard fails loudly; the CPU
shims stay in their scope; megatron-core's CPU-meaningless warnings do not reach users."""
import types

import pytest
import torch

from megatron_zero import platform
from megatron_zero.platform import mcore_fixes
from tests.conftest import run_cli, subprocess_env

pytestmark = pytest.mark.skipif(platform.HAVE_CUDA, reason="the CPU conditions of the fixes and shims")


@pytest.fixture(scope="module", autouse=True)
def _setup():
    mcore_fixes.setup_megatron_core()


def _python(code: str, env: dict | None = None):
    """``python -c code`` in a fresh process (the test environment unless ``env``); it must exit 0."""
    proc = run_cli(["-c", code], env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc


def _original(fn):
    assert getattr(fn, "_megatron_zero_patched", False), f"{fn} is not megatron_zero's fix"
    return fn._megatron_zero_original


def test_importing_megatron_zero_changes_nothing():
    code = ("import sys, torch; compile_, type_, cur = torch.compile, torch.Tensor.type, torch.cuda.current_device\n"
            "import megatron_zero, megatron_zero.platform, megatron_zero.errors\n"
            "assert 'megatron.core' not in sys.modules, 'megatron.core imported'\n"
            "assert (torch.compile, torch.Tensor.type, torch.cuda.current_device) == (compile_, type_, cur)\n"
            "assert torch.randn(1).type() == 'torch.FloatTensor'\n")
    _python(code)


def test_fixes_applied_here_are_the_cpu_ones():
    assert {f.name for f in mcore_fixes.FIXES if f.needed()} == {
        "distributed_optimizer_empty_state", "distributed_optimizer_reshardable_load", "one_pass_rope"}


def test_fix_version_guard_fails_loudly_on_another_megatron_core(monkeypatch):
    monkeypatch.setattr(platform, "megatron_core_version", lambda: "0.99.0")
    installed = []
    fix = mcore_fixes.Fix("probe", "always", lambda: True, lambda: installed.append(1))
    with pytest.raises(platform.MegatronCoreVersionError, match=r"written for megatron-core 0\.16\.1.*0\.99\.0"):
        mcore_fixes.apply((fix,))
    assert not installed
    # a fix whose condition does not hold here is neither checked nor installed
    assert mcore_fixes.apply((mcore_fixes.Fix("probe", "never", lambda: False, lambda: installed.append(1)),)) == []


def test_fix_distributed_optimizer_empty_state():
    """A rank with nothing to train (no Adam state yet) can produce its optimizer state dict."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    p = torch.nn.Parameter(torch.zeros(2))
    rank = types.SimpleNamespace(optimizer=torch.optim.Adam([p]), grad_scaler=None)
    with pytest.raises(AssertionError):
        _original(DistributedOptimizer.state_dict)(rank)
    sd = DistributedOptimizer.state_dict(rank)
    assert [g["step"] for g in sd["optimizer"]["param_groups"]] == [None]
    assert "params" not in sd["optimizer"]["param_groups"][0]


def test_fix_distributed_optimizer_reshardable_load():
    """torch Adam's per-parameter ``step`` is not in the reshardable format's tensors: the load leaves it alone."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    main = torch.nn.Parameter(torch.zeros(3))
    adam = torch.optim.Adam([main])
    main.grad = torch.ones(3)
    adam.step()
    model_param = object()
    opt = types.SimpleNamespace(optimizer=adam, model_param_group_index_map={model_param: (0, 0)},
                                config=types.SimpleNamespace(use_precision_aware_optimizer_no_fp8_or_ds_fp8=False))
    tensors = {"param": torch.full((3,), 2.0), "exp_avg": torch.full((3,), 3.0), "exp_avg_sq": torch.full((3,), 4.0),
               "padding": torch.zeros(1)}
    with torch.no_grad():  # as megatron-core's loader calls it
        with pytest.raises(KeyError, match="step"):
            _original(DistributedOptimizer._set_main_param_and_optimizer_states)(opt, model_param, tensors)
        DistributedOptimizer._set_main_param_and_optimizer_states(opt, model_param, tensors)
    state = adam.state[main]
    assert main.tolist() == [2.0] * 3 and state["exp_avg"].tolist() == [3.0] * 3
    assert state["exp_avg_sq"].tolist() == [4.0] * 3 and float(state["step"]) == 1.0


def test_fix_one_pass_rope():
    """One autograd node per RoPE call instead of megatron-core's chain of temporaries, same values
    (values and gradients in detail: tests/test_llama_model.py)."""
    from megatron.core.models.common.embeddings import rope_utils

    t = torch.randn(5, 2, 3, 8, requires_grad=True)
    freqs = torch.randn(5, 1, 1, 8)
    out = rope_utils._apply_rotary_pos_emb_bshd(t, freqs)
    ref = _original(rope_utils._apply_rotary_pos_emb_bshd)(t, freqs)
    torch.testing.assert_close(out, ref)
    assert type(out.grad_fn).__name__ == "RotateHalfRopeBackward"
    assert type(ref.grad_fn).__name__ != "RotateHalfRopeBackward"


def test_cpu_type_names_are_scoped_to_megatron_core_optimizer_checks():
    """megatron-core's fp32 grad clipping asserts ``grad.type() == 'torch.cuda.FloatTensor'``: it passes on CPU,
    while every other caller of ``Tensor.type()`` sees torch's own answer."""
    from megatron.core.optimizer import optimizer as mcore_optimizer

    p = torch.nn.Parameter(torch.ones(4))
    p.grad = torch.full((4,), 10.0)
    assert p.grad.type() == "torch.FloatTensor"
    with pytest.raises(AssertionError):
        mcore_optimizer.clip_grad_by_total_norm_fp32.__wrapped__([p], max_norm=1.0, total_norm=20.0)
    mcore_optimizer.clip_grad_by_total_norm_fp32([p], max_norm=1.0, total_norm=20.0)
    assert p.grad[0].item() == pytest.approx(10.0 / 20.0, rel=1e-4)
    assert p.grad.type() == "torch.FloatTensor"


def test_megatron_core_cpu_warnings_do_not_reach_users():
    """What a user's process prints (stderr): no "full scope is deprecated" from each TransformerConfig, no
    CUDA_DEVICE_MAX_CONNECTIONS advice (raised by megatron-core's TP linear layers), no Apex/TE fallback notes."""
    code = ("import warnings\n"
            "from megatron_zero.platform import mcore_fixes\n"
            "mcore_fixes.setup_megatron_core()\n"
            "from megatron_zero.models.llama import RuntimeOptions, transformer_config\n"
            "from megatron_zero.models.llama_config import LlamaConfig\n"
            "cfg = LlamaConfig(num_layers=2, hidden_size=16, ffn_hidden_size=32, num_attention_heads=2,\n"
            "                  num_query_groups=2, vocab_size=32, max_position_embeddings=16)\n"
            "transformer_config(cfg, RuntimeOptions())\n"
            "import megatron.core.optimizer, megatron.core.models.gpt.gpt_layer_specs\n"
            "warnings.warn('When using async grad allreduce it is recommended to set the environment variable '\n"
            "              'CUDA_DEVICE_MAX_CONNECTIONS to 1 for maximum speedup')\n"
            "warnings.warn('the probe')\n")
    # as a user runs it: the test environment's PYTHONWARNINGS=ignore would hide everything
    proc = _python(code, env={k: v for k, v in subprocess_env().items() if k != "PYTHONWARNINGS"})
    assert "the probe" in proc.stderr  # warnings do reach stderr
    for noise in ("full scope is deprecated", "CUDA_DEVICE_MAX_CONNECTIONS", "Apex is not installed",
                  "Transformer Engine and Apex"):
        assert noise not in proc.stderr
