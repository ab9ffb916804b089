"""Chat templates: ids against independent references, loss masks token by token (Sec. A.9).

Loss masks are checked by decoding each run of consecutive loss-carrying tokens and comparing with runs written
out by hand from the conversation; the full token/mask table is printed side by side (``pytest -s`` shows it).
"""
from pathlib import Path

import pytest

from megatron_zero.data.chat_template import (
    GemmaChatTemplate,
    Llama2ChatTemplate,
    Llama3ChatTemplate,
    Message,
    WordChatTemplate,
    chat_template_for,
)
from megatron_zero.data.tokenizers import WordTokenizer, load_tokenizer

CONVERSATION = [
    Message("system", "You are a helpful assistant."),
    Message("user", "<image>\nWhere is the cat? And what is it doing?"),
    Message("assistant", "The cat is sitting on a couch, which is located in a room."),
    Message("user", "What colour is the couch? I typed <|eot_id|> here."),
    Message("assistant", "It is red."),
]
RESPONSES = [m.content for m in CONVERSATION if m.role == "assistant"]


def loss_runs(ids, mask, render):
    """Rendered text of each maximal run of consecutive loss-carrying tokens."""
    runs, current = [], []
    for token, flag in zip(ids, mask):
        if flag:
            current.append(token)
        elif current:
            runs.append(render(current))
            current = []
    if current:
        runs.append(render(current))
    return runs


def print_side_by_side(ids, mask, render, title):
    print(f"\n{title}\n{'pos':>4} {'id':>7}  {'loss':4}  token")
    for i, (token, flag) in enumerate(zip(ids, mask)):
        print(f"{i:>4} {token:>7}  {'LOSS' if flag else '-':4}  {render([token])!r}")


@pytest.fixture(scope="module")
def llama3():
    import llama_models

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TIKTOKEN_CACHE_DIR", "")
        yield load_tokenizer(Path(llama_models.__file__).parent / "llama3" / "tokenizer.model")


@pytest.fixture(scope="module")
def llama_models_chat_format():
    import llama_models
    from llama_models.llama3.chat_format import ChatFormat
    from llama_models.llama3.tokenizer import Tokenizer

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TIKTOKEN_CACHE_DIR", "")
        yield ChatFormat(Tokenizer(Path(llama_models.__file__).parent / "llama3" / "tokenizer.model"))


def _raw(messages):
    from llama_models.datatypes import RawMessage

    return [RawMessage(role=m.role, content=m.content) for m in messages]


def test_llama3_ids_match_llama_models_chat_format(llama3, llama_models_chat_format):
    text_only = [Message(m.role, m.content.replace("<image>\n", "")) for m in CONVERSATION]
    template = chat_template_for(llama3)
    assert isinstance(template, Llama3ChatTemplate)
    # encode_dialog_prompt appends the assistant header: the generation prompt of the whole conversation.
    ours = template.encode(text_only, add_generation_prompt=True).input_ids
    assert ours == llama_models_chat_format.encode_dialog_prompt(_raw(text_only)).tokens
    prompt_only = text_only[:2]
    assert template.encode(prompt_only, add_generation_prompt=True).input_ids == \
        llama_models_chat_format.encode_dialog_prompt(_raw(prompt_only)).tokens
    # And the same ids as the conversation written out as one string, special tokens allowed.
    rendered = "<|begin_of_text|>" + "".join(
        f"<|start_header_id|>{m.role}<|end_header_id|>\n\n{m.content}<|eot_id|>" for m in text_only)
    typed_eot = llama3.encode(" I typed <|eot_id|> here.")
    assert ours[: -4] == _encode_rendered(llama3, rendered, typed_eot)


def _encode_rendered(tok, rendered, typed_eot):
    """Encode the hand-rendered string; the <|eot_id|> the *user typed* stays plain text, as in the template."""
    head, tail = rendered.split(" I typed <|eot_id|> here.")
    return tok.encode(head, allow_special=True) + typed_eot + tok.encode(tail, allow_special=True)


def test_llama3_default_loss_mask_is_responses_and_their_eot(llama3):
    enc = chat_template_for(llama3).encode(CONVERSATION)
    print_side_by_side(enc.input_ids, enc.loss_mask, llama3.decode, "Llama-3, default loss mask")
    assert loss_runs(enc.input_ids, enc.loss_mask, llama3.decode) == [r + "<|eot_id|>" for r in RESPONSES]
    eot = llama3.special_token_id("<|eot_id|>")
    assert enc.input_ids.count(eot) == len(CONVERSATION)  # one per turn; the typed one is plain text
    assert sum(enc.loss_mask) == sum(len(llama3.encode(r)) + 1 for r in RESPONSES)


