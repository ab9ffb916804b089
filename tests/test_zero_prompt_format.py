"""``--prompt-format zero``: the authors' Llama-3 layout, image prompt and loss masks, token by token.

The reference is rebuilt here from the authors' source (facebookresearch/zero, ``src/methods/
engine_ar_instruction_llama.py::forward_hf``): their jinja ``chat_template`` string rendered per turn with jinja2,
encoded as one string by the llama-models tiktoken tokenizer (special tokens allowed, as HF's
``apply_chat_template`` does), and their ``target`` lists built with their index rules. Our template tokenises
segment by segment and never sees those strings.
"""
import random
from pathlib import Path

import pytest

from megatron_zero.data.chat_template import (
    ZERO_IMAGE_PROMPTS,
    Message,
    ZeroLlama3ChatTemplate,
    chat_template_for,
    zero_image_prompt,
)
from megatron_zero.data.tokenizers import load_tokenizer

# Their chat template, verbatim from forward_hf.
THEIR_CHAT_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{% for message in messages %}{{'<|start_header_id|>' + message['role'] + '<|end_header_id|>' + '\n' + "
    "message['content'] + '<|eot_id|>'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n' }}{% endif %}"
)
IMG = "<|reserved_special_token_0|>"
IGNORE = -100

CONVERSATION = [
    Message("user", "<image>\nWhat is the Cat doing? Answer briefly."),
    Message("assistant", "Sleeping on a red couch."),
    Message("user", "Is it day or night?\n12 o'clock"),
    Message("assistant", "\n\nIt looks like day.\n- bright windows"),
]


@pytest.fixture(scope="module")
def toks():
    import llama_models
    from llama_models.llama3.tokenizer import Tokenizer

    path = Path(llama_models.__file__).parent / "llama3" / "tokenizer.model"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TIKTOKEN_CACHE_DIR", "")
        yield load_tokenizer(path), Tokenizer(path)


def _their_encode(ref, messages, add_generation_prompt=False):
    """``tokenizer.apply_chat_template(turn)`` with their template: render, then encode the whole string."""
    import jinja2

    text = jinja2.Template(THEIR_CHAT_TEMPLATE).render(
        messages=[{"role": m["role"], "content": m["content"]} for m in messages],
        add_generation_prompt=add_generation_prompt)
    return ref.encode(text, bos=False, eos=False, allowed_special="all")


def _their_image_text(usr_text, prompt):
    """Their enable_image_prompt branch (split_image_tokens_in_prompt_with_newline=False)."""
    usr_text = usr_text.replace("<image>\n", "").replace("\n<image>", "").strip()
    usr_text = usr_text[0].lower() + usr_text[1:]
    return f"{prompt}{IMG}, {usr_text}"


def _their_ids_and_targets(ref, conv, prompts, special):
    """input_id / target of forward_hf (ignore_instruction_token_ids=True), before the image expansion."""
    bot = ref.special_tokens["<|begin_of_text|>"]
    input_id, target = [bot], [IGNORE]
    prompts = iter(prompts)
    for usr, ast in zip(conv[::2], conv[1::2]):
        text = usr.content
        if "<image>" in text:
            text = _their_image_text(text, next(prompts))
        enc = _their_encode(ref, [{"role": "user", "content": text}])
        input_id += enc
        if special:
            target += [enc[0]] + [IGNORE] + [enc[2]] + [IGNORE] * (len(enc) - 4) + [enc[-1]]
        else:
            target += [IGNORE] * len(enc)
        enc = _their_encode(ref, [{"role": "assistant", "content": ast.content}])
        input_id += enc
        if special:
            target += [enc[0]] + [IGNORE] + [enc[2]] + enc[3:]
        else:
            target += [IGNORE] * 3 + enc[3:]
    return input_id, target


@pytest.mark.parametrize("special", [False, True])
def test_ids_and_loss_mask_match_their_forward_hf(toks, special):
    ours_tok, ref = toks
    template = chat_template_for(ours_tok, prompt_format="zero")
    assert isinstance(template, ZeroLlama3ChatTemplate)
    rng_seed = 7
    enc = template.encode(CONVERSATION, loss_on_special_tokens=special, rng=random.Random(rng_seed))
    drawn = random.Random(rng_seed).choice(ZERO_IMAGE_PROMPTS)
    ids, target = _their_ids_and_targets(ref, CONVERSATION, [drawn], special)
    assert enc.input_ids == ids
    assert enc.labels() == target  # loss mask, token by token
    assert enc.num_images == 1


def test_layout_written_out(toks):
    ours_tok, _ = toks
    template = chat_template_for(ours_tok, prompt_format="zero")
    enc = template.encode(CONVERSATION[:2], loss_on_special_tokens=True)
    assert ours_tok.decode(enc.input_ids) == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n"
        f"Based on the visual elements captured in this image of{IMG}, what is the Cat doing? Answer briefly."
        "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\nSleeping on a red couch.<|eot_id|>")
    on = ours_tok.decode([t for t, m in zip(enc.input_ids, enc.loss_mask) if m])
    assert on == ("<|start_header_id|><|end_header_id|><|eot_id|>"
                  "<|start_header_id|><|end_header_id|>\nSleeping on a red couch.<|eot_id|>")
    plain = template.encode(CONVERSATION[:2])
    assert ours_tok.decode([t for t, m in zip(plain.input_ids, plain.loss_mask) if m]) == \
        "\nSleeping on a red couch.<|eot_id|>"


