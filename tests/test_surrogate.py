"""Surrogates T(a, b): the paper's layer counts, provenance, and bit-identical kept layers (HF and sharded)."""
import json

import pytest
import torch

from megatron_zero.models.llama_config import get_preset
from megatron_zero.surrogate import compute_ratio, layer_map, surrogate_config


@pytest.mark.parametrize("preset,a,b,layers", [
    ("llama-3.2-3b", 16, 26, 18), ("llama-3.1-8b", 17, 30, 19), ("llama-3.1-70b", 40, 78, 42)])
def test_paper_surrogates(preset, a, b, layers):
    cfg = get_preset(preset)
    s = surrogate_config(cfg, a, b)
    assert s.num_layers == layers
    assert s.surrogate["layer_map"] == list(range(a)) + [a] + list(range(b + 1, cfg.num_layers))
    assert s.surrogate["translator_index"] == a and s.surrogate["stage1_trainable_layers"] == [a]
    n_t, n_s = cfg.num_parameters(), s.num_parameters()
    print(f"{preset}: target {n_t / 1e9:.2f}B, T({a},{b}) {n_s / 1e9:.2f}B, compute {compute_ratio(cfg, s):.3f}")
    if preset == "llama-3.1-70b":
        assert 36.0e9 < n_s < 38.5e9  # the paper's "surrogate-37B" (38.0B with both vocabulary matrices)
    assert compute_ratio(cfg, s) < 1


def test_layer_map_and_control_provenance():
    assert layer_map(8, 4, 6) == [0, 1, 2, 3, 4, 7]
    assert layer_map(8, 1, 3) == [0, 1, 4, 5, 6, 7]
    s = surrogate_config(get_preset("llama-3.2-3b"), 16, 26, control_unfreeze_early=True)
    assert s.surrogate["stage1_trainable_layers"] == sorted({16} | set(range(0, 16, 2)))
    with pytest.raises(ValueError, match="--translator-start"):
        layer_map(8, 6, 6)


def test_build_surrogate_hf(tmp_path):
    import transformers

    from tools import build_surrogate

    cfg = transformers.LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=6,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    target = transformers.LlamaForCausalLM(cfg)
    target.save_pretrained(tmp_path / "target")
    (tmp_path / "traj.json").write_text(json.dumps({"transition_layer": 2}))
    assert build_surrogate.main(["--load-dir", str(tmp_path / "target"), "--save-dir", str(tmp_path / "srgt"),
                                 "--from-trajectory", str(tmp_path / "traj.json"), "--max-shard-size", "20KB"]) == 0
    sur = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "srgt")
    assert sur.config.num_hidden_layers == 4  # T(2, 4): layers 0, 1, translator(2), 5
    t, s = target.state_dict(), sur.state_dict()
    for i, j in enumerate([0, 1, 2, 5]):
        for name in ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "mlp.down_proj.weight",
                     "input_layernorm.weight", "post_attention_layernorm.weight"):
            assert torch.equal(s[f"model.layers.{i}.{name}"], t[f"model.layers.{j}.{name}"])
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(s[name], t[name])
    prov = json.loads((tmp_path / "srgt" / "config.json").read_text())["megatron_zero_surrogate"]
    assert prov["translator_start"] == 2 and prov["translator_end"] == 4 and prov["layer_map"] == [0, 1, 2, 5]
    # the provenance survives into the LlamaConfig that training and grafting read
    from megatron_zero.models.llama_config import load_model_config

    assert load_model_config(str(tmp_path / "srgt")).surrogate["translator_index"] == 2
    # errors are one line naming the flag
    with pytest.raises(SystemExit, match="--translator-start"):
        build_surrogate.main(["--load-dir", str(tmp_path / "target"), "--save-dir", str(tmp_path / "x"),
                              "--translator-start", "5", "--translator-end", "5"])
    with pytest.raises(SystemExit, match="not empty|--overwrite"):
        build_surrogate.main(["--load-dir", str(tmp_path / "target"), "--save-dir", str(tmp_path / "srgt"),
                              "--translator-start", "2"])


def test_build_surrogate_sharded_pipeline_pruner(tmp_path):
    """Sharded target (PP=2) -> sharded surrogate T(2,4) re-partitioned over PP=2: kept layers and the
    translator are bit-identical to the target's, provenance recorded."""
    import transformers

    from tests.conftest import run_worker

    cfg = transformers.LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=6,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "hf")
    out = run_worker("surrogate_mcore.py", str(tmp_path / "hf"), str(tmp_path / "target"), str(tmp_path / "srgt"),
                     nproc=2)
    assert "SURROGATE MCORE MATCH" in out, out[-3000:]