def test_llama3_loss_on_special_tokens_adds_the_header_tokens(llama3):
    enc = chat_template_for(llama3).encode(CONVERSATION, loss_on_special_tokens=True)
    print_side_by_side(enc.input_ids, enc.loss_mask, llama3.decode, "Llama-3, loss_on_special_tokens=True")
    # Written out from A.9: the blue special tokens and the green responses carry loss; role names, the "\n\n"
    # after each header, prompts and the image placeholder do not.
    expected = [
        "<|begin_of_text|><|start_header_id|>", "<|end_header_id|>",  # system header
        "<|eot_id|><|start_header_id|>", "<|end_header_id|>",  # end of system turn, user header
        "<|eot_id|><|start_header_id|>", "<|end_header_id|>",  # end of user turn, assistant header
        RESPONSES[0] + "<|eot_id|><|start_header_id|>", "<|end_header_id|>",
        "<|eot_id|><|start_header_id|>", "<|end_header_id|>",
        RESPONSES[1] + "<|eot_id|>",
    ]
    assert loss_runs(enc.input_ids, enc.loss_mask, llama3.decode) == expected
    no_loss = loss_runs(enc.input_ids, [not m for m in enc.loss_mask], llama3.decode)
    assert no_loss == ["system", "\n\n" + CONVERSATION[0].content, "user",
                       "\n\n<|reserved_special_token_0|>\nWhere is the cat? And what is it doing?", "assistant",
                       "\n\n", "user", "\n\n" + CONVERSATION[3].content, "assistant", "\n\n"]


def test_llama3_image_placeholder_and_generation_prompt(llama3):
    template = chat_template_for(llama3)
    placeholder = llama3.special_token_id("<|reserved_special_token_0|>")
    assert template.image_placeholder_id == placeholder == 128002
    enc = template.encode([Message("user", "<image> and <image>: compare"), Message("assistant", "Same.")])
    assert enc.num_images == 2 and enc.input_ids.count(placeholder) == 2
    assert not any(m for t, m in zip(enc.input_ids, enc.loss_mask) if t == placeholder)
    prompt = template.encode([Message("user", "<image>\nDescribe.")], add_generation_prompt=True)
    assert llama3.decode(prompt.input_ids).endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert not any(prompt.loss_mask)
    assert template.stop_token_ids[0] == llama3.special_token_id("<|eot_id|>")
    custom = chat_template_for(llama3, image_placeholder="<|image|>")
    assert custom.encode([Message("user", "<image>")]).input_ids[-2] == llama3.special_token_id("<|image|>")


def test_template_errors(llama3):
    template = chat_template_for(llama3)
    with pytest.raises(ValueError, match="unknown role 'bot'"):
        template.encode([Message("bot", "hi")])
    with pytest.raises(ValueError, match="in an assistant turn"):
        template.encode([Message("user", "hi"), Message("assistant", "<image>")])
    with pytest.raises(ValueError, match="system message may only come first"):
        template.encode([Message("user", "hi"), Message("system", "x")])
    with pytest.raises(ValueError, match="empty conversation"):
        template.encode([])
    with pytest.raises(ValueError, match="unknown chat-template family"):
        chat_template_for(llama3, family="mistral")


CORPUS = [
    "the cat sits on the red couch in the living room",
    "where is the cat? the cat is on the couch.",
    "what colour is the ball? the ball is blue. describe the picture.",
    "you are a helpful assistant. it is red. it is blue.",
] * 20


def _sentencepiece(tmp_path, name, **kwargs):
    import sentencepiece as spm

    prefix = tmp_path / name
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS), model_prefix=str(prefix), vocab_size=90,
                                   model_type="bpe", minloglevel=2, **kwargs)
    return prefix.with_suffix(".model")


