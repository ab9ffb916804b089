"""The checkpoint resolver: every kind of checkpoint a user holds, built with tiny models, classified, and loaded to
the same weights whichever form it comes in; anything else refused in one line naming the flag and what was
expected. (tools/generate.py on a real pretrain_vlm export: tests/test_pretrain_vlm.py.)"""
import glob
import json
import os

import pytest
import torch

from megatron_zero.checkpointing.resolve import CheckpointResolveError, resolve_checkpoint


@pytest.fixture(scope="module")
def kinds(tmp_path_factory):
    """One directory of each kind, from one tiny VLM (LLaVA convention, so it also exports to HF LLaVA)."""
    from megatron_zero.checkpointing import convert_clip, convert_llama, vlm_checkpoint
    from megatron_zero.checkpointing.hf_llama import canonical_keys
    from megatron_zero.parallel.initialize import initialize_parallel
    from megatron_zero.surrogate import build_hf_surrogate
    from megatron_zero.checkpointing import training_checkpoint
    from megatron_zero.training.pretrain_vlm import export
    from tests.test_hf_llava import _vlm_checkpoint
    from tests.tiny_models import hf_clip, write_hf_decoder

    initialize_parallel(1, 1, seed=5)
    root = tmp_path_factory.mktemp("kinds")
    paths = {"vlm": root / "vlm"}
    cfg, model = _vlm_checkpoint(paths["vlm"], "llava")  # graft layout: decoder/ is an HF Llama directory
    (paths["vlm"] / vlm_checkpoint.DECODER_DIR / "tokenizer.json").write_text("{}")  # carried into the exports
    paths["hf-llama"] = paths["vlm"] / vlm_checkpoint.DECODER_DIR

    # a training run (--save) of that VLM: a training checkpoint and, at the end, <save>/export (torch_dist decoder)
    paths["training-run"] = root / "vlm_run"
    training_checkpoint.save_checkpoint(str(paths["training-run"]), 3, [model])
    export([model], cfg, str(paths["training-run"] / "export"), str(paths["hf-llama"]))
    paths["training-export"] = paths["training-run"] / "export"
    paths["image-encoder"] = root / "encoder"
    vlm_checkpoint.save_image_encoder_from_model(str(paths["image-encoder"]), model)

    # a 4-layer HF target, its HF surrogate T(1,2), its torch_dist conversion, a pretrain_lm-style run
    from megatron_zero.models.llama_config import LlamaConfig

    dec = LlamaConfig(num_layers=4, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4, num_query_groups=2,
                      vocab_size=100, max_position_embeddings=64, rope_theta=10000.0, rope_scaling_factor=None,
                      name="target4")
    paths["target"] = root / "target4"
    lm, target = write_hf_decoder(paths["target"], dec)
    assert set(target) == set(canonical_keys(dec))
    paths["surrogate"] = root / "target4-T12"
    build_hf_surrogate(str(paths["target"]), str(paths["surrogate"]), 1, 2, log=lambda m: None)
    paths["mcore-llama"] = root / "target4-mcore"
    convert_llama.hf_to_mcore(str(paths["target"]), str(paths["mcore-llama"]))
    paths["lm-run"] = root / "lm_run"
    training_checkpoint.save_checkpoint(str(paths["lm-run"]), 2, [lm])
    dec.save(str(paths["lm-run"] / "model_config.json"))  # what pretrain_lm writes next to its checkpoints

    # HF CLIP and its torch_dist conversion
    clip = hf_clip()
    paths["hf-clip"] = root / "clip"
    clip.save_pretrained(paths["hf-clip"])
    paths["mcore-clip"] = root / "clip-mcore"
    convert_clip.clip_to_mcore(str(paths["hf-clip"]), str(paths["mcore-clip"]), "hf", tp=1)
    return {"paths": {k: str(v) for k, v in paths.items()}, "cfg": cfg, "model": model, "lm": lm, "target": target}


EXPECTED = {  # path key -> (kind, is_surrogate, is_vlm, decoder format)
    "vlm": ("vlm", False, True, "hf"),
    "hf-llama": ("hf-llama", False, False, "hf"),
    "training-run": ("training-run", False, True, "mcore"),
    "training-export": ("training-export", False, True, "mcore"),
    "image-encoder": ("image-encoder", False, False, None),
    "target": ("hf-llama", False, False, "hf"),
    "surrogate": ("hf-llama", True, False, "hf"),
    "mcore-llama": ("mcore-llama", False, False, "mcore"),
    "lm-run": ("training-run", False, False, "training"),
    "hf-clip": ("hf-clip", False, False, None),
    "mcore-clip": ("mcore-clip", False, False, None),
}


def test_every_kind_is_classified(kinds):
    paths = kinds["paths"]
    for key, (kind, surrogate, vlm, fmt) in EXPECTED.items():
        ckpt = resolve_checkpoint(paths[key])
        got = (ckpt.kind, ckpt.is_surrogate, ckpt.is_vlm, ckpt.decoder.format if ckpt.decoder else None)
        assert got == (kind, surrogate, vlm, fmt), key
    run = resolve_checkpoint(paths["training-run"])
    assert run.root == paths["training-export"] and run.run_dir == paths["training-run"] and run.iteration == 3
    assert run.vlm_config.to_dict() == kinds["cfg"].to_dict()
    assert run.tokenizer_dir == os.path.join(paths["training-export"], "decoder")  # the tokenizer travelled along
    assert resolve_checkpoint(paths["lm-run"]).root.endswith("iter_0000002")
    assert resolve_checkpoint(paths["surrogate"]).decoder.cfg.surrogate["layer_map"] == [0, 1, 3]
    for key in ("vlm", "training-export", "image-encoder"):
        assert resolve_checkpoint(paths[key]).encoder_dir is not None, key


