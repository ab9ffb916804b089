"""pretrain_vlm end to end on a tiny world: stage 1 under TP=2 (2 processes), then stage 2 from its export.

Checks what each stage may change (Table A.4 freezing, end to end through DDP + optimizer + export), that the
export is what the next stage loads, and the length-weighted loss path.
"""
import json
import os

import pytest
import torch

from tests.conftest import exit_status, run_cli


def _world(tmp_path):
    """Word tokenizer, a 4-layer HF-format decoder (vocab = tokenizer), LLaVA JSON + PNGs + text JSONL."""
    from megatron_zero.checkpointing import hf_llama
    from megatron_zero.data import synthetic_shapes as ss
    from megatron_zero.data.tokenizers import WordTokenizer
    from megatron_zero.grafting import save_hf_decoder
    from megatron_zero.models.llama_config import LlamaConfig

    tok = WordTokenizer.build(ss.vocabulary_texts())
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    tok.save(tok_dir / "tokenizer.json")
    cfg = LlamaConfig(num_layers=4, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4, num_query_groups=2,
                      vocab_size=tok.vocab_size, max_position_embeddings=128, rope_theta=10000.0,
                      rope_scaling_factor=None, name="tiny-target")
    g = torch.Generator().manual_seed(0)
    canonical = {}
    for k in hf_llama.canonical_keys(cfg):
        shape = {"embedding.word_embeddings.weight": (cfg.vocab_size, 32), "output_layer.weight": (cfg.vocab_size, 32),
                 "decoder.final_layernorm.weight": (32,)}.get(k)
        if shape is None:
            suffix = k.split(".", 3)[3]
            shape = {"input_layernorm.weight": (32,), "pre_mlp_layernorm.weight": (32,),
                     "self_attention.linear_qkv.weight": (64, 32), "self_attention.linear_proj.weight": (32, 32),
                     "mlp.linear_fc1.weight": (128, 32), "mlp.linear_fc2.weight": (32, 64)}[suffix]
        canonical[k] = torch.randn(*shape, generator=g) * (0.02 if len(shape) == 2 else 1.0) + (len(shape) == 1)
    save_hf_decoder(str(tmp_path / "decoder"), cfg, canonical)
    img_dir = tmp_path / "images"
    img_dir.mkdir()
    records = []
    for s in ss.vision_samples(16, seed=1, image_size=16):
        from PIL import Image

        Image.fromarray(s["image"]).save(img_dir / f"{s['id']}.png")
        records.append({"id": str(s["id"]), "image": f"{s['id']}.png", "conversations": [
            {"from": "human", "value": s["prompt"]}, {"from": "gpt", "value": s["answer"]}]})
    (tmp_path / "llava.json").write_text(json.dumps(records))
    with open(tmp_path / "text.jsonl", "w") as f:
        for line in list(ss.text_corpus(16, seed=2)):
            f.write(json.dumps({"prompt": "describe a shape .", "response": line}) + "\n")
    return canonical


def hf_style_world(root):
    """:func:`_world` with the tokenizer inside the decoder directory, as an HF checkpoint comes (no --tokenizer)."""
    import shutil

    _world(root)
    shutil.copy(root / "tok" / "tokenizer.json", root / "decoder" / "tokenizer.json")
    return root


def _run(args, nproc=1):
    """pretrain_vlm as a user starts it: under torchrun for several processes, plainly for one (a world of one
    needs no launcher process)."""
    p = run_cli(["-m", "megatron_zero.training.pretrain_vlm", *args], nproc=nproc, timeout=400)
    assert p.returncode == 0, (p.stdout + p.stderr)[-6000:]
    return p.stdout


def _metrics(path):
    return [json.loads(x) for x in open(path)]


