"""Qwen3 and Qwen2.5 decoders: presets, HF config mapping, logits vs transformers, HF <-> canonical round trip."""
import dataclasses

import pytest
import torch

from megatron_zero.checkpointing import hf_llama
from megatron_zero.models.llama_config import PRESETS, DecoderConfig, UnsupportedModelError, get_preset
from megatron_zero.parallel import sharding
from tests.qwen_models import hf_model

# Parameter counts of the HF releases (sum of numel over the safetensors shards of Qwen/<name>).
PUBLISHED_PARAMS = {
    "qwen3-4b": 4_022_468_096,
    "qwen3-8b": 8_190_735_360,
    "qwen3-32b": 32_762_123_264,
    "qwen2.5-7b": 7_615_616_512,
    "qwen2.5-72b": 72_706_203_648,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_preset_parameter_counts(name):
    """Our formula, the published count and a meta-device transformers model of the preset agree."""
    import transformers

    cfg = get_preset(name)
    assert cfg.num_parameters() == PUBLISHED_PARAMS[name]
    config_cls = {"qwen3": transformers.Qwen3Config, "qwen2": transformers.Qwen2Config}[cfg.family]
    model_cls = {"qwen3": transformers.Qwen3ForCausalLM, "qwen2": transformers.Qwen2ForCausalLM}[cfg.family]
    hf_cfg = config_cls(**{k: v for k, v in cfg.to_hf_config().items() if k not in ("architectures", "torch_dtype")})
    with torch.device("meta"):
        model = model_cls(hf_cfg)
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED_PARAMS[name]  # tied weights counted once


def test_published_hyper_parameters():
    q4 = get_preset("qwen3-4b")
    assert (q4.hidden_size, q4.num_attention_heads, q4.head_dim, q4.tie_word_embeddings) == (2560, 32, 128, True)
    assert q4.head_dim * q4.num_attention_heads != q4.hidden_size  # kv_channels differs from hidden/heads
    assert get_preset("qwen3-8b").qk_layernorm and not get_preset("qwen3-8b").tie_word_embeddings
    q7 = get_preset("qwen2.5-7b")
    assert q7.add_qkv_bias and not q7.qk_layernorm and (q7.num_query_groups, q7.head_dim) == (4, 128)


def test_hf_config_round_trip_and_family_detection():
    for name in ("qwen3-4b", "qwen3-32b", "qwen2.5-72b", "tiny-qwen3", "tiny-qwen2"):
        cfg = PRESETS[name]
        back = DecoderConfig.from_hf_config(cfg.to_hf_config(), name=cfg.name)
        assert dataclasses.replace(back, surrogate=None) == cfg
    # transformers' own config.json spelling (transformers 5: rope_parameters, layer_types)
    import transformers

    hf = transformers.Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, vocab_size=300).to_dict()
    cfg = DecoderConfig.from_hf_config(hf)
    assert cfg.family == "qwen2" and cfg.add_qkv_bias and cfg.rope_scaling_factor is None


@pytest.mark.parametrize("hf,missing", [
    ({"model_type": "gemma3_text"}, "sliding-window attention .*soft-capping"),
    ({"model_type": "qwen3", "use_sliding_window": True}, "sliding-window attention"),
    ({"model_type": "qwen3", "attention_bias": True}, "o_proj"),
    ({"model_type": "qwen2", "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling type 'yarn'"),
    ({"model_type": "falcon"}, "not a supported decoder family"),
])
def test_unsupported_families_one_line(hf, missing):
    base = {k: v for k, v in PRESETS["tiny-qwen3"].to_hf_config().items() if k != "model_type"}
    with pytest.raises(UnsupportedModelError, match=missing) as e:
        DecoderConfig.from_hf_config({**base, **hf}, name="ckpt")
    assert "\n" not in str(e.value) and str(e.value).startswith("ckpt: model_type")


@pytest.fixture(scope="module")
def single_process():
    from megatron_zero.parallel.initialize import initialize_parallel

    initialize_parallel(1, 1, seed=3)
    yield


@pytest.mark.parametrize("preset", ["tiny-qwen3", "tiny-qwen2"])
def test_logits_match_transformers_and_round_trip(single_process, preset):
    from megatron_zero.models.llama import build_llama_model

    cfg = dataclasses.replace(get_preset(preset), vocab_size=250)  # 250 -> padded to 256 inside megatron
    ref = hf_model(cfg)
    hf_sd = ref.state_dict()
    assert hf_llama.hf_shapes(cfg) == {k: tuple(v.shape) for k, v in hf_sd.items()
                                       if not (cfg.tie_word_embeddings and k == "lm_head.weight")}
    model = build_llama_model(cfg).eval()
    sharding.load_canonical(model, hf_llama.canonical_getter(hf_sd.__getitem__, cfg), source="HF model")
    tokens = torch.randint(0, 250, (2, 24), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(24).unsqueeze(0).expand(2, -1)
    with torch.no_grad():
        ours = model(tokens, pos, None)[..., :250]
        theirs = ref(tokens).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    back = dict(hf_llama.iter_hf(sharding.iter_canonical(model, vocab_size=cfg.vocab_size), cfg))
    expected = {k: v for k, v in hf_sd.items() if not (cfg.tie_word_embeddings and k == "lm_head.weight")}
    assert back.keys() == expected.keys()
    for k in expected:
        assert torch.equal(back[k], expected[k]), k