def test_refusals_name_the_flag_the_path_and_what_was_expected(kinds, tmp_path):
    paths = kinds["paths"]
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "README").write_text("hello")
    incomplete = tmp_path / "interrupted"
    incomplete.mkdir()
    (incomplete / ".metadata").write_text("")
    cases = [
        (str(tmp_path / "missing"), "--load", None, "no such directory"),
        (str(tmp_path / "notes"), "--checkpoint", ("vlm", "training-export", "training-run"),
         "not a checkpoint megatron_zero reads"),
        (str(incomplete), "--load-dir", None, "no checkpoint_meta.json; an interrupted save?"),
        (paths["hf-clip"], "--decoder-load", ("hf-llama", "mcore-llama"), "is an HF CLIP vision directory"),
        (paths["target"], "--checkpoint", ("vlm", "training-export", "training-run"), "is an HF Llama directory"),
    ]
    for path, flag, accept, reason in cases:
        with pytest.raises(CheckpointResolveError) as e:
            resolve_checkpoint(path, flag, accept)
        msg = str(e.value)
        assert msg.startswith(f"{flag} {path}") and reason in msg and "\n" not in msg, msg
        assert "expected " in msg
    # a VLM run still training (no export yet) says how to get one
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "latest_checkpointed_iteration.txt").write_text("5")
    with pytest.raises(CheckpointResolveError, match="no complete checkpoint"):
        resolve_checkpoint(str(tmp_path / "run"))


def _fresh_weights(model):
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()


def test_every_decoder_form_loads_the_same_weights(kinds):
    from megatron_zero.checkpointing.sources import decoder_source, encoder_source, iter_decoder_canonical, load_vlm
    from megatron_zero.models.llama import RuntimeOptions, build_llama_model
    from megatron_zero.parallel import sharding

    paths, cfg = kinds["paths"], kinds["cfg"]
    want = sharding.gather_canonical([kinds["model"].language_model], vocab_size=cfg.decoder.vocab_size)
    want_encoder = {k: v.clone() for k, v in kinds["model"].vision.state_dict().items() if isinstance(v, torch.Tensor)}
    for key in ("vlm", "training-run", "training-export"):
        ckpt = resolve_checkpoint(paths[key])
        streamed = dict(iter_decoder_canonical(ckpt))
        assert all(torch.equal(streamed[k], want[k]) for k in want), key
        model = load_vlm(ckpt, RuntimeOptions())
        got = sharding.gather_canonical([model.language_model], vocab_size=cfg.decoder.vocab_size)
        assert all(torch.equal(got[k], want[k]) for k in want), key
        assert all(torch.equal(model.vision.state_dict()[k], v) for k, v in want_encoder.items()), key
        assert encoder_source(ckpt).image_token_id == cfg.image_token_id
    # a pretrain_lm run: the weights of its newest training checkpoint
    lm_ckpt = resolve_checkpoint(paths["lm-run"])
    model = build_llama_model(lm_ckpt.decoder.cfg, RuntimeOptions(initialize_weights=False))
    _fresh_weights(model)
    decoder_source(lm_ckpt).load_into([model])
    got = sharding.gather_canonical([model], vocab_size=lm_ckpt.decoder.cfg.vocab_size)
    assert all(torch.equal(got[k], v) for k, v in kinds["target"].items())


def test_initialize_weights_false_sets_tensor_parallel_attributes(kinds):
    """RuntimeOptions(initialize_weights=False) skips megatron's random init but leaves every parallel weight
    marked as an initialised one would be."""
    from megatron_zero.models.llama import RuntimeOptions, build_llama_model

    from megatron_zero.models.vlm import build_vlm

    cfg = kinds["cfg"]
    pairs = [(build_llama_model(cfg.decoder), build_llama_model(cfg.decoder, RuntimeOptions(initialize_weights=False))),
             (build_vlm(cfg), build_vlm(cfg, RuntimeOptions(initialize_weights=False)))]  # + CLIP tower and adapter
    for ref, bare in pairs:
        for (name, p), (_, q) in zip(ref.named_parameters(), bare.named_parameters()):
            for attr in ("tensor_model_parallel", "partition_dim", "partition_stride"):
                assert getattr(p, attr, None) == getattr(q, attr, None), (name, attr)
        assert any(getattr(p, "tensor_model_parallel", False) for p in bare.parameters())


def test_llava_export_accepts_a_training_export(kinds, tmp_path):
    """The LLaVA export reads a training run's export (torch_dist decoder) to the same files as the graft layout."""
    from safetensors.torch import load_file

    from megatron_zero.checkpointing.hf_llava import export_hf_llava

    paths = kinds["paths"]
    export_hf_llava(paths["vlm"], str(tmp_path / "from_graft"))
    export_hf_llava(paths["training-run"], str(tmp_path / "from_run"))

    def tensors(d):
        out = {}
        for f in glob.glob(os.path.join(d, "*.safetensors")):
            out.update(load_file(f))
        return out

    a, b = tensors(tmp_path / "from_graft"), tensors(tmp_path / "from_run")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "from_run" / "config.json").read_text())["model_type"] == "llava"
    assert (tmp_path / "from_run" / "tokenizer.json").exists()
