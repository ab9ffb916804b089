"""The Llama decoder: published presets, HF config mapping, layout validation, and logits vs transformers."""
import dataclasses

import pytest
import torch

from megatron_zero.models.llama import ModelConfigError, RuntimeOptions, validate
from megatron_zero.models.llama_config import PRESETS, LlamaConfig, get_preset, padded_vocab_size
from megatron_zero.parallel.initialize import ParallelConfigError, check_world
from megatron_zero.parallel.pipeline_layout import megatron_layout, split_layers
from tests.tiny_models import hf_causal_lm

# Parameter counts of the HF releases (sum of numel over the safetensors shards).
PUBLISHED_PARAMS = {
    "llama-3.2-1b": 1_235_814_400,
    "llama-3.2-3b": 3_212_749_824,
    "llama-3.1-8b": 8_030_261_248,
    "llama-3.1-70b": 70_553_706_496,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_preset_parameter_counts_match_releases(name):
    assert get_preset(name).num_parameters() == PUBLISHED_PARAMS[name]


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_preset_parameter_count_matches_transformers(name):
    with torch.device("meta"):
        model = hf_causal_lm(PRESETS[name])
    n = sum(p.numel() for p in model.parameters())  # tied weights are counted once
    assert n == PRESETS[name].num_parameters()


def test_hf_config_round_trip():
    for cfg in PRESETS.values():
        back = LlamaConfig.from_hf_config(cfg.to_hf_config(), name=cfg.name)
        assert dataclasses.replace(back, surrogate=None) == cfg


def test_hf_config_refuses_unsupported():
    hf = PRESETS["tiny"].to_hf_config()
    with pytest.raises(ValueError, match="rope_scaling"):
        LlamaConfig.from_hf_config({**hf, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(ValueError, match="model_type"):
        LlamaConfig.from_hf_config({**hf, "model_type": "mistral"})


def test_layout_validation_messages():
    cfg = get_preset("llama-3.1-70b")
    with pytest.raises(ModelConfigError, match="--tensor-model-parallel-size 16 does not divide the 8 KV heads"):
        validate(cfg, RuntimeOptions(tensor_model_parallel_size=16))
    with pytest.raises(ModelConfigError, match="does not divide the 64 attention heads"):
        validate(cfg, RuntimeOptions(tensor_model_parallel_size=3))
    with pytest.raises(ModelConfigError, match="sequence-parallel"):
        validate(cfg, RuntimeOptions(sequence_parallel=True))
    with pytest.raises(ModelConfigError, match="sum to the model's 80 layers"):
        validate(cfg, RuntimeOptions(pipeline_model_parallel_size=2, pipeline_stage_layers=[40, 39]))
    with pytest.raises(ParallelConfigError, match="world size 6 is not divisible"):
        check_world(6, 2, 2)
    assert check_world(16, 2, 2) == 4


def test_uneven_pipeline_split():
    # T(40,78) of Llama-3.1-70B keeps 42 layers; over 4 stages the first stages take the remainder.
    assert split_layers(42, 4) == [11, 11, 10, 10]
    assert split_layers(42, 2, virtual_size=2) == [11, 11, 10, 10]
    assert split_layers(5, 2, [1, 4]) == [1, 4]
    layout = megatron_layout([2, 1])
    assert layout == [["embedding", "decoder", "decoder"], ["decoder", "loss"]]
    with pytest.raises(ValueError, match="cannot split 3 decoder layers over 4"):
        split_layers(3, 4)


def test_vocab_padding():
    assert padded_vocab_size(128256, 1) == 128256
    assert padded_vocab_size(128256, 8) == 129024
    assert padded_vocab_size(250, 2) == 256


def test_hf_config_transformers5_rope_parameters():
    """transformers >= 5 writes rope_parameters instead of rope_theta/rope_scaling."""
    cfg = PRESETS["llama-3.1-8b"]
    hf = cfg.to_hf_config()
    hf5 = {k: v for k, v in hf.items() if k not in ("rope_theta", "rope_scaling")}
    hf5["rope_parameters"] = {"rope_theta": hf["rope_theta"], **hf["rope_scaling"]}
    back = LlamaConfig.from_hf_config(hf5, name=cfg.name)
    assert back.rope_theta == 500000.0 and back.rope_scaling_factor == 8.0


def _reference_rope(t, freqs, interleaved=False):
    """RoPE as megatron-core's unfused code and HF Llama write it: t * cos + rotate_half(t) * sin."""
    if interleaved:
        x1, x2 = t[..., ::2], t[..., 1::2]
        rot = torch.stack((-x2, x1), dim=-1).flatten(-2)
    else:
        x1, x2 = t.chunk(2, dim=-1)
        rot = torch.cat((-x2, x1), dim=-1)
    return t * torch.cos(freqs) + rot * torch.sin(freqs)


@pytest.mark.parametrize("layout", ["bshd", "thd_shape", "interleaved"])
def test_cpu_rope_matches_the_reference_values_and_gradients(layout):
    """The CPU layer's one-pass RoPE (installed into megatron-core's rope_utils) gives the reference's values and
    gradients, on non-contiguous q/k views as attention passes them; the interleaved layout keeps megatron's own."""
    from megatron.core.models.common.embeddings import rope_utils

    from megatron_zero.platform import mcore_fixes

    mcore_fixes.setup_megatron_core()
    assert getattr(rope_utils._apply_rotary_pos_emb_bshd, "_megatron_zero_patched", False)
    g = torch.Generator().manual_seed(0)
    s, b, n, d = 7, 3, 4, 16
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    f = torch.outer(torch.arange(s).float(), inv)
    freqs = torch.cat((f, f), dim=-1)[:, None, None, :]  # [s, 1, 1, d], megatron's layout
    if layout == "thd_shape":  # megatron's thd RoPE calls the bshd one on [t, 1, np, hn] with per-token freqs
        b = 1
    qkv = torch.randn(s, b, 3 * n, d, generator=g).requires_grad_(True)
    t = qkv[:, :, n:2 * n]  # a strided view, like the split of a fused QKV projection
    assert not t.is_contiguous()
    t_ref = t.detach().clone().requires_grad_(True)
    interleaved = layout == "interleaved"
    out = rope_utils._apply_rotary_pos_emb_bshd(t, freqs, rotary_interleaved=interleaved)
    ref = _reference_rope(t_ref, freqs, interleaved)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    w = torch.randn(ref.shape, generator=g)
    (out * w).sum().backward()
    (ref * w).sum().backward()
    grad = qkv.grad[:, :, n:2 * n]
    torch.testing.assert_close(grad, t_ref.grad, rtol=1e-6, atol=1e-6)
    assert qkv.grad[:, :, :n].abs().max() == 0  # nothing leaks into the neighbouring heads
    # a wrong backward (the forward's rotation instead of its transpose) would differ by far more than that
    assert (grad - _reference_rope(w, freqs, interleaved)).abs().max() > 1e-2
