"""The files that make an HF LLaVA export usable from ``transformers`` alone: image processor, processor,
tokenizer (with its special tokens and chat template) and generation config.

* ``preprocessor_config.json``: transformers' ``LlavaImageProcessor`` with ``do_pad`` -- pad to a square with the
  CLIP mean colour (``int(255 * mean)`` = our :data:`~megatron_zero.data.images.PAD_COLOR`), bicubic resize to
  ``image_size`` x ``image_size``, rescale, CLIP mean/std normalisation: the steps of
  :func:`megatron_zero.data.images.preprocess_pil`. (The stock ``CLIPImageProcessor`` instead resizes the short side
  and centre-crops, cutting off the long side's ends of a non-square photo.) The two agree up to the resize
  kernel's rounding (PIL bicubic on uint8 in both; tested).
* ``processor_config.json`` + ``chat_template.jinja``: ``LlavaProcessor`` (the image token, the patch size, the
  ``default`` feature strategy: one image token per patch) and a chat template that lays out a conversation as
  our chat template does, an image as the placeholder + ``"\\n"`` (LLaVA's layout, as ``tools/generate.py``):
  Llama-3's headers, or Qwen's ChatML (``<|im_start|>``; Qwen2.5's default system message; Qwen3's
  ``enable_thinking`` switch of ``apply_chat_template``, on by default as in Qwen3's own template).
* ``tokenizer.json`` / ``tokenizer_config.json``: the decoder's tokenizer with every special token (a Llama-3
  ``tokenizer.model`` is converted with transformers' tiktoken converter when no ``tokenizer.json`` came along),
  BOS/EOS/PAD named, the image token as ``extra_special_tokens``.
* ``generation_config.json``: BOS, the stop tokens of the chat template as EOS, PAD, greedy.
"""
from __future__ import annotations

import json
import os
from typing import Optional

from megatron_zero.errors import UserError

# How an image part and a text part of a message render (shared by every family): the placeholder token followed by
# a newline per image (LLaVA's "<image>\n" prefix, as tools/generate.py lays a prompt out), then the text.
_CONTENT = (
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}"
    "{% for part in message['content'] | selectattr('type', 'equalto', 'image') %}{{ IMAGE_TOKEN + '\\n' }}"
    "{% endfor %}"
    "{% for part in message['content'] | selectattr('type', 'equalto', 'text') %}{{ part['text'] }}{% endfor %}"
    "{% endif %}"
)

