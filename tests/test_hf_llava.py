"""VLM -> HF LLaVA export: transformers' LlavaForConditionalGeneration loads it and gives our logits; the paper's
default feature convention is refused with the reasons."""
import json

import pytest
import torch

from megatron_zero.models.clip_vit import get_vision_preset
from megatron_zero.models.llama_config import LlamaConfig
from tests.conftest import exit_status


@pytest.fixture(scope="module")
def world_of_one():
    from megatron_zero.parallel.initialize import initialize_parallel

    initialize_parallel(1, 1, seed=11)


def _vlm_checkpoint(path, convention, dec=None, image_token_id=7):
    """A random tiny VLM written as a VLM checkpoint directory (as tools/graft.py writes it)."""
    from megatron_zero import grafting
    from megatron_zero.models.vlm import VLM_CONFIG_FILE, VLMConfig, build_vlm, encoder_canonical_state
    from megatron_zero.parallel import sharding

    dec = dec or LlamaConfig(num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4,
                             num_query_groups=2, vocab_size=100, max_position_embeddings=128, rope_theta=10000.0,
                             rope_scaling_factor=None, name="tiny-dec")
    preset = "tiny-clip-llava" if convention == "llava" else "tiny-clip"
    cfg = VLMConfig(dec, get_vision_preset(preset), image_token_id=image_token_id)
    model = build_vlm(cfg).eval()
    with torch.no_grad():  # non-trivial norms and biases
        for n, p in model.named_parameters():
            if "norm" in n or n.endswith("bias"):
                p.uniform_(0.5, 1.5) if "norm" in n and n.endswith("weight") else p.normal_(0, 0.1)
    encoder = encoder_canonical_state(model)
    decoder = sharding.gather_canonical([model.language_model], vocab_size=dec.vocab_size)
    path.mkdir()
    grafting.save_image_encoder(str(path / "enc"), encoder, cfg.vision, image_token_id,
                                grafting.decoder_identity(dec, decoder["embedding.word_embeddings.weight"]))
    for f in (path / "enc").iterdir():
        f.rename(path / f.name)
    grafting.save_hf_decoder(str(path / grafting.DECODER_DIR), dec, decoder)
    cfg.save(str(path / VLM_CONFIG_FILE))
    return cfg, model


@pytest.mark.parametrize("decoder", ["llama", "tiny-qwen3", "tiny-qwen2"])
def test_llava_export_matches_transformers(tmp_path, world_of_one, decoder):
    """Llama, Qwen3 (QK-norm, head_dim 24 != 64/4, tied embeddings) and Qwen2.5 (QKV biases) decoders."""
    import transformers

    from megatron_zero.checkpointing.hf_llava import export_hf_llava
    from megatron_zero.models.llama_config import get_preset
    from megatron_zero.models.vlm import expand_image_placeholders

    cfg, model = _vlm_checkpoint(tmp_path / "vlm", "llava", None if decoder == "llama" else get_preset(decoder))
    vocab = cfg.decoder.vocab_size
    export_hf_llava(str(tmp_path / "vlm"), str(tmp_path / "hf"))
    ref = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    prompt = [1, 5, 7, 9, 11, 7, 13, 2]  # two images
    e = expand_image_placeholders([prompt], None, None, 7, model.num_image_embeddings)
    ids = e.input_ids
    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    pos = torch.arange(ids.shape[1]).unsqueeze(0)
    with torch.no_grad():
        ours = model(ids, pos, None, images=pixels, image_mask=e.image_mask)[..., :vocab]
        theirs = ref(input_ids=ids, pixel_values=pixels).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    hf_cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert hf_cfg["image_token_index"] == 7 and hf_cfg["vision_config"]["num_hidden_layers"] == 2
    assert hf_cfg["text_config"]["model_type"] == (decoder if decoder == "llama" else decoder[5:])
    assert ref.config.get_text_config().tie_word_embeddings == cfg.decoder.tie_word_embeddings


def test_default_convention_is_refused_with_reasons(tmp_path, world_of_one):
    from megatron_zero.checkpointing.hf_llava import LlavaExportError, export_hf_llava

    _vlm_checkpoint(tmp_path / "vlm", "zero")
    # tiny-clip: 16 patches + the class token + start/end = 19 positions (not ViT-L/14-336's 579)
    with pytest.raises(LlavaExportError, match=r"post_layernorm.*start/end-of-image embeddings \(19 positions"):
        export_hf_llava(str(tmp_path / "vlm"), str(tmp_path / "hf"))
    assert not (tmp_path / "hf").exists()
    # the same through the conversion tool: one line on stderr, exit status 2, nothing written
    from tools import convert_checkpoint

    code = exit_status(convert_checkpoint.main, ["--load-dir", str(tmp_path / "vlm"), "--save-dir",
                                                 str(tmp_path / "hf"), "--model-type", "vlm", "--source-format", "vlm",
                                                 "--target-format", "hf"])
    assert code == 2 and not (tmp_path / "hf").exists()
