"""The VLM: placeholder expansion, image embeddings at exactly the placeholder positions, freezing presets
(Table A.4), frozen parameters without grad buffers/optimizer state, and TP/PP equivalence (one torchrun)."""
import dataclasses

import pytest
import torch

from megatron_zero.data.packing import IGNORE_INDEX
from megatron_zero.models.clip_vit import get_vision_preset
from megatron_zero.models.freezing import FreezingError, apply_freezing, trainable_predicate, trainable_report
from megatron_zero.models.llama_config import get_preset
from megatron_zero.models.vlm import VLMConfig, build_vlm, expand_image_placeholders, image_start_positions
from tests.conftest import layout_check_output

IMG = 5
CFG = VLMConfig(dataclasses.replace(get_preset("tiny"), vocab_size=250), get_vision_preset("tiny-clip"), IMG)
E = CFG.num_image_embeddings  # 16 patches + class token + start/end = 19
SAMPLES = [[1, IMG, 7, 8], [9, 10, 11], [IMG, 12, IMG, 13, 14]]  # one image, text only, two images


@pytest.fixture(scope="module")
def vlm():
    from megatron_zero.parallel.initialize import initialize_parallel

    initialize_parallel(1, 1, seed=3)
    torch.manual_seed(0)
    return build_vlm(CFG).eval()


def reference_expansion(sample, labels, mask, length):
    """Straightforward per-token loop: text tokens copied, each placeholder becomes E image positions whose last one
    carries the placeholder's label."""
    ids, lab, msk, img = [], [], [], []
    for t, l, m in zip(sample, labels, mask):
        if t == IMG:
            ids += [IMG] * E
            lab += [IGNORE_INDEX] * (E - 1) + [l]
            msk += [False] * (E - 1) + [m]
            img += [True] * E
        else:
            ids.append(t), lab.append(l), msk.append(m), img.append(False)
    pad = length - len(ids)
    return ids + [0] * pad, lab + [IGNORE_INDEX] * pad, msk + [False] * pad, img + [False] * pad


def test_expand_image_placeholders():
    g = torch.Generator().manual_seed(0)
    labels = [torch.randint(0, 250, (len(s),), generator=g).tolist() for s in SAMPLES]
    masks = [(torch.rand(len(s), generator=g) > 0.3).tolist() for s in SAMPLES]
    ex = expand_image_placeholders(SAMPLES, labels, masks, IMG, E, seq_length=64)
    assert ex.input_ids.shape == (3, 64)
    for i, s in enumerate(SAMPLES):
        ids, lab, msk, img = reference_expansion(s, labels[i], masks[i], 64)
        assert ex.input_ids[i].tolist() == ids
        assert ex.labels[i].tolist() == lab
        assert ex.loss_mask[i].tolist() == msk
        assert ex.image_mask[i].tolist() == img
    assert image_start_positions(ex.image_mask, E).tolist() == [[0, 1], [2, 0], [2, E + 1]]
    with pytest.raises(ValueError, match="more than --seq-length"):
        expand_image_placeholders(SAMPLES, None, None, IMG, E, seq_length=40)
    with pytest.raises(ValueError, match="multiple of 16"):
        expand_image_placeholders(SAMPLES, None, None, IMG, E, seq_length=72, pad_to_multiple_of=16)
    fp8 = expand_image_placeholders(SAMPLES, None, None, IMG, E, pad_to_multiple_of=16)
    assert fp8.input_ids.shape[1] % 16 == 0 and fp8.input_ids.shape[1] >= 2 * E + 3


def test_image_embeddings_land_exactly_at_placeholders(vlm):
    ex = expand_image_placeholders(SAMPLES, None, None, IMG, E, seq_length=64)
    images = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    pos = torch.arange(64).expand(3, -1)
    with torch.no_grad():
        decoder_input = vlm.embed(ex.input_ids, pos, images, ex.image_mask).transpose(0, 1)  # [b, s, h]
        word = vlm.language_model.embedding.word_embeddings.weight
        per_image = [vlm.vision(images[k:k + 1])[0] for k in range(3)]  # each image encoded on its own
        # independent expectation: text rows straight from the embedding table, image runs from the encoder
        expected = word[ex.input_ids].clone()
        for k, (row, start) in enumerate([(0, 1), (2, 0), (2, E + 1)]):
            expected[row, start:start + E] = per_image[k]
        torch.testing.assert_close(decoder_input, expected, rtol=1e-5, atol=1e-6)
        # start/end-of-image embeddings wrap each image
        for row, start in [(0, 1), (2, 0), (2, E + 1)]:
            assert torch.equal(decoder_input[row, start], vlm.vision.image_start_embedding)
            assert torch.equal(decoder_input[row, start + E - 1], vlm.vision.image_end_embedding)
        # and nowhere else: other images change only the image positions
        other = vlm.embed(ex.input_ids, pos, torch.randn_like(images), ex.image_mask).transpose(0, 1)
        changed = (other - decoder_input).abs().amax(-1) > 0
        inner = ex.image_mask.clone()
        for row, start in [(0, 1), (2, 0), (2, E + 1)]:
            inner[row, start], inner[row, start + E - 1] = False, False  # the markers do not depend on the image
        assert torch.equal(changed, inner)
        # the VLM forward is the decoder run on that input
        logits = vlm(ex.input_ids, pos, images=images, image_mask=ex.image_mask)
        direct = vlm.language_model(ex.input_ids, pos, None, decoder_input=expected.transpose(0, 1).contiguous())
        torch.testing.assert_close(logits, direct, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="3 image embeddings|image positions"):
        vlm.embed(ex.input_ids, pos, images[:2], ex.image_mask)


