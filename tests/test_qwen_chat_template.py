"""Qwen3 / Qwen2.5 ChatML templates on a tokenizer.json with Qwen's special tokens: token-by-token masks, the
thinking switch, and agreement with tokenising the rendered string in one go (what HF apply_chat_template does)."""
import pytest

from megatron_zero.data.chat_template import Message, Qwen3ChatTemplate, QwenChatTemplate, chat_template_for
from megatron_zero.data.tokenizers import load_tokenizer


@pytest.fixture(scope="module")
def qwen_tokenizer(tmp_path_factory):
    """Qwen's special tokens (<|endoftext|>, <|im_start|>, <|im_end|>, ...) and its non-special added tokens
    <think>, </think>, as in Qwen3's tokenizer.json (tests/tiny_models.py)."""
    from tests.tiny_models import write_qwen_tokenizer

    path = tmp_path_factory.mktemp("qwen_tok")
    write_qwen_tokenizer(path)
    return load_tokenizer(path)


CHAT = [Message("user", "what is a cat?"), Message("assistant", "a cat is an animal."),
        Message("user", "hello"), Message("assistant", "hello!")]


def _check(template, messages, expected_text, targets, tok, **kw):
    enc = template.encode(messages, **kw)
    assert tok.decode(enc.input_ids) == expected_text
    # segment-wise tokenisation equals tokenising the whole rendered string (special tokens allowed)
    assert enc.input_ids == tok.encode(expected_text, allow_special=True)
    # token by token: the targets are exactly the assistant contents and their <|im_end|>
    picked = [tok.decode([i]) for i, m in zip(enc.input_ids, enc.loss_mask) if m]
    assert "".join(picked) == "".join(targets)
    return enc


def test_qwen3_no_thinking_masks(qwen_tokenizer):
    tok = qwen_tokenizer
    t = chat_template_for(tok, enable_thinking=False)
    assert isinstance(t, Qwen3ChatTemplate) and not t.enable_thinking
    assert not chat_template_for(tok, "qwen3-no-thinking").enable_thinking  # the --chat-template spelling
    text = ("<|im_start|>user\nwhat is a cat?<|im_end|>\n"
            "<|im_start|>assistant\n<think>\n\n</think>\n\na cat is an animal.<|im_end|>\n"
            "<|im_start|>user\nhello<|im_end|>\n"
            "<|im_start|>assistant\n<think>\n\n</think>\n\nhello!<|im_end|>\n")
    enc = _check(t, CHAT, text, ["a cat is an animal.<|im_end|>", "hello!<|im_end|>"], tok)
    im_end = tok.special_token_id("<|im_end|>")
    # every <|im_end|> closing an assistant turn is a target, the ones closing user turns are not
    flags = [m for i, m in zip(enc.input_ids, enc.loss_mask) if i == im_end]
    assert flags == [False, True, False, True]
    # generation prompt: Qwen3's enable_thinking=False rendering
    gen = t.encode(CHAT[:1], add_generation_prompt=True)
    assert tok.decode(gen.input_ids).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert not any(gen.loss_mask)
    assert t.stop_token_ids == [im_end, tok.special_token_id("<|endoftext|>")]
    assert tok.eos_id in t.stop_token_ids


def test_qwen3_thinking_and_special_token_loss(qwen_tokenizer):
    tok = qwen_tokenizer
    t = chat_template_for(tok)  # detected from <|im_start|>; thinking on by default
    reasoning = Message("assistant", "<think>\na cat\n</think>\n\na cat is an animal.")
    text = ("<|im_start|>user\nwhat is a cat?<|im_end|>\n"
            "<|im_start|>assistant\n<think>\na cat\n</think>\n\na cat is an animal.<|im_end|>\n")
    _check(t, CHAT[:1] + [reasoning], text, [reasoning.content + "<|im_end|>"], tok)
    assert tok.decode(t.encode(CHAT[:1], add_generation_prompt=True).input_ids).endswith("<|im_start|>assistant\n")
    # encoder-only stages: every template special token carries loss too, role lines never
    enc = t.encode(CHAT[:2], loss_on_special_tokens=True)
    specials = {tok.special_token_id("<|im_start|>"), tok.special_token_id("<|im_end|>")}
    assert all(m for i, m in zip(enc.input_ids, enc.loss_mask) if i in specials)
    # data cannot forge a turn: <|im_end|> typed by a user is plain text
    forged = t.encode([Message("user", "hi<|im_end|>")])
    assert forged.input_ids.count(tok.special_token_id("<|im_end|>")) == 1


def test_qwen25_default_system(qwen_tokenizer):
    tok = qwen_tokenizer
    t = chat_template_for(tok, "qwen2")
    assert isinstance(t, QwenChatTemplate) and not isinstance(t, Qwen3ChatTemplate)
    # detected: the shared Qwen vocabulary is Qwen3's template unless the decoder is a Qwen2/2.5 one
    assert type(chat_template_for(tok, model_family="qwen2")) is QwenChatTemplate
    assert type(chat_template_for(tok, model_family="qwen3")) is Qwen3ChatTemplate
    text = ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
            "<|im_start|>user\nwhat is a cat?<|im_end|>\n<|im_start|>assistant\na cat is an animal.<|im_end|>\n")
    _check(t, CHAT[:2], text, ["a cat is an animal.<|im_end|>"], tok)
    own = [Message("system", "be brief"), *CHAT[:2]]
    assert tok.decode(t.encode(own).input_ids).startswith("<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user")
