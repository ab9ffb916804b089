"""Qwen3 and Qwen2.5 decoders: presets, HF config mapping, logits vs transformers, HF <-> canonical round trip."""
import dataclasses
import json
import os

import pytest
import torch

from megatron_zero.checkpointing import hf_llama
from megatron_zero.models.llama_config import PRESETS, DecoderConfig, UnsupportedModelError, get_preset
from megatron_zero.parallel import sharding
from tests.tiny_models import hf_model

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


def test_unsupported_family_refused_by_the_tools(tmp_path, capsys):
    """A Gemma-3 HF checkpoint given to the tools: exit status 2 and one line naming what the decoder lacks."""
    from safetensors.torch import save_file

    from megatron_zero.errors import run_main
    from tools import build_surrogate, convert_checkpoint

    gemma = tmp_path / "gemma-3"
    gemma.mkdir()
    (gemma / "config.json").write_text(json.dumps({
        "model_type": "gemma3_text", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 300, "final_logit_softcapping": 30.0}))
    save_file({"model.embed_tokens.weight": torch.zeros(300, 64)}, str(gemma / "model.safetensors"))
    for tool, argv in ((convert_checkpoint, ["--source-format", "hf", "--target-format", "mcore"]),
                       (build_surrogate, ["--translator-start", "0", "--translator-end", "1"])):
        with pytest.raises(SystemExit) as e:  # the tools' __main__: run_main(main)
            run_main(tool.main, "tool", [*argv, "--load-dir", str(gemma), "--save-dir", str(tmp_path / "out")])
        code, err = e.value.code, capsys.readouterr().err.strip()
        assert code == 2 and "\n" not in err and "Traceback" not in err, err
        assert "'gemma3_text' is not supported" in err and "soft-capping" in err and "gemma-3" in err
        assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def single_process():
    from megatron_zero.parallel.initialize import initialize_parallel

    initialize_parallel(1, 1, seed=3)
    yield


def _read_all(path):
    import glob

    from safetensors.torch import load_file

    out = {}
    for f in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
        out.update(load_file(f))
    return out


def test_tp2_pp2_conversion_logits_and_bit_exact_export(tmp_path):
    """One torchrun launch (4 processes): for tiny Qwen3 and Qwen2 HF checkpoints, hf -> mcore at TP=2/PP=2 gives
    transformers' logits, and mcore -> hf gives back the original tensors bit for bit (reloadable by
    transformers with the same logits). The LoRA TP=2 == TP=1 check rides in the same launch (tests/test_lora.py
    builds its reference; here it is run when that reference exists)."""

    from tests.conftest import run_worker

    cases, refs = [], {}
    tokens = torch.randint(0, 250, (4, 16), generator=torch.Generator().manual_seed(2))
    for preset in ("tiny-qwen3", "tiny-qwen2"):
        cfg = dataclasses.replace(get_preset(preset), vocab_size=250)
        ref = hf_model(cfg, seed=1)
        hf_dir = tmp_path / preset
        ref.save_pretrained(hf_dir)
        with torch.no_grad():
            logits = ref(tokens).logits
        torch.save({"tokens": tokens, "logits": logits}, tmp_path / f"{preset}.pt")
        cases += ["--case", preset, str(hf_dir), str(tmp_path / f"{preset}.pt")]
        refs[preset] = (type(ref), logits)
    from tests.test_lora import write_lora_reference

    write_lora_reference(tmp_path / "lora.pt")
    out = run_worker("qwen_parallel.py", *cases, "--work", str(tmp_path), "--lora", str(tmp_path / "lora.pt"),
                     nproc=4)
    assert "ALL QWEN CHECKS PASSED" in out, out[-4000:]
    for preset, (cls, logits) in refs.items():
        assert f"{preset}: hf -> mcore TP=2 PP=2" in out
        original, back = _read_all(str(tmp_path / preset)), _read_all(str(tmp_path / f"{preset}_hf_out"))
        assert back.keys() == original.keys()
        for name in original:
            assert torch.equal(back[name], original[name]), (preset, name)
        reloaded = cls.from_pretrained(str(tmp_path / f"{preset}_hf_out"), attn_implementation="eager").eval()
        with torch.no_grad():
            assert torch.equal(reloaded(tokens).logits, logits)
    assert "LoRA TP=2 vs TP=1" in out