# Our Llama-3 layout (megatron_zero.data.chat_template.Llama3ChatTemplate): BOS, per turn header + content +
# <|eot_id|>.
LLAMA3_LLAVA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}" + _CONTENT + "{{ '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

# Our ChatML layouts (QwenChatTemplate, Qwen3ChatTemplate): per turn <|im_start|>role\n content <|im_end|>\n;
# Qwen2.5 inserts its default system message; Qwen3 has the thinking switch of its own HF template
# (apply_chat_template(..., enable_thinking=False): the empty <think> block opens the assistant turn).
_QWEN_NO_THINK = "{% if THINK_SWITCH and enable_thinking is defined and enable_thinking is false %}" \
                 "{{ '<think>\\n\\n</think>\\n\\n' }}{% endif %}"
QWEN_LLAVA_CHAT_TEMPLATE = (
    "{% if DEFAULT_SYSTEM and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\n' + DEFAULT_SYSTEM + '<|im_end|>\\n' }}{% endif %}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['role'] == 'assistant' %}" + _QWEN_NO_THINK + "{% endif %}"
    + _CONTENT + "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}" + _QWEN_NO_THINK + "{% endif %}"
)


def hf_chat_template(template, image_token: str) -> str:
    """The jinja chat template that renders conversations as our ``template`` (a
    :class:`~megatron_zero.data.chat_template.ChatTemplate`) encodes them, images as ``image_token``."""
    from megatron_zero.data.chat_template import QwenChatTemplate

    if template.family == "llama3" and getattr(template, "prompt_format", "meta") == "meta":
        return LLAMA3_LLAVA_CHAT_TEMPLATE.replace("IMAGE_TOKEN", repr(image_token))
    if isinstance(template, QwenChatTemplate):
        system = template.default_system
        return (QWEN_LLAVA_CHAT_TEMPLATE.replace("IMAGE_TOKEN", repr(image_token))
                .replace("DEFAULT_SYSTEM", repr(system) if system else "''")
                .replace("THINK_SWITCH", "true" if template.family == "qwen3" else "false"))
    raise LlavaTokenizerExportError(f"the HF chat template is written for Llama-3, Qwen3 and Qwen2.5 decoders; "
                                    f"this tokenizer uses the {template.family!r} template")


class LlavaTokenizerExportError(UserError, ValueError):
    """The decoder's tokenizer cannot be written as a transformers tokenizer for the export."""


def _write_json(path: str, payload: dict) -> None:
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)


def _tokenizer_json(decoder_dir: str, out_dir: str) -> dict:
    """``out_dir/tokenizer.json`` (copied, or converted from a Llama-3 tiktoken model); returns it parsed."""
    import shutil

    from megatron_zero.data.tokenizers import Llama3Tokenizer, llama3_special_token_names, load_tokenizer

    dst = os.path.join(out_dir, "tokenizer.json")
    src = os.path.join(decoder_dir, "tokenizer.json")
    if os.path.isfile(src):
        shutil.copyfile(src, dst)
    else:
        try:
            tok = load_tokenizer(decoder_dir)
        except (FileNotFoundError, ValueError) as e:
            raise LlavaTokenizerExportError(f"{decoder_dir}: no tokenizer to export ({e})") from None
        if not isinstance(tok, Llama3Tokenizer):
            raise LlavaTokenizerExportError(
                f"{decoder_dir}: the export needs a Hugging Face tokenizer.json (or a Llama-3 tokenizer.model to "
                f"convert); found a {type(tok).__name__}")
        from transformers.convert_slow_tokenizer import TikTokenConverter

        model_file = next(os.path.join(decoder_dir, c) for c in ("tokenizer.model", "original/tokenizer.model")
                          if os.path.isfile(os.path.join(decoder_dir, c)))
        TikTokenConverter(vocab_file=model_file, extra_special_tokens=llama3_special_token_names()).converted().save(dst)
    with open(dst) as f:
        return json.load(f)


def _token_name(added: dict[int, str], token_id: Optional[int], what: str, decoder_dir: str) -> Optional[str]:
    if token_id is None:
        return None
    if token_id not in added:
        raise LlavaTokenizerExportError(f"{decoder_dir}: the {what} (id {token_id}) is not a special token of its "
                                        f"tokenizer.json")
    return added[token_id]


def write_hf_processor_files(out_dir: str, decoder_dir: str, cfg) -> None:
    """Write the tokenizer, processor, image-processor and generation files of an HF LLaVA export of ``cfg``
    (a :class:`~megatron_zero.models.vlm.VLMConfig`) into ``out_dir``, from the tokenizer in ``decoder_dir``."""
    from megatron_zero.data.chat_template import chat_template_for
    from megatron_zero.data.images import CLIP_MEAN, CLIP_STD
    from megatron_zero.data.tokenizers import load_tokenizer

    tok = load_tokenizer(decoder_dir)
    template = chat_template_for(tok, image_placeholder=cfg.image_token_id, model_family=cfg.decoder.family)
    try:
        hf_chat_template(template, "")
    except LlavaTokenizerExportError as e:
        raise LlavaTokenizerExportError(f"{decoder_dir}: {e}") from None
    tj = _tokenizer_json(decoder_dir, out_dir)
    added = {t["id"]: t["content"] for t in tj.get("added_tokens", [])}
    image_token = _token_name(added, cfg.image_token_id, "image token", decoder_dir)
    bos = _token_name(added, tok.bos_id, "BOS token", decoder_dir)
    stops = list(template.stop_token_ids)
    eos = _token_name(added, stops[0], "end-of-turn token", decoder_dir)
    pad = _token_name(added, tok.pad_id, "PAD token", decoder_dir)
    chat = hf_chat_template(template, image_token)
    for stale in ("tokenizer.model", "special_tokens_map.json", "chat_template.json"):
        if os.path.exists(os.path.join(out_dir, stale)):
            os.remove(os.path.join(out_dir, stale))
    _write_json(os.path.join(out_dir, "tokenizer_config.json"), {
        "tokenizer_class": "PreTrainedTokenizerFast", "processor_class": "LlavaProcessor",
        "bos_token": bos, "eos_token": eos, "pad_token": pad, "add_bos_token": False,
        "clean_up_tokenization_spaces": False, "model_max_length": cfg.decoder.max_position_embeddings,
        "extra_special_tokens": {"image_token": image_token},
    })
    with open(os.path.join(out_dir, "chat_template.jinja"), "w") as f:
        f.write(chat)
    v = cfg.vision
    size = {"height": v.image_size, "width": v.image_size}
    _write_json(os.path.join(out_dir, "preprocessor_config.json"), {
        "image_processor_type": "LlavaImageProcessor", "processor_class": "LlavaProcessor",
        "do_convert_rgb": True, "do_pad": True, "do_resize": True, "size": size, "resample": 3,  # PIL bicubic
        "do_center_crop": True, "crop_size": size, "do_rescale": True, "rescale_factor": 1 / 255,
        "do_normalize": True, "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD),
    })
    _write_json(os.path.join(out_dir, "processor_config.json"), {
        "processor_class": "LlavaProcessor", "image_token": image_token, "patch_size": v.patch_size,
        "vision_feature_select_strategy": "default", "num_additional_image_tokens": 1,
    })
    _write_json(os.path.join(out_dir, "generation_config.json"), {
        "bos_token_id": tok.bos_id, "eos_token_id": stops if len(stops) > 1 else stops[0],
        "pad_token_id": tok.pad_id, "do_sample": False,
    })
