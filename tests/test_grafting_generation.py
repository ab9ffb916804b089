"""Zero-shot grafting (provenance checks, bit-identical encoder and decoder) and generation (KV cache = full
re-forward, determinism, binary yes/no mode, the two command-line tools)."""
import dataclasses
import filecmp
import json
import os

import pytest
import torch

from megatron_zero.checkpointing.hf_writer import SaveDirError

from megatron_zero.data.tokenizers import WordTokenizer
from megatron_zero.inference.generate import SamplingOptions, answer_yes_no, generate
from megatron_zero.models.clip_vit import get_vision_preset
from megatron_zero.grafting import (DECODER_DIR, graft, load_image_encoder, load_vlm_checkpoint,
                                    save_image_encoder_from_model, tokenizer_hash)
from megatron_zero.models.llama_config import get_preset
from megatron_zero.models.vlm import VLMConfig, build_vlm, load_vlm_canonical
from tests.conftest import exit_status
from tests.tiny_models import write_hf_decoder

TEXTS = ["a cat sits on the mat", "is there a dog in the picture", "yes no maybe", "describe the image briefly"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A target decoder (HF dir + tokenizer), a 2-layer surrogate of it, and an encoder 'trained' on the surrogate."""
    from megatron_zero.parallel.initialize import initialize_parallel

    initialize_parallel(1, 1, seed=3)
    root = tmp_path_factory.mktemp("graft")
    tok = WordTokenizer.build(TEXTS)
    target_cfg = dataclasses.replace(get_preset("tiny"), vocab_size=tok.vocab_size, name="tiny-target")

    target = root / "target"
    _, target_weights = write_hf_decoder(target, target_cfg, seed=0, tokenizer=tok)
    other = root / "other"
    write_hf_decoder(other, target_cfg, seed=1, tokenizer=tok)

    surrogate_cfg = dataclasses.replace(target_cfg, num_layers=2, name="tiny-srgt",
                                        surrogate={"target": str(target), "a": 1, "b": 3, "translator_index": 1})
    image_id = tok.special_token_id("<image>")
    vlm_cfg = VLMConfig(surrogate_cfg, get_vision_preset("tiny-clip"), image_id)
    torch.manual_seed(2)
    srgt = build_vlm(vlm_cfg)
    # T(1, 3): target layer 0 kept, the translator (surrogate layer 1) initialised from target layer a=1
    keep = ("embedding.", "decoder.layers.0.", "decoder.layers.1.", "decoder.final_layernorm.", "output_layer.")
    srgt_weights = {k: v for k, v in target_weights.items() if k.startswith(keep)}
    load_vlm_canonical(srgt, None, srgt_weights)
    encoder_dir = root / "encoder"
    save_image_encoder_from_model(str(encoder_dir), srgt, tokenizer_hash(str(target)))
    return dict(root=root, tok=tok, target=target, other=other, target_weights=target_weights,
                encoder_dir=encoder_dir, surrogate_cfg=surrogate_cfg, image_id=image_id)


def test_graft_round_trip_is_bit_identical(setup):
    from tools.graft import main as graft_main

    out = setup["root"] / "vlm"
    assert graft_main(["--encoder", str(setup["encoder_dir"]), "--target", str(setup["target"]),
                       "--output", str(out)]) == 0
    cfg, encoder, decoder = load_vlm_checkpoint(str(out))
    assert cfg.decoder.num_layers == 4 and cfg.image_token_id == setup["image_id"]
    _, trained = load_image_encoder(str(setup["encoder_dir"]))
    assert encoder.keys() == trained.keys()
    assert all(torch.equal(encoder[k], trained[k]) for k in trained)
    for key, value in setup["target_weights"].items():
        assert torch.equal(decoder(key), value), key
    for name in os.listdir(setup["target"]):
        assert filecmp.cmp(setup["target"] / name, out / DECODER_DIR / name, shallow=False), name
    record = json.loads((out / "vlm_config.json").read_text())["graft"]
    assert record["forced"] is False and record["problems"] == []
    # the grafted VLM loads and runs
    model = build_vlm(cfg)
    load_vlm_canonical(model, encoder, decoder)
    assert model.vision.image_start_embedding.equal(trained["image_start_embedding"])


def test_graft_refuses_a_foreign_target_unless_forced(setup, capsys):
    from tools.graft import main as graft_main

    out = setup["root"] / "vlm_other"
    args = ["--encoder", str(setup["encoder_dir"]), "--target", str(setup["other"]), "--output", str(out)]
    assert exit_status(graft_main, args) == 2
    err = capsys.readouterr().err
    assert "not of the target" in err and "word-embedding table differs" in err and "--force" in err
    assert not out.exists()
    assert graft_main(args + ["--force"]) == 0
    assert json.loads((out / "vlm_config.json").read_text())["graft"]["forced"] is True
    with pytest.raises(SaveDirError, match="--overwrite"):
        graft(str(setup["encoder_dir"]), str(setup["target"]), str(out))


@pytest.fixture(scope="module")
def grafted(setup):
    out = setup["root"] / "vlm_gen"
    graft(str(setup["encoder_dir"]), str(setup["target"]), str(out))
    cfg, encoder, decoder = load_vlm_checkpoint(str(out))
    torch.manual_seed(0)
    model = build_vlm(cfg).eval()
    load_vlm_canonical(model, encoder, decoder)
    return out, model


def test_generation_with_cache_equals_full_reforward(setup, grafted):
    _, model = grafted
    img = setup["image_id"]
    prompts = [[1, img, 12, 13], [14, 15, 16], [img, 17, img, 18, 19, 20]]  # one, no, two images
    g = torch.Generator().manual_seed(5)
    images = [torch.randn(1, 3, 16, 16, generator=g), None, torch.randn(2, 3, 16, 16, generator=g)]
    for options in (SamplingOptions(max_new_tokens=6), SamplingOptions(max_new_tokens=6, temperature=0.9, top_p=0.8,
                                                                      seed=4)):
        cached = generate(model, prompts, images, options)
        assert cached == generate(model, prompts, images, options)  # deterministic
        assert cached == generate(model, prompts, images, options, use_cache=False)
        assert all(len(o) == 6 for o in cached)
    greedy = generate(model, prompts, images, SamplingOptions(max_new_tokens=6))
    stop = greedy[0][2]
    stopped = generate(model, prompts, images, SamplingOptions(max_new_tokens=6), stop_token_ids=[stop])
    assert stopped[0] == greedy[0][:greedy[0].index(stop) + 1]
    # each prompt's greedy output does not depend on the rest of the batch
    assert generate(model, prompts[1:2], images[1:2], SamplingOptions(max_new_tokens=6)) == greedy[1:2]


def test_binary_mode_compares_first_token_loglikelihoods(setup, grafted):
    _, model = grafted
    tok, img = setup["tok"], setup["image_id"]
    yes, no = tok.encode("yes"), tok.encode("no")
    prompts = [[1, img, 12, 13], [14, 15, 16, 17, 18]]
    images = [torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(6)), None]
    answers = answer_yes_no(model, prompts, images, yes, no)
    for prompt, image, a in zip(prompts, images, answers):
        ids = torch.tensor(prompt)
        widths = torch.where(ids == img, model.num_image_embeddings, 1)
        mask = torch.repeat_interleave(ids == img, widths)[None]
        ids = torch.repeat_interleave(ids, widths)[None]
        with torch.no_grad():
            logits = model(ids, torch.arange(ids.shape[1])[None], images=image, image_mask=mask)
        logp = torch.log_softmax(logits[0, -1, :tok.vocab_size], -1)
        assert a.logprob_yes == pytest.approx(float(logp[yes[0]]), abs=1e-5)
        assert a.logprob_no == pytest.approx(float(logp[no[0]]), abs=1e-5)
        assert a.answer == ("yes" if logp[yes[0]] >= logp[no[0]] else "no")


def test_generate_tool(setup, grafted, tmp_path):
    from PIL import Image

    from tools.generate import main as generate_main

    out_dir, _ = grafted
    Image.new("RGB", (20, 12), (200, 30, 40)).save(tmp_path / "red.png")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"id": "a", "prompt": "is there a cat", "images": ["red.png"]}) + "\n"
                       + json.dumps({"id": "b", "prompt": "describe the image briefly"}) + "\n")
    answers = tmp_path / "answers.jsonl"
    common = ["--checkpoint", str(out_dir), "--prompts", str(prompts), "--output", str(answers)]
    assert generate_main(common + ["--max-new-tokens", "4"]) == 0
    first = [json.loads(line) for line in answers.read_text().splitlines()]
    assert [r["id"] for r in first] == ["a", "b"] and all(isinstance(r["text"], str) for r in first)
    assert generate_main(common + ["--max-new-tokens", "4"]) == 0
    assert [json.loads(line) for line in answers.read_text().splitlines()] == first  # greedy is deterministic
    assert generate_main(common + ["--binary"]) == 0
    assert all(json.loads(line)["text"] in ("yes", "no") for line in answers.read_text().splitlines())
    prompts.write_text(json.dumps({"prompt": "<image> and <image>", "images": ["red.png"]}) + "\n")
    assert exit_status(generate_main, common) == 2
