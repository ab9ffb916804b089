"""Our megatron-core CLIP ViT gives HF ``CLIPVisionModel``'s features (both conventions); the HF mapping round-trips."""
import dataclasses

import pytest
import torch

from megatron_zero.checkpointing import hf_clip
from megatron_zero.models.adapter import num_image_embeddings
from megatron_zero.models.clip_vit import ClipVisionConfig, ClipVisionTransformer, get_vision_preset
from megatron_zero.parallel import sharding
from tests.tiny_models import hf_clip_model


@pytest.fixture(scope="module")
def single_process():
    from megatron_zero.parallel.initialize import initialize_parallel

    initialize_parallel(1, 1, seed=3)
    yield


def hf_reference_features(model, pixels, convention: str) -> torch.Tensor:
    """The reference implementation's features (``adapter.py`` of the paper's code) and LLaVA's."""
    out = model(pixels, output_hidden_states=True)
    if convention == "zero":  # last_hidden_state (577 tokens) -> post_layernorm
        tower = getattr(model, "vision_model", model)
        return tower.post_layernorm(out.last_hidden_state)
    return out.hidden_states[-2][:, 1:]  # LLaVA-1.5: penultimate layer, class token dropped


def test_presets_and_counts():
    big = get_vision_preset("clip-vit-l-14-336")
    assert (big.num_layers, big.hidden_size, big.num_attention_heads, big.ffn_hidden_size) == (24, 1024, 16, 4096)
    assert big.num_positions == 577 and big.num_image_tokens == 577 and num_image_embeddings(big) == 579
    llava = dataclasses.replace(big, feature_convention="llava")
    assert llava.num_image_tokens == 576 and num_image_embeddings(llava) == 576 and llava.num_built_layers == 23
    with pytest.raises(ValueError, match="feature_convention"):
        ClipVisionConfig(feature_convention="cls-only")
    with pytest.raises(ValueError, match="quick_gelu"):
        ClipVisionConfig.from_hf_config({**big.to_hf_config(), "hidden_act": "gelu"})


@pytest.mark.parametrize("convention", ["zero", "llava"])
def test_features_match_transformers_and_round_trip(single_process, convention):
    cfg = dataclasses.replace(get_vision_preset("tiny-clip"), feature_convention=convention)
    ref = hf_clip_model(cfg)
    hf_sd = ref.state_dict()
    ours = ClipVisionTransformer(cfg).eval()
    sharding.load_canonical(ours, hf_clip.from_hf_model(hf_sd, cfg), source="HF CLIP")
    pixels = torch.randn(3, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        features = ours(pixels)
        expected = hf_reference_features(ref, pixels, convention)
    assert features.shape == (3, cfg.num_image_tokens, cfg.hidden_size)
    torch.testing.assert_close(features, expected, rtol=1e-5, atol=1e-5)

    # back to HF names: bit-exact, and only the tensors this convention does not use are absent
    back = dict(hf_clip.iter_hf(sharding.iter_canonical(ours), cfg, prefix=""))
    unused = set(hf_clip.unused_hf_keys(cfg, prefix=""))
    expected_keys = {k for k in hf_sd if not k.endswith("position_ids")} - unused
    assert back.keys() == expected_keys
    assert (len(unused) > 0) == (convention == "llava")
    for k in expected_keys:
        assert torch.equal(back[k], hf_sd[k]), k


def test_fused_qkv_is_megatrons_per_head_layout():
    """Megatron splits linear_qkv's output per query group as [q_h, k_h, v_h]; for MHA a group is one head."""
    heads, hd, d = 4, 3, 5
    q, k, v = (torch.randn(heads * hd, d) for _ in range(3))
    fused = hf_clip.fuse_qkv(q, k, v, heads)
    grouped = fused.reshape(heads, 3 * hd, d)
    for h in range(heads):
        assert torch.equal(grouped[h, :hd], q[h * hd:(h + 1) * hd])
        assert torch.equal(grouped[h, hd:2 * hd], k[h * hd:(h + 1) * hd])
        assert torch.equal(grouped[h, 2 * hd:], v[h * hd:(h + 1) * hd])
    assert all(torch.equal(a, b) for a, b in zip(hf_clip.split_qkv(fused, heads), (q, k, v)))
    bias = [torch.randn(heads * hd) for _ in range(3)]
    assert all(torch.equal(a, b) for a, b in zip(hf_clip.split_qkv(hf_clip.fuse_qkv(*bias, heads), heads), bias))


def test_unexpected_hf_tensors_are_refused():
    cfg = get_vision_preset("tiny-clip")
    bigger = dataclasses.replace(cfg, num_layers=cfg.num_layers + 1)
    sd = hf_clip_model(bigger).state_dict()
    with pytest.raises(ValueError, match="does not expect"):
        hf_clip.from_hf_model(sd, cfg)
