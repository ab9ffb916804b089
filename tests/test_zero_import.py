"""tools/import_zero_checkpoint.py: the authors' released .pth files -> our image encoder / surrogate, then graft.

The .pth files are built exactly in their saved structure (``torch.save({"epoch", "global_step", "model",
"optimizer": None, "scheduler"})``, trainable tensors only, bf16, their raw names) for a tiny CLIP and a tiny
Llama. The reference is their own loading path: HF ``CLIPVisionModel`` / ``LlamaForCausalLM`` with the file's
keys applied by ``load_state_dict(strict=False)``, and their ``Zero._forward`` + ``forward_hf`` embedding splice
written out in transformers.
"""
import json

import pytest
import torch

from megatron_zero.errors import UserError
from tests.conftest import exit_status

D, CLIP_D, IMG_ID = 32, 32, 7


def _bf16(shape, gen):
    return (torch.randn(shape, generator=gen) * 0.2).to(torch.bfloat16)


def _their_adapter_tensors(gen):
    return {"embd_soi": _bf16((1, D), gen), "embd_eoi": _bf16((1, D), gen),
            "adapter.0.weight": _bf16((D, CLIP_D), gen), "adapter.0.bias": _bf16((D,), gen),
            "adapter.2.weight": _bf16((D, D), gen), "adapter.2.bias": _bf16((D,), gen)}