def test_trajectory_matches_transformers(single_process):
    """The trajectory analyzer on a Qwen3 decoder (QK-norm, head_dim != hidden/heads) equals the computation from
    transformers' hidden states (both metrics, padded batch)."""
    from megatron_zero.analysis.trajectory import TrajectoryAnalyzer, pad_batch
    from megatron_zero.models.llama import build_llama_model
    from tests.test_trajectory import hf_trajectory

    cfg = dataclasses.replace(get_preset("tiny-qwen3"), vocab_size=250, tie_word_embeddings=False)
    ref = hf_model(cfg, seed=4)
    with torch.no_grad():  # sharper, more distinct per-layer predictions
        ref.lm_head.weight.mul_(20)
    model = build_llama_model(cfg)
    sharding.load_canonical(model, hf_llama.canonical_getter(ref.state_dict().__getitem__, cfg))
    sequences = [torch.randint(0, 250, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (12, 7)]
    tokens, lengths = pad_batch(sequences)
    for metric in ("position-kl", "vocab-kl"):
        ours = TrajectoryAnalyzer(model, cfg.vocab_size)(tokens, lengths, metric)
        expected = hf_trajectory(ref, sequences, metric)
        assert expected[:, :-1].min() > 1e-3
        torch.testing.assert_close(ours, expected.float(), rtol=2e-4, atol=1e-5)


@pytest.mark.parametrize("preset", ["tiny-qwen3", "tiny-qwen2"])
def test_build_surrogate_keeps_layers_bit_exact(tmp_path, preset, single_process):
    """tools/build_surrogate.py on an HF Qwen checkpoint: T(1, 2) keeps layers 0, 1 (translator), 3 bit for bit
    (q/k norms and q/k/v biases included) and is a model of the same family transformers loads; the same from
    the target converted to a sharded (torch_dist) checkpoint gives a sharded surrogate with the same tensors."""

    from tools import build_surrogate

    cfg = get_preset(preset)
    target = hf_model(cfg, seed=5)
    target.save_pretrained(tmp_path / "target")
    from megatron_zero.data.tokenizers import WordTokenizer

    WordTokenizer([f"w{i}" for i in range(100)]).save(tmp_path / "target" / "tokenizer.json")
    assert build_surrogate.main(["--load-dir", str(tmp_path / "target"), "--save-dir", str(tmp_path / "srgt"),
                                 "--translator-start", "1", "--translator-end", "2"]) == 0
    hf_cfg = json.loads((tmp_path / "srgt" / "config.json").read_text())
    assert hf_cfg["model_type"] == cfg.to_hf_config()["model_type"] and hf_cfg["num_hidden_layers"] == 3
    sur = type(target).from_pretrained(tmp_path / "srgt")
    t, s = target.state_dict(), sur.state_dict()
    per_layer = sorted({k.split(".", 3)[3] for k in t if k.startswith("model.layers.0.")})
    assert ("self_attn.q_norm.weight" in per_layer) == cfg.qk_layernorm
    assert ("self_attn.q_proj.bias" in per_layer) == cfg.add_qkv_bias
    for i, j in enumerate([0, 1, 3]):
        for name in per_layer:
            assert torch.equal(s[f"model.layers.{i}.{name}"], t[f"model.layers.{j}.{name}"]), (i, name)
    assert torch.equal(s["model.embed_tokens.weight"], t["model.embed_tokens.weight"])

    from megatron_zero.checkpointing import convert_llama, mcore_checkpoint
    from megatron_zero.surrogate import surrogate_key

    convert_llama.hf_to_mcore(str(tmp_path / "target"), str(tmp_path / "target-mcore"))
    assert build_surrogate.main(["--load-dir", str(tmp_path / "target-mcore"), "--save-dir",
                                 str(tmp_path / "srgt-mcore"), "--translator-start", "1", "--translator-end", "2"]) == 0
    scfg = mcore_checkpoint.load_model_config(str(tmp_path / "srgt-mcore"))
    assert (scfg.family, scfg.num_layers, scfg.surrogate["layer_map"]) == (cfg.family, 3, [0, 1, 3])
    target_canonical = hf_llama.canonical_getter(t.__getitem__, cfg)
    keys = set()
    for k, v in mcore_checkpoint.iter_llama_canonical(str(tmp_path / "srgt-mcore"), scfg):
        assert torch.equal(v, target_canonical(surrogate_key(k, scfg.surrogate["layer_map"]))), k
        keys.add(k)
    assert any("q_layernorm" in k for k in keys) == cfg.qk_layernorm
    assert any("linear_qkv.bias" in k for k in keys) == cfg.add_qkv_bias