def names(model):
    from megatron_zero.models.freezing import global_parameter_names

    return [n for n, _ in global_parameter_names(model)]


def trainable(model, stage, **kw):
    keep = trainable_predicate(stage, CFG.decoder, CFG.vision.num_built_layers, **kw)
    return {n for n in names(model) if keep(n)}


def test_freezing_presets_follow_table_a4(vlm):
    all_names = names(vlm)
    adapter = {n for n in all_names if n.startswith("vision.adapter.")}
    markers = {"vision.image_start_embedding", "vision.image_end_embedding"}
    post_ln = {"vision.vision_model.post_layernorm.weight", "vision.vision_model.post_layernorm.bias"}
    enc_layer = lambda i: {n for n in all_names if n.startswith(f"vision.vision_model.transformer.layers.{i}.")}  # noqa
    dec_layer = lambda i: {n for n in all_names if n.startswith(f"language_model.decoder.layers.{i}.")}  # noqa
    decoder = {n for n in all_names if n.startswith("language_model.")}
    assert len(adapter) == 4 and all(len(enc_layer(i)) == 12 for i in range(3)) and len(dec_layer(3)) == 6

    surrogate = dataclasses.replace(CFG.decoder, surrogate={"target": "tiny-target", "a": 2, "b": 5})
    keep = trainable_predicate("stage1", surrogate, 3)
    assert {n for n in all_names if keep(n)} == adapter | markers | post_ln | dec_layer(2)
    keep = trainable_predicate("stage1", surrogate, 3, control_unfreeze_early=True)  # T*: layer 0 too (0, 2, ...)
    assert {n for n in all_names if keep(n)} == adapter | markers | post_ln | dec_layer(2) | dec_layer(0)
    assert trainable(vlm, "stage1", translator_layer=1) == adapter | markers | post_ln | dec_layer(1)
    with pytest.raises(FreezingError, match="no surrogate provenance"):
        trainable(vlm, "stage1")
    stage2 = adapter | markers | post_ln | enc_layer(1) | enc_layer(2)
    assert trainable(vlm, "stage2", encoder_trainable_layers=2) == stage2
    assert trainable(vlm, "stage3", encoder_trainable_layers=2) == stage2 | decoder
    # frozen in every stage: CLIP's patch/position/class embeddings and pre_layernorm
    for stage in ("stage2", "stage3"):
        assert not any("pre_layernorm" in n or "embedding." in n and n.startswith("vision.vision_model")
                       for n in trainable(vlm, stage, encoder_trainable_layers=3))
    with pytest.raises(FreezingError, match="encoder-trainable-layers"):
        trainable(vlm, "stage2", encoder_trainable_layers=4)


def test_frozen_parameters_get_no_grad_buffer_or_optimizer_state():
    from megatron_zero.training.optimizer import OptimizerOptions, build_optimizer, wrap_ddp

    torch.manual_seed(0)
    model = build_vlm(CFG)
    apply_freezing([model], "stage2", encoder_trainable_layers=1)
    report = trainable_report([model], "stage2")
    assert "* encoder layer 2" in report and "  encoder layer 1" in report and "  decoder layer 0" in report
    expected = {n for n, p in model.named_parameters() if p.requires_grad}
    assert expected and len(expected) < len(list(model.parameters()))
    chunks = wrap_ddp([model], OptimizerOptions(use_distributed_optimizer=False))
    opt = build_optimizer(chunks, OptimizerOptions(use_distributed_optimizer=False))
    with_buffer = {n for n, p in model.named_parameters() if getattr(p, "main_grad", None) is not None}
    assert with_buffer == expected
    optimized = {id(p) for g in opt.param_groups for p in g["params"]}
    by_id = {id(p): n for n, p in model.named_parameters()}
    main_params = getattr(opt, "optimizer", opt).param_groups
    assert {by_id.get(i) for i in optimized} <= expected | {None}
    assert sum(p.numel() for g in main_params for p in g["params"]) == sum(
        p.numel() for p in model.parameters() if p.requires_grad)


def test_tp_pp_vlm_matches_single_process(layout_checks):
    """TP=2/PP=2 and TP=2/SP/DP=2: logits, loss, grad norm and updated weights equal TP=PP=1 (fp32), on a batch
    with one-image, two-image and text-only samples and a partly frozen encoder (tests/workers/vlm_parallel.py,
    in the launch the layout-equivalence tests share: the ``layout_checks`` fixture of tests/conftest.py)."""
    layout_check_output(layout_checks, "vlm", "reference")
    out = layout_check_output(layout_checks, "vlm", "compare")
    assert "ALL VLM LAYOUTS MATCH" in out, out[-4000:]
    for layout in ("TP=2 PP=2 DP=1 SP=False", "TP=2 PP=1 DP=2 SP=True"):
        assert f"checked {layout}" in out