def _save_theirs(path, model_state, global_step):
    torch.save({"epoch": 1, "global_step": global_step, "model": model_state, "optimizer": None,
                "scheduler": {"last_epoch": global_step, "base_lrs": [1e-4]}}, path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from megatron_zero.parallel.initialize import initialize_parallel
    from tests.tiny_models import hf_clip, hf_llama
    from tools import build_surrogate

    initialize_parallel(1, 1, seed=5)
    root = tmp_path_factory.mktemp("zero_import")
    clip = hf_clip(seed=0, hidden_size=CLIP_D, num_hidden_layers=4, image_size=28, patch_size=14)
    clip.save_pretrained(root / "clip")
    target = hf_llama(vocab_size=96, hidden_size=D)
    target.save_pretrained(root / "target")
    assert build_surrogate.main(["--load-dir", str(root / "target"), "--save-dir", str(root / "srgt"),
                                 "--translator-start", "2", "--translator-end", "4"]) == 0  # T(2,4): 0,1,T,5

    gen = torch.Generator().manual_seed(1)
    # their names come from transformers 4's CLIPVisionModel (".vision_model." inside); transformers 5 drops it
    shapes = {_vm(n): p for n, p in clip.state_dict().items() if not n.endswith("position_ids")}
    clip_names = list(shapes)
    vision_trainable = [n for n in clip_names if ".encoder.layers.2." in n or ".encoder.layers.3." in n
                        or "post_layernorm" in n]  # their encoder_ft_layers_after: the last layers + post-LN
    # stage 1 (their "pretrain"): adapter, soi/eoi, post-LN and the translator (decoder layer a = 2)
    stage1 = _their_adapter_tensors(gen)
    stage1.update({f"encoder.{n}": _bf16(shapes[n].shape, gen) for n in clip_names if "post_layernorm" in n})
    layer2 = {n: p for n, p in target.state_dict().items() if n.startswith("model.layers.2.")}
    stage1.update({f"decoder.{n}": _bf16(p.shape, gen) for n, p in layer2.items()})
    _save_theirs(root / "translator.pth", stage1, 3568)
    # stage 2 (their "finetune-encoder"): adapter, soi/eoi, post-LN and the last CLIP layers
    stage2 = _their_adapter_tensors(gen)
    stage2.update({f"encoder.{n}": _bf16(shapes[n].shape, gen) for n in vision_trainable})
    _save_theirs(root / "encoder.pth", stage2, 4880)
    return dict(root=root, stage1=stage1, stage2=stage2)


def _vm(name):
    return name if name.startswith("vision_model.") else "vision_model." + name


def _their_clip(root, *states):
    """Their ``load_checkpoint`` into ``Zero.encoder`` (a CLIPVisionModel), keys as the module names them."""
    import transformers

    model = transformers.CLIPVisionModel.from_pretrained(root / "clip")
    flat = not hasattr(model, "vision_model")  # transformers >= 5
    for state in states:
        enc = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
        if flat:
            enc = {k[len("vision_model."):]: v for k, v in enc.items()}
        missing, unexpected = model.load_state_dict(enc, strict=False)
        assert not unexpected
    return model


def _their_adapter(state):
    adapter = torch.nn.Sequential(torch.nn.Linear(CLIP_D, D), torch.nn.GELU(), torch.nn.Linear(D, D))
    adapter.load_state_dict({k[len("adapter."):]: v for k, v in state.items() if k.startswith("adapter.")})
    return adapter


def test_encoder_import_lands_where_their_loader_puts_it_and_grafts(setup, tmp_path):
    import transformers

    from megatron_zero.checkpointing import hf_clip
    from megatron_zero.checkpointing.vlm_checkpoint import load_image_encoder, load_vlm_checkpoint
    from megatron_zero.models.vlm import build_vlm, expand_image_placeholders, load_vlm_canonical
    from tools import graft, import_zero_checkpoint

    root = setup["root"]
    enc_dir, vlm_dir = tmp_path / "enc", tmp_path / "vlm"
    assert import_zero_checkpoint.main([
        "--clip", str(root / "clip"), "--encoder-file", str(root / "encoder.pth"),
        "--translator-file", str(root / "translator.pth"), "--target", str(root / "target"),
        "--translator-range", "2:4", "--image-token-id", str(IMG_ID), "--output-encoder", str(enc_dir)]) == 0
    meta, ours = load_image_encoder(str(enc_dir))
    # their loading order: the stage-2 model starts from stage 1, then the encoder file
    theirs = _their_clip(root, setup["stage1"], setup["stage2"])
    vision = {k[len("vision_model."):]: v for k, v in ours.items() if k.startswith("vision_model.")}
    from megatron_zero.models.clip_vit import ClipVisionConfig

    vcfg = ClipVisionConfig.from_dict(meta["vision"])
    as_hf = dict(hf_clip.iter_hf(iter(vision.items()), vcfg, prefix=""))
    ref = {k.removeprefix("vision_model."): v for k, v in theirs.state_dict().items()}
    assert set(as_hf) == {k for k in ref if not k.endswith("position_ids")}
    for k, v in as_hf.items():
        assert v.dtype == ref[k].dtype and torch.equal(v, ref[k]), k
    st2 = setup["stage2"]
    assert torch.equal(ours["adapter.linear_fc1.weight"], st2["adapter.0.weight"])
    assert torch.equal(ours["adapter.linear_fc2.bias"], st2["adapter.2.bias"])
    assert torch.equal(ours["image_start_embedding"], st2["embd_soi"][0])
    assert torch.equal(ours["image_end_embedding"], st2["embd_eoi"][0])
    prov = meta["trained_with"]["surrogate"]
    assert prov["layer_map"] == [0, 1, 2, 5] and prov["translator_indices"] == [2]
    assert [f["global_step"] for f in meta["trained_with"]["imported_from"]["files"]] == [3568, 4880]

    # grafted without --force
    assert graft.main(["--encoder", str(enc_dir), "--target", str(root / "target"), "--output", str(vlm_dir)]) == 0
    cfg, encoder, decoder = load_vlm_checkpoint(str(vlm_dir))
    assert cfg.num_image_embeddings == 5 + 2
    model = build_vlm(cfg).eval()
    load_vlm_canonical(model, encoder, decoder)
    pixels = torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(3))
    ids = [1, 5, 9, IMG_ID, 11, 12, 13]
    ex = expand_image_placeholders([ids], None, None, IMG_ID, cfg.num_image_embeddings)
    with torch.no_grad():
        got = model(ex.input_ids, ex.position_ids, None, images=pixels, image_mask=ex.image_mask)
        # their Zero._forward + forward_hf splice, in transformers
        adapter = _their_adapter(st2)
        x = theirs(pixels, output_hidden_states=True).last_hidden_state
        post_ln = theirs.vision_model.post_layernorm if hasattr(theirs, "vision_model") else theirs.post_layernorm
        x = adapter(post_ln(x))[0]
        img = torch.cat([st2["embd_soi"].float(), x, st2["embd_eoi"].float()], dim=0)
        llama = transformers.LlamaForCausalLM.from_pretrained(root / "target")
        wte = llama.get_input_embeddings()
        k = ids.index(IMG_ID)
        embeds = torch.cat([wte(torch.tensor(ids[:k])), img, wte(torch.tensor(ids[k + 1:]))])[None]
        want = llama(inputs_embeds=embeds, use_cache=False).logits
    assert got.shape[:2] == want.shape[:2]
    torch.testing.assert_close(got[..., :want.shape[-1]].float(), want, rtol=1e-4, atol=1e-4)  # vocab padding off


