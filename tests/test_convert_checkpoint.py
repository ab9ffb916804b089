"""tools/convert_checkpoint.py: HF Llama <-> megatron-core checkpoints at any TP/PP, checked against transformers.

The reference is an independent implementation: a tiny random ``transformers.LlamaForCausalLM`` (untied, GQA,
Llama-3 RoPE scaling, vocabulary 300 so that TP=1 and TP=2 pad it differently), saved with ``save_pretrained``
in several shards. One 4-process launch converts and reshards it and compares logits with transformers'
(see tests/workers/convert_roundtrip.py); the exported HF checkpoint must equal the original bit for bit.
A tiny random ``transformers.CLIPVisionModel`` goes the same way (TP=2, features compared, bit-exact export).
The bad-input tests call the tool's ``main()`` in-process and check its one-line messages.
"""
import glob
import json
import os
import shutil

import pytest
import torch

from megatron_zero.checkpointing.hf_writer import ShardedSafetensorsWriter, atomic_directory
from tests.conftest import exit_status, run_worker
from tools import convert_checkpoint as cc

VOCAB = 300
TOKENIZER_FILES = {
    "tokenizer_config.json": {"chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}",
                              "bos_token": "<s>"},
    "special_tokens_map.json": {"bos_token": "<s>"},
    "tokenizer.json": {"version": "1.0", "model": {"type": "BPE"}},
}


def hf_model(seed=0):
    from tests.tiny_models import hf_llama

    model = hf_llama(
        seed, vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        max_position_embeddings=16384, rope_theta=500000.0, rms_norm_eps=1e-5,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192},
        tie_word_embeddings=False, attn_implementation="eager").eval()
    with torch.no_grad():  # norms are initialised to 1; randomise them so their mapping is tested too
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def read_all(directory):
    from safetensors.torch import load_file

    out = {}
    for f in glob.glob(os.path.join(directory, "*.safetensors")):
        out.update(load_file(f))
    return out


def clip_model(seed=0):
    from tests.tiny_models import hf_clip_config, hf_clip_model

    return hf_clip_model(hf_clip_config(num_hidden_layers=3, attn_implementation="eager"), seed)


def clip_features(model, pixels):
    """The encoder's "zero" features: the last layer's output for all tokens, then post_layernorm."""
    tower = getattr(model, "vision_model", model)
    return tower.post_layernorm(model(pixels).last_hidden_state)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("hf_llama"))
    hf_model().save_pretrained(path, max_shard_size="100KB")
    for name, content in TOKENIZER_FILES.items():
        with open(os.path.join(path, name), "w") as f:
            json.dump(content, f)
    assert len(glob.glob(os.path.join(path, "model-*.safetensors"))) > 2
    return path


