"""Surrogates T(a, b): the paper's layer counts, provenance, and bit-identical kept layers (HF and sharded)."""
import json

import pytest
import torch

from megatron_zero.errors import UserError

from megatron_zero.models.llama_config import get_preset
from megatron_zero.surrogate import compute_ratio, layer_map, surrogate_config, surrogate_key


@pytest.mark.parametrize("preset,a,b,layers", [
    ("llama-3.2-3b", 16, 26, 18), ("llama-3.1-8b", 17, 30, 19), ("llama-3.1-70b", 40, 78, 42)])
def test_paper_surrogates(preset, a, b, layers):
    cfg = get_preset(preset)
    s = surrogate_config(cfg, a, b)
    assert s.num_layers == layers == cfg.num_layers - (b - a)
    assert s.surrogate["layer_map"] == list(range(a)) + [a] + list(range(b + 1, cfg.num_layers))
    assert s.surrogate["translator_index"] == a and s.surrogate["stage1_trainable_layers"] == [a]
    n_t, n_s = cfg.num_parameters(), s.num_parameters()
    per_layer = (n_t - n_s) / (b - a)
    assert per_layer == cfg.num_parameters(1) - cfg.num_parameters(0)  # exactly b - a layers' worth removed
    ratio = compute_ratio(cfg, s)
    print(f"{preset}: target {n_t / 1e9:.2f}B, T({a},{b}) {n_s / 1e9:.2f}B, compute ratio {ratio:.3f}")
    if preset == "llama-3.1-70b":  # "a 37B surrogate T(40,78)": 36.99B + the second vocabulary matrix (1.05B)
        assert abs(n_s - cfg.vocab_size * cfg.hidden_size - 37.0e9) < 0.05e9
    if preset == "llama-3.2-3b":  # "each is a 2B small model" (tied embeddings)
        assert round(n_s / 1e9) == 2
    assert layers / cfg.num_layers < ratio < 1  # the vocabulary projection is not removed


def test_layer_map_and_control_provenance():
    assert layer_map(8, 4, 6) == [0, 1, 2, 3, 4, 7]
    assert layer_map(8, 1, 3) == [0, 1, 4, 5, 6, 7]
    s = surrogate_config(get_preset("llama-3.2-3b"), 16, 26, control_unfreeze_early=True)
    assert s.surrogate["stage1_trainable_layers"] == [0, 2, 4, 6, 8, 10, 12, 14, 16]  # T(16,26)*
    assert s.surrogate["control_unfreeze_early"]
    for a, b in ((6, 6), (7, 6), (-1, 3), (2, 7)):  # a >= b, negative a, b >= L-1
        with pytest.raises(ValueError, match="--translator-start"):
            layer_map(8, a, b)


def test_build_surrogate_hf(tmp_path):
    import transformers

    from tests.tiny_models import hf_llama
    from tools import build_surrogate

    target = hf_llama(seed=0)
    target.save_pretrained(tmp_path / "target")
    from megatron_zero.data.tokenizers import WordTokenizer

    WordTokenizer([f"w{i}" for i in range(100)]).save(tmp_path / "target" / "tokenizer.json")
    (tmp_path / "traj.json").write_text(json.dumps({"transition_layer": 2, "num_layers": 6}))
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
    assert prov["target"] == str(tmp_path / "target") and prov["target_num_layers"] == 6
    assert prov["stage1_trainable_layers"] == [2] and not prov["control_unfreeze_early"]
    # identities grafting can check: the target's architecture and tokenizer (carried along, byte-identical)
    from megatron_zero.grafting import tokenizer_hash
    from megatron_zero.models.llama_config import LlamaConfig
    from megatron_zero.surrogate import architecture_sha256

    target_cfg = LlamaConfig.from_hf_config(json.loads((tmp_path / "target" / "config.json").read_text()))
    assert prov["target_config_sha256"] == architecture_sha256(target_cfg)
    assert prov["tokenizer_sha256"] == tokenizer_hash(str(tmp_path / "target")) == tokenizer_hash(str(tmp_path / "srgt"))
    # the provenance survives into the LlamaConfig that training and grafting read
    from megatron_zero.models.llama_config import load_model_config

    assert load_model_config(str(tmp_path / "srgt")).surrogate["translator_index"] == 2
    # bad input: one-line errors naming the flag
    target_dir, out = str(tmp_path / "target"), str(tmp_path / "x")
    for extra, message in [
        (["--translator-start", "5", "--translator-end", "5"], "--translator-start 5 and --translator-end 5 leave no layer"),
        (["--translator-start", "2", "--translator-end", "5"], "L-1 = 5"),  # b >= L-1: the last layer is kept
        (["--translator-start", "2", "--target-pipeline-parallel-size", "2"], "is for sharded"),
        (["--from-trajectory", str(tmp_path / "missing.json")], "no such file"),
    ]:
        with pytest.raises(UserError, match=message):
            build_surrogate.main(["--load-dir", target_dir, "--save-dir", out] + extra)
    (tmp_path / "other.json").write_text(json.dumps({"transition_layer": 2, "num_layers": 80}))
    with pytest.raises(UserError, match="80-layer model"):
        build_surrogate.main(["--load-dir", target_dir, "--save-dir", out, "--from-trajectory",
                              str(tmp_path / "other.json")])
    with pytest.raises(UserError, match="not empty|--overwrite"):
        build_surrogate.main(["--load-dir", target_dir, "--save-dir", str(tmp_path / "srgt"), "--translator-start", "2"])
    with pytest.raises(UserError, match="is itself a surrogate"):
        build_surrogate.main(["--load-dir", str(tmp_path / "srgt"), "--save-dir", out, "--translator-start", "1"])
    # a checkpoint whose tensors do not match its config (a layer missing) is refused before anything is written
    hf_llama(num_hidden_layers=4).save_pretrained(tmp_path / "short")
    conf = json.loads((tmp_path / "short" / "config.json").read_text())
    (tmp_path / "short" / "config.json").write_text(json.dumps({**conf, "num_hidden_layers": 6}))
    with pytest.raises(UserError, match="model.layers.5"):
        build_surrogate.main(["--load-dir", str(tmp_path / "short"), "--save-dir", out, "--translator-start", "1"])
    assert not (tmp_path / "x").exists()