def test_translator_import_into_surrogate(setup, tmp_path):
    import transformers
    from safetensors.torch import load_file

    from tools import import_zero_checkpoint

    root = setup["root"]
    out = tmp_path / "srgt_zero"
    assert import_zero_checkpoint.main([
        "--translator-file", str(root / "translator.pth"), "--surrogate", str(root / "srgt"),
        "--output-surrogate", str(out), "--clip", str(root / "clip"), "--image-token-id", str(IMG_ID),
        "--output-encoder", str(tmp_path / "enc1")]) == 0
    from megatron_zero.checkpointing.vlm_checkpoint import load_image_encoder

    meta, enc1 = load_image_encoder(str(tmp_path / "enc1"))  # their stage-1 adapter, provenance from --surrogate
    assert torch.equal(enc1["adapter.linear_fc1.weight"], setup["stage1"]["adapter.0.weight"])
    assert meta["trained_with"]["surrogate"]["translator_indices"] == [2]
    theirs = transformers.LlamaForCausalLM.from_pretrained(root / "srgt")
    dec = {k[len("decoder."):]: v for k, v in setup["stage1"].items() if k.startswith("decoder.")}
    missing, unexpected = theirs.load_state_dict(dec, strict=False)
    assert not unexpected
    ours = load_file(out / "model.safetensors")
    ref = theirs.state_dict()
    assert set(ours) == set(ref)
    for k in ref:
        assert torch.equal(ours[k], ref[k]), k
    assert any(torch.equal(ours[k], dec[k].float()) for k in dec)
    prov = json.loads((out / "config.json").read_text())["megatron_zero_surrogate"]
    assert prov["imported_translator"]["layers"] == [2] and prov["imported_translator"]["global_step"] == 3568
    assert prov["layer_map"] == [0, 1, 2, 5]