def test_convert_tp2_pp2_reshard_and_roundtrip(hf_dir, tmp_path):
    import transformers

    model = hf_model()
    tokens = torch.randint(0, VOCAB, (4, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(tokens).logits
    torch.save({"tokens": tokens, "logits": logits}, tmp_path / "ref.pt")
    clip, clip_dir = clip_model(), str(tmp_path / "hf_clip")
    clip.save_pretrained(clip_dir)
    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        features = clip_features(clip, pixels)
    torch.save({"pixels": pixels, "features": features}, tmp_path / "clip_ref.pt")
    work = tmp_path / "work"
    work.mkdir()

    out = run_worker("convert_roundtrip.py", "--hf", hf_dir, "--work", str(work), "--ref", str(tmp_path / "ref.pt"),
                     "--clip-hf", clip_dir, "--clip-ref", str(tmp_path / "clip_ref.pt"), nproc=4)
    assert "ALL CHECKS PASSED" in out, out[-4000:]
    for step in ("hf -> mcore TP=2 PP=2", "loaded at TP=1 PP=1", "TP=1 PP=2 [1, 3]", "CLIP hf -> mcore TP=2"):
        assert step in out

    # mcore checkpoints carry the tokenizer files and a model config
    tp2pp2 = work / "tp2pp2"
    meta = json.loads((tp2pp2 / "checkpoint_meta.json").read_text())
    assert (meta["tensor_parallel_size"], meta["pipeline_parallel_size"], meta["vocab_size"]) == (2, 2, VOCAB)
    assert json.loads((work / "tp1pp2" / "checkpoint_meta.json").read_text())["tensor_parallel_size"] == 1

    # hf -> mcore -> hf is bit-exact, in several shards with an index, tokenizer files carried along
    exported = work / "hf_out"
    original, back = read_all(hf_dir), read_all(str(exported))
    assert back.keys() == original.keys()
    for name in original:
        assert torch.equal(back[name], original[name]), name
    index = json.loads((exported / "model.safetensors.index.json").read_text())
    shards = sorted(glob.glob(str(exported / "model-*-of-*.safetensors")))
    assert len(shards) > 1 and set(index["weight_map"].values()) == {os.path.basename(s) for s in shards}
    for name, content in TOKENIZER_FILES.items():
        assert json.loads((exported / name).read_text()) == content
    reloaded = transformers.LlamaForCausalLM.from_pretrained(str(exported), attn_implementation="eager").eval()
    assert reloaded.dtype == torch.float32
    with torch.no_grad():
        assert torch.equal(reloaded(tokens).logits, logits)

    # CLIP: hf -> mcore (TP=2) -> hf is bit-exact and loads as a CLIPVisionModel with the same features
    original, back = read_all(clip_dir), read_all(str(work / "clip_out"))
    assert set(original) - set(back) <= {"vision_model.embeddings.position_ids"} and set(back) <= set(original)
    for name in back:
        assert torch.equal(back[name], original[name]), name
    reloaded = transformers.CLIPVisionModel.from_pretrained(str(work / "clip_out"), attn_implementation="eager")
    with torch.no_grad():
        assert torch.equal(clip_features(reloaded.eval(), pixels), features)


# ---- bad input: one-line errors naming the file or flag ------------------------------------------------------
def run_main(capsys, *argv):
    code = exit_status(cc.main, list(argv))
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def hf_to_mcore_args(load_dir, save_dir, *extra):
    return ["--source-format", "hf", "--target-format", "mcore", "--load-dir", str(load_dir),
            "--save-dir", str(save_dir), *extra]


@pytest.fixture
def hf_copy(hf_dir, tmp_path):
    path = tmp_path / "hf"
    shutil.copytree(hf_dir, path)
    return path


def first_shard(path):
    return sorted(glob.glob(str(path / "model-*.safetensors")))[0]


def test_missing_shard(hf_copy, tmp_path, capsys):
    shard = first_shard(hf_copy)
    os.remove(shard)
    err = run_main(capsys, *hf_to_mcore_args(hf_copy, tmp_path / "out"))
    assert shard in err and "shard missing" in err and "maps tensor" in err


def test_truncated_shard(hf_copy, tmp_path, capsys):
    shard = first_shard(hf_copy)
    os.truncate(shard, os.path.getsize(shard) // 2)
    err = run_main(capsys, *hf_to_mcore_args(hf_copy, tmp_path / "out"))
    assert shard in err and "truncated or corrupt" in err


def test_config_that_does_not_match_the_weights(hf_copy, tmp_path, capsys):
    config = json.loads((hf_copy / "config.json").read_text())
    config["intermediate_size"] = 96
    (hf_copy / "config.json").write_text(json.dumps(config))
    err = run_main(capsys, *hf_to_mcore_args(hf_copy, tmp_path / "out"))
    assert "mlp.gate_proj.weight" in err and "(128, 64)" in err and "(96, 64)" in err and "config.json" in err


def test_tp_that_does_not_divide_kv_heads(hf_dir, tmp_path, capsys):
    err = run_main(capsys, *hf_to_mcore_args(hf_dir, tmp_path / "out", "--target-tensor-parallel-size", "4"))
    assert "--target-tensor-parallel-size 4" in err and "2 KV heads" in err


def test_non_empty_save_dir_needs_overwrite(hf_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "something").write_text("x")
    err = run_main(capsys, *hf_to_mcore_args(hf_dir, out))
    assert str(out) in err and "--overwrite" in err


def test_incomplete_mcore_checkpoint_is_refused(tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for name in (".metadata", "__0_0.distcp", "model_config.json"):  # everything but checkpoint_meta.json
        (ckpt / name).write_text("")
    err = run_main(capsys, "--source-format", "mcore", "--target-format", "hf", "--load-dir", str(ckpt),
                   "--save-dir", str(tmp_path / "out"))
    assert str(ckpt) in err and "checkpoint_meta.json" in err


def test_interrupted_hf_export_leaves_nothing(tmp_path):
    target = tmp_path / "hf_out"
    with pytest.raises(KeyboardInterrupt):
        with atomic_directory(str(target)) as tmp:
            writer = ShardedSafetensorsWriter(tmp, max_shard_bytes=1000, log=lambda m: None)
            for i in range(5):
                writer.add(f"t{i}", torch.zeros(200))
            raise KeyboardInterrupt  # killed before the index and config.json are written
    assert os.listdir(tmp_path) == []