def test_build_surrogate_sharded_pipeline_pruner(tmp_path):
    """Sharded target (PP=2) -> sharded surrogate T(2,4) re-partitioned over PP=2: kept layers and the
    translator are bit-identical to the target's, provenance recorded."""
    from tests.conftest import run_worker
    from tests.tiny_models import hf_llama

    hf_llama(seed=0).save_pretrained(tmp_path / "hf")
    out = run_worker("surrogate_mcore.py", str(tmp_path / "hf"), str(tmp_path / "target"), str(tmp_path / "srgt"),
                     nproc=2)
    assert "SURROGATE MCORE MATCH" in out, out[-3000:]


def test_build_surrogate_sharded_world_of_one(tmp_path):
    """A bf16 sharded target -> sharded T(1, 3) in one process: bf16 kept, kept layers bit-identical, T* recorded."""
    from megatron_zero.checkpointing import mcore_checkpoint
    from megatron_zero.parallel.initialize import initialize_parallel
    from megatron_zero.checkpointing import convert_llama
    from tests.tiny_models import hf_llama
    from tools import build_surrogate

    hf_llama(seed=1).to(torch.bfloat16).save_pretrained(tmp_path / "hf")
    initialize_parallel(1, 1)
    convert_llama.hf_to_mcore(str(tmp_path / "hf"), str(tmp_path / "target"))
    assert build_surrogate.main(["--load-dir", str(tmp_path / "target"), "--save-dir", str(tmp_path / "srgt"),
                                 "--translator-start", "1", "--translator-end", "3", "--control-unfreeze-early"]) == 0
    scfg = mcore_checkpoint.load_model_config(str(tmp_path / "srgt"))
    assert scfg.surrogate["layer_map"] == [0, 1, 4, 5] and scfg.surrogate["stage1_trainable_layers"] == [0, 1]
    target = dict(mcore_checkpoint.iter_llama_canonical(str(tmp_path / "target"),
                                                        mcore_checkpoint.load_model_config(str(tmp_path / "target"))))
    for k, v in mcore_checkpoint.iter_llama_canonical(str(tmp_path / "srgt"), scfg):
        src = target[surrogate_key(k, scfg.surrogate["layer_map"])]
        assert v.dtype == torch.bfloat16 and torch.equal(v, src), k


def test_target_sharded_state_dict_points_at_target_layers():
    """The sharded request of a surrogate chunk: identical to the model's own dict for the identity map, and
    with the target's layer index / layer count on the stacked-layer axis for T(a, b)."""
    from megatron.core.dist_checkpointing import ShardedTensor

    from megatron_zero.checkpointing.mcore_checkpoint import model_sharded_state_dict
    from megatron_zero.models.llama import build_llama_model
    from megatron_zero.parallel.initialize import initialize_parallel
    from megatron_zero.surrogate import target_sharded_state_dict

    initialize_parallel(1, 1)
    target = get_preset("tiny")  # 4 layers
    scfg = surrogate_config(target, 1, 2)  # T(1, 2): layers 0, 1, 3
    model = build_llama_model(scfg)
    own = model_sharded_state_dict([model])["model"]
    same = target_sharded_state_dict(model, [0, 1, 2], 3)["model"]
    remapped = target_sharded_state_dict(model, scfg.surrogate["layer_map"], target.num_layers)["model"]
    assert set(own) == set(same) == set(remapped)
    layer_tensors = 0
    for k, v in own.items():
        assert type(same[k]) is type(v) and same[k].key == v.key
        if isinstance(v, ShardedTensor):
            assert same[k].global_offset == v.global_offset and same[k].global_shape == v.global_shape
            if k.startswith("decoder.layers."):
                layer_tensors += 1
                i = int(k.split(".")[2])
                assert remapped[k].global_offset[0] == [0, 1, 3][i] and remapped[k].global_shape[0] == 4
                assert remapped[k].global_offset[1:] == v.global_offset[1:]
            else:
                assert remapped[k].global_offset == v.global_offset
    assert layer_tensors >= 3 * 4