@pytest.mark.timeout(900)
def test_stage1_tp2_then_stage2_from_export(tmp_path):
    from megatron_zero.checkpointing import mcore_checkpoint  # noqa: F401  (export format)

    original = _world(tmp_path)
    common = ["--tokenizer", str(tmp_path / "tok"), "--data-path", str(tmp_path / "llava.json"),
              "--image-root", str(tmp_path / "images"), "--seq-length", "48", "--micro-batch-size", "2",
              "--global-batch-size", "8", "--train-iters", "3", "--log-interval", "1"]
    s1 = tmp_path / "stage1"
    out = _run(["--stage", "1", "--decoder-load", str(tmp_path / "decoder"), "--vision-model", "tiny-clip",
                "--translator-layer", "2", "--text-data-path", str(tmp_path / "text.jsonl"), "--text-ratio", "0.25",
                "--tensor-model-parallel-size", "2", "--lr", "1e-2", "--save", str(s1),
                "--metrics-file", str(tmp_path / "m1.jsonl"), *common], nproc=2)
    assert "trainable" in out.lower() and "exported the VLM" in out
    m1 = _metrics(tmp_path / "m1.jsonl")
    assert len(m1) == 3 and all(torch.isfinite(torch.tensor(m["loss"])) for m in m1)

    # the run's export (its decoder a torch_dist checkpoint saved at TP=2) generates with tools/generate.py at TP=1
    image = sorted((tmp_path / "images").iterdir())[0]
    (tmp_path / "prompts.jsonl").write_text(json.dumps({"id": "q", "prompt": "what shape is it", "images": [str(image)]})
                                            + "\n")
    gen = run_cli(["tools/generate.py", "--checkpoint", s1 / "export", "--prompts", tmp_path / "prompts.jsonl",
                   "--max-new-tokens", "3", "--output", tmp_path / "answers.jsonl"], timeout=300)
    assert gen.returncode == 0, (gen.stdout + gen.stderr)[-4000:]
    (answer,) = [json.loads(x) for x in open(tmp_path / "answers.jsonl")]
    assert answer["id"] == "q" and isinstance(answer["text"], str)

    # stage 1 changed the translator (layer 2) and nothing else of the decoder
    from megatron_zero.checkpointing.sources import resolve_decoder

    from megatron_zero.platform import mcore_fixes
    from megatron_zero.parallel.initialize import init_process_group

    mcore_fixes.setup_megatron_core()
    init_process_group()  # the checkpoint reader is collective (a world of one here)
    src = resolve_decoder(str(s1))
    assert src.kind == "mcore"
    from megatron_zero.checkpointing.mcore_checkpoint import iter_llama_canonical

    after = dict(iter_llama_canonical(src.path, src.cfg))
    for k, v in original.items():
        changed = not torch.equal(after[k], v)
        assert changed == k.startswith("decoder.layers.2."), k

    # stage 2 from the export, single process, length-weighted loss, loss on the special tokens
    out = _run(["--stage", "2", "--decoder-load", str(s1), "--encoder-load", str(s1),
                "--encoder-trainable-layers", "1", "--loss-weighting", "length-weighted",
                "--save", str(tmp_path / "stage2"), "--metrics-file", str(tmp_path / "m2.jsonl"), *common])
    m2 = _metrics(tmp_path / "m2.jsonl")
    assert len(m2) == 3 and all(torch.isfinite(torch.tensor(m["loss"])) for m in m2)
    after2 = dict(iter_llama_canonical(resolve_decoder(str(tmp_path / "stage2")).path, src.cfg))
    for k in original:
        assert torch.equal(after2[k], after[k]), f"stage 2 must not change the decoder: {k}"
    from megatron_zero.grafting import load_image_encoder

    _, enc1 = load_image_encoder(str(s1 / "export"))
    _, enc2 = load_image_encoder(str(tmp_path / "stage2" / "export"))
    changed = {k for k in enc1 if not torch.equal(enc1[k], enc2[k])}
    assert "vision_model.transformer.layers.2.mlp.linear_fc1.weight" in changed or any(
        k.startswith("vision_model.transformer.layers.2") for k in changed)
    assert not any(k.startswith("vision_model.transformer.layers.0") for k in changed)
    assert os.path.exists(tmp_path / "stage2" / "export" / "vlm_config.json")


def test_stage3_lora_trains_only_adapters_and_encoder_side(tmp_path, capsys):
    """The paper's LoRA baseline through the same recipe: stage 3 with --lora-rank keeps every decoder weight
    bit-identical, trains the adapters, and the export records them (so loaders rebuild them)."""
    original = _world(tmp_path)
    save = tmp_path / "s3lora"
    out = _run(["--stage", "3", "--decoder-load", str(tmp_path / "decoder"), "--vision-model", "tiny-clip",
                "--lora-rank", "4", "--lora-alpha", "8", "--lora-targets", "q,v,down", "--lr", "1e-2",
                "--encoder-trainable-layers", "1", "--feature-convention", "llava",
                "--tokenizer", str(tmp_path / "tok"), "--data-path", str(tmp_path / "llava.json"),
                "--image-root", str(tmp_path / "images"), "--seq-length", "48", "--micro-batch-size", "2",
                "--global-batch-size", "4", "--train-iters", "2", "--save", str(save)])
    assert "exported the VLM" in out
    from megatron_zero.platform import mcore_fixes
    from megatron_zero.checkpointing.mcore_checkpoint import iter_llama_canonical
    from megatron_zero.checkpointing.sources import resolve_decoder
    from megatron_zero.models.lora import is_lora_key
    from megatron_zero.parallel.initialize import init_process_group

    mcore_fixes.setup_megatron_core()
    init_process_group()
    src = resolve_decoder(str(save))
    assert src.cfg.lora["targets"] == ["q", "v", "down"] and src.cfg.lora["rank"] == 4
    after = dict(iter_llama_canonical(src.path, src.cfg))
    for k, v in original.items():
        assert torch.equal(after[k], v), f"LoRA must not change the decoder's weights: {k}"
    adapters = {k: v for k, v in after.items() if is_lora_key(k)}
    assert len(adapters) == 4 * 3 * 2 and all(v.abs().max() > 0 for k, v in adapters.items() if ".B_" in k)
    # HF LLaVA export refuses a LoRA decoder without --merge-lora, before writing anything (the merged export
    # itself needs a Llama-3 tokenizer for the HF processor files; the merge is the decoder export's, tested in
    # tests/test_lora.py)
    from megatron_zero.checkpointing.hf_llava import LlavaExportError, export_hf_llava

    with pytest.raises(LlavaExportError, match="LoRA adapters .*--merge-lora"):
        export_hf_llava(str(save), str(tmp_path / "llava"))
    assert not (tmp_path / "llava").exists()

    from megatron_zero.training import pretrain_vlm

    capsys.readouterr()
    code = exit_status(pretrain_vlm.main, ["--stage", "1", "--decoder-load", str(tmp_path / "decoder"),
                                           "--vision-model", "tiny-clip", "--lora-rank", "4", "--data-path",
                                           str(tmp_path / "llava.json"), "--train-iters", "1"])
    assert code == 2 and "--lora-rank trains the decoder: stage 3 only" in capsys.readouterr().err