def test_gemma_template_on_a_tiny_sentencepiece_model(tmp_path):
    import sentencepiece as spm

    path = _sentencepiece(tmp_path, "gemma", pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>",
                          eos_piece="<eos>", bos_piece="<bos>", add_dummy_prefix=False,
                          remove_extra_whitespaces=False, normalization_rule_name="identity",
                          user_defined_symbols=["<start_of_turn>", "<end_of_turn>", "\n", "<unused0>"])
    tok = load_tokenizer(path)
    sp = spm.SentencePieceProcessor(model_file=str(path))
    template = chat_template_for(tok)
    assert isinstance(template, GemmaChatTemplate)
    conv = [Message("system", "you are a helpful assistant."), Message("user", "<image>where is the cat?"),
            Message("assistant", "the cat is on the couch."), Message("user", "what colour?"),
            Message("assistant", "it is red.")]
    enc = template.encode(conv)
    render = lambda ids: "".join(sp.id_to_piece(i) for i in ids).replace("\u2581", " ")
    print_side_by_side(enc.input_ids, enc.loss_mask, render, "Gemma (tiny sentencepiece), default loss mask")
    # Gemma's documented layout, written by hand; the system prompt joins the first user turn.
    rendered = ("<start_of_turn>user\nyou are a helpful assistant.\n\n<unused0>where is the cat?<end_of_turn>\n"
                "<start_of_turn>model\nthe cat is on the couch.<end_of_turn>\n"
                "<start_of_turn>user\nwhat colour?<end_of_turn>\n<start_of_turn>model\nit is red.<end_of_turn>\n")
    assert enc.input_ids == [sp.bos_id()] + sp.encode(rendered)
    assert enc.num_images == 1
    assert loss_runs(enc.input_ids, enc.loss_mask, render) == [
        "the cat is on the couch.<end_of_turn>", "it is red.<end_of_turn>"]
    special = template.encode(conv, loss_on_special_tokens=True)
    assert loss_runs(special.input_ids, special.loss_mask, render) == [
        "<bos><start_of_turn>", "<end_of_turn>", "<start_of_turn>", "the cat is on the couch.<end_of_turn>",
        "<start_of_turn>", "<end_of_turn>", "<start_of_turn>", "it is red.<end_of_turn>"]
    prompt = template.encode(conv[1:2], add_generation_prompt=True)
    assert render(prompt.input_ids).endswith("<end_of_turn>\n<start_of_turn>model\n")


def test_llama2_template_matches_meta_reference_formula(tmp_path):
    import sentencepiece as spm

    path = _sentencepiece(tmp_path, "llama2", remove_extra_whitespaces=False, user_defined_symbols=["<image>"])
    tok = load_tokenizer(path)
    sp = spm.SentencePieceProcessor(model_file=str(path))
    template = chat_template_for(tok)
    assert isinstance(template, Llama2ChatTemplate)
    conv = [Message("system", "you are a helpful assistant."), Message("user", "where is the cat?"),
            Message("assistant", "the cat is on the couch."), Message("user", "what colour?"),
            Message("assistant", "it is red.")]
    enc = template.encode(conv)
    # llama/generation.py chat_completion: per exchange encode(f"{B_INST} {prompt} {E_INST} {answer} ", bos, eos).
    first_user = "<<SYS>>\nyou are a helpful assistant.\n<</SYS>>\n\nwhere is the cat?"
    expected = ([1] + sp.encode(f"[INST] {first_user} [/INST] the cat is on the couch. ") + [2]
                + [1] + sp.encode("[INST] what colour? [/INST] it is red. ") + [2])
    assert enc.input_ids == expected
    runs = loss_runs(enc.input_ids, enc.loss_mask, lambda ids: sp.decode(ids) + ("</s>" if ids[-1] == 2 else ""))
    assert runs == ["the cat is on the couch. </s>", "it is red. </s>"]
    prompt = template.encode(conv[:2], add_generation_prompt=True)
    assert prompt.input_ids == [1] + sp.encode(f"[INST] {first_user} [/INST]")
    with pytest.raises(ValueError, match="alternate user/assistant"):
        template.encode([Message("user", "a"), Message("user", "b")])
    assert template.encode([Message("user", "<image> what?")]).num_images == 1
    no_image = Llama2ChatTemplate(WordTokenizer(["a"], ("<pad>", "<unk>", "<bos>", "<eos>", "<s>", "</s>")))
    with pytest.raises(ValueError, match="no image placeholder token"):
        no_image.encode([Message("user", "<image> what?")])


def test_word_template():
    tok = WordTokenizer.build(CORPUS)
    template = chat_template_for(tok)
    assert isinstance(template, WordChatTemplate)
    conv = [Message("user", "<image> where is the cat?"), Message("assistant", "the cat is on the couch.")]
    enc = template.encode(conv)
    print_side_by_side(enc.input_ids, enc.loss_mask, tok.decode, "word tokenizer, default loss mask")
    assert tok.decode(enc.input_ids) == \
        "<bos> <user> <image> where is the cat ? <eot> <assistant> the cat is on the couch . <eot>"
    assert loss_runs(enc.input_ids, enc.loss_mask, tok.decode) == ["the cat is on the couch . <eot>"]
    special = template.encode(conv, loss_on_special_tokens=True)
    assert loss_runs(special.input_ids, special.loss_mask, tok.decode) == [
        "<bos> <user>", "<eot> <assistant> the cat is on the couch . <eot>"]
    assert enc.labels()[:3] == [-100, -100, -100]
    assert tok.decode(template.encode(conv[:1], add_generation_prompt=True).input_ids).endswith("<eot> <assistant>")