def test_bad_inputs_are_one_line_errors(setup, tmp_path, capsys):
    from tools import import_zero_checkpoint

    root = setup["root"]
    enc_args = ["--clip", str(root / "clip"), "--target", str(root / "target"), "--translator-range", "2:4",
                "--image-token-id", str(IMG_ID), "--output-encoder", str(tmp_path / "e")]
    bad = dict(setup["stage2"])
    bad["adapter.0.weight"] = bad["adapter.0.weight"][:, :16]
    _save_theirs(tmp_path / "bad.pth", bad, 1)
    wrong_layer = {k.replace("layers.2.", "layers.3."): v for k, v in setup["stage1"].items()}
    _save_theirs(tmp_path / "wrong.pth", wrong_layer, 1)
    unknown = {**setup["stage2"], "decoder.lm_head.weight": torch.zeros(96, D, dtype=torch.bfloat16)}
    _save_theirs(tmp_path / "stage3.pth", unknown, 1)
    cases = [
        (["--encoder-file", str(tmp_path / "bad.pth")] + enc_args, "adapter.0.weight has shape (32, 16), expected (32, 32)"),
        (["--encoder-file", str(tmp_path / "stage3.pth")] + enc_args, "does not know: ['decoder.lm_head.weight']"),
        (["--encoder-file", str(tmp_path / "missing.pth")] + enc_args, "missing.pth: no such file"),
        (["--encoder-file", str(root / "encoder.pth")] + enc_args[:-2] + ["--translator-range", "2:5",
                                                                            "--output-encoder", str(tmp_path / "e")],
         "L-1 = 5"),
        (["--translator-file", str(tmp_path / "wrong.pth"), "--surrogate", str(root / "srgt"), "--output-surrogate",
          str(tmp_path / "s")], "holds decoder layer 3, but the translator(s) of --surrogate"),
    ]
    for argv, message in cases:
        assert exit_status(import_zero_checkpoint.main, argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err, err
    assert not (tmp_path / "e").exists() and not (tmp_path / "s").exists()


def test_multi_range_surrogate_their_translators_and_graft(setup, tmp_path):
    """Their translators_range=(range(0, 2), range(2, 5)) on the 6-layer target: the HF builder keeps target
    layers 0 | 2 | 5 (translators at surrogate 0 and 1); their translator file names those layers; the encoder's
    provenance from --target + both ranges lets it graft without --force."""
    import transformers
    from safetensors.torch import load_file

    from tools import build_surrogate, graft, import_zero_checkpoint

    root = setup["root"]
    srgt = tmp_path / "srgt2"
    for bad, message in ((["--translator-range", "0:2", "--translator-range", "3:4", "--num-translators", "2"],
                          "need >= 3"), (["--translator-range", "0:2", "--translator-range", "3:5"], "L-1 = 5"),
                         (["--translator-range", "0:2", "--translator-start", "1"], "not both")):
        with pytest.raises(UserError, match=message):
            build_surrogate.main(["--load-dir", str(root / "target"), "--save-dir", str(srgt)] + bad)
    assert build_surrogate.main(["--load-dir", str(root / "target"), "--save-dir", str(srgt),
                                 "--translator-range", "0:1", "--translator-range", "2:4"]) == 0
    prov = json.loads((srgt / "config.json").read_text())["megatron_zero_surrogate"]
    assert prov["layer_map"] == [0, 2, 5] and prov["translator_indices"] == [0, 1]
    theirs_model = transformers.LlamaForCausalLM.from_pretrained(root / "target")
    gen = torch.Generator().manual_seed(9)
    state = _their_adapter_tensors(gen)
    for j in (0, 1):  # their surrogate's layer names
        state.update({f"decoder.model.layers.{j}.{n[len('model.layers.0.'):]}": _bf16(p.shape, gen)
                      for n, p in theirs_model.state_dict().items() if n.startswith("model.layers.0.")})
    _save_theirs(tmp_path / "t2.pth", state, 10)
    assert import_zero_checkpoint.main(["--translator-file", str(tmp_path / "t2.pth"), "--surrogate", str(srgt),
                                        "--output-surrogate", str(tmp_path / "srgt2z")]) == 0
    ref = transformers.LlamaForCausalLM.from_pretrained(srgt)
    ref.load_state_dict({k[len("decoder."):]: v for k, v in state.items() if k.startswith("decoder.")}, strict=False)
    ours = load_file(tmp_path / "srgt2z" / "model.safetensors")
    assert all(torch.equal(ours[k], v) for k, v in ref.state_dict().items())
    enc = tmp_path / "enc2"
    assert import_zero_checkpoint.main(["--clip", str(root / "clip"), "--translator-file", str(tmp_path / "t2.pth"),
                                        "--target", str(root / "target"), "--translator-range", "0:1",
                                        "--translator-range", "2:4", "--image-token-id", str(IMG_ID),
                                        "--output-encoder", str(enc)]) == 0
    assert graft.main(["--encoder", str(enc), "--target", str(root / "target"), "--output", str(tmp_path / "v")]) == 0