def test_generation_prompt_is_their_inference_prompt(toks):
    """generator_llama._construct_model_inputs: "<image>\\n" + question, first template, generation header."""
    ours_tok, ref = toks
    template = chat_template_for(ours_tok, prompt_format="zero")
    question = "Describe the image in detail."
    ours = template.encode([Message("user", "<image>\n" + question)], add_generation_prompt=True)
    text = _their_image_text("<image>\n" + question, ZERO_IMAGE_PROMPTS[0])
    theirs = [ref.special_tokens["<|begin_of_text|>"]] + _their_encode(
        ref, [{"role": "user", "content": text}], add_generation_prompt=True)
    assert ours.input_ids == theirs
    assert ours_tok.decode(ours.input_ids).endswith(
        f"this image of{IMG}, describe the image in detail.<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n")
    assert not any(ours.loss_mask)


def test_image_prompts_are_their_30_and_training_draws_them(toks):
    assert len(ZERO_IMAGE_PROMPTS) == 30 and len(set(ZERO_IMAGE_PROMPTS)) == 30
    assert ZERO_IMAGE_PROMPTS[0] == "Based on the visual elements captured in this image of"
    assert ZERO_IMAGE_PROMPTS[-1] == "Let's investigate what this image tells us about"
    assert zero_image_prompt("Where is it?\n<image>", "P") == "P<image>, where is it?"
    ours_tok, _ = toks
    template = chat_template_for(ours_tok, prompt_format="zero")
    rng = random.Random(0)
    seen = {ours_tok.decode(template.encode(CONVERSATION[:2], rng=rng).input_ids).split("<|end_header_id|>\n")[1]
            .split(IMG)[0] for _ in range(200)}
    assert seen == set(ZERO_IMAGE_PROMPTS)


def test_zero_format_errors(toks):
    ours_tok, _ = toks
    template = chat_template_for(ours_tok, prompt_format="zero")
    with pytest.raises(ValueError, match="one '<image>' per user turn"):
        template.encode([Message("user", "compare <image> and <image>"), Message("assistant", "x")])
    with pytest.raises(ValueError, match="--prompt-format must be one of meta, zero"):
        chat_template_for(ours_tok, prompt_format="llava")


def test_dataset_draw_is_deterministic_and_meta_unchanged(toks):
    from megatron_zero.data.datasets import ChatDataset, Conversation, TokenizationConfig

    ours_tok, _ = toks
    convs = [Conversation(CONVERSATION[:2], ["x.jpg"], f"r{i}") for i in range(8)]
    cfg = TokenizationConfig(max_seq_len=2048, num_image_tokens=4, loss_on_special_tokens=True)
    zero = chat_template_for(ours_tok, prompt_format="zero")
    a = ChatDataset.build(convs, zero, cfg)
    b = ChatDataset.build(convs, zero, cfg)
    assert all((a[i].input_ids == b[i].input_ids).all() for i in range(8))
    assert len({tuple(a[i].input_ids.tolist()) for i in range(8)}) > 1  # different templates per record
    meta = ChatDataset.build(convs, chat_template_for(ours_tok), cfg)
    assert ours_tok.decode(meta[0].input_ids.tolist()).count("<|end_header_id|>\n\n") == 2
