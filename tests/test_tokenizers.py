"""Tokenizer backends against independent references: llama_models' Llama-3 tokenizer, the sentencepiece
library, and a Hugging Face tokenizer.json converted from the Llama-3 BPE file by transformers."""
from pathlib import Path

import pytest

from megatron_zero.data.tokenizers import (
    LLAMA3_PATTERN,
    HFTokenizer,
    Llama3Tokenizer,
    SentencePieceTokenizer,
    WordTokenizer,
    llama3_special_token_names,
    load_tokenizer,
)

TEXTS = [
    "Hello world!",
    "Where is the cat? And what is it doing?",
    "  leading spaces,\n\nnewlines\tand tabs  ",
    "numbers 1234567 and 3.14159, symbols #@$%^&*()",
    "Ünïcödé: 日本語のテキスト, emoji 🐈‍⬛, Ελληνικά",
    "text with <|eot_id|> and <|start_header_id|> written in it",
    "",
]


@pytest.fixture(scope="module")
def llama3_path():
    import llama_models

    path = Path(llama_models.__file__).parent / "llama3" / "tokenizer.model"
    assert path.is_file(), "llama-models ships the Llama-3 tokenizer.model"
    return path


@pytest.fixture(scope="module")
def no_tiktoken_cache():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TIKTOKEN_CACHE_DIR", "")
        yield


@pytest.fixture(scope="module")
def llama3(llama3_path, no_tiktoken_cache):
    return load_tokenizer(llama3_path)


@pytest.fixture(scope="module")
def reference(llama3_path, no_tiktoken_cache):
    from llama_models.llama3.tokenizer import Tokenizer

    return Tokenizer(llama3_path)


def test_llama3_matches_llama_models(llama3, reference):
    assert isinstance(llama3, Llama3Tokenizer)
    assert llama3.special_tokens == reference.special_tokens
    assert llama3.vocab_size == reference.n_words == 128256
    assert (llama3.bos_id, llama3.eos_id, llama3.pad_id) == (reference.bos_id, reference.eos_id, reference.pad_id)
    assert llama3.special_token_id("<|begin_of_text|>") == 128000
    assert llama3.special_token_id("<|eot_id|>") == reference.eot_id
    for text in TEXTS:
        assert llama3.encode(text) == reference.encode(text, bos=False, eos=False), text
        assert llama3.encode(text, allow_special=True) == reference.encode(
            text, bos=False, eos=False, allowed_special="all"), text
        assert llama3.decode(llama3.encode(text)) == text


def test_llama3_special_text_is_plain_unless_allowed(llama3):
    eot = llama3.special_token_id("<|eot_id|>")
    assert eot not in llama3.encode("a <|eot_id|> b")
    assert eot in llama3.encode("a <|eot_id|> b", allow_special=True)
    with pytest.raises(KeyError, match="no special token '<nope>'"):
        llama3.special_token_id("<nope>")


def test_llama3_long_runs_are_split_like_llama_models(llama3, reference):
    text = "x" * 30_000 + " " * 26_000 + "end"
    assert llama3.encode(text) == reference.encode(text, bos=False, eos=False)


def test_hf_tokenizer_json_matches_llama_models(tmp_path, llama3_path, reference, no_tiktoken_cache):
    from transformers.convert_slow_tokenizer import TikTokenConverter

    converted = TikTokenConverter(vocab_file=str(llama3_path), pattern=LLAMA3_PATTERN,
                                  extra_special_tokens=llama3_special_token_names()).converted()
    converted.save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, HFTokenizer)
    assert tok.vocab_size == reference.n_words
    assert tok.special_token_id("<|eot_id|>") == reference.eot_id
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (reference.bos_id, reference.eos_id, reference.pad_id)
    for text in TEXTS:
        assert tok.encode(text) == reference.encode(text, bos=False, eos=False), text
        assert tok.encode(text, allow_special=True) == reference.encode(
            text, bos=False, eos=False, allowed_special="all"), text
        assert tok.decode(tok.encode(text)) == text


CORPUS = [
    "the cat sits on the red couch in the living room",
    "a dog runs across the green field after a ball",
    "where is the cat? the cat is on the couch.",
    "what colour is the ball? the ball is blue.",
    "images show shapes: circles, squares and triangles of many colours",
] * 20


def _train_sentencepiece(tmp_path: Path, name: str, **kwargs) -> Path:
    import sentencepiece as spm

    prefix = tmp_path / name
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS), model_prefix=str(prefix), vocab_size=120,
                                   model_type="bpe", minloglevel=2, **kwargs)
    return prefix.with_suffix(".model")


def test_sentencepiece_gemma_style(tmp_path):
    import sentencepiece as spm

    path = _train_sentencepiece(tmp_path, "gemma", pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>",
                                eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>", add_dummy_prefix=False,
                                user_defined_symbols=["<start_of_turn>", "<end_of_turn>"])
    tok = load_tokenizer(path)
    ref = spm.SentencePieceProcessor(model_file=str(path))
    assert isinstance(tok, SentencePieceTokenizer)
    assert (tok.pad_id, tok.eos_id, tok.bos_id) == (0, 1, 2)
    assert tok.vocab_size == ref.get_piece_size() == 120
    controls = {i for i in range(ref.get_piece_size()) if ref.is_control(i) or ref.is_unknown(i)}
    user_defined = {ref.piece_to_id("<start_of_turn>"), ref.piece_to_id("<end_of_turn>")}
    assert set(tok.special_tokens.values()) == controls | user_defined
    assert tok.special_token_id("<start_of_turn>") == ref.piece_to_id("<start_of_turn>")
    for text in CORPUS[:5]:
        assert tok.encode(text) == ref.encode(text)
        assert tok.decode(tok.encode(text)) == text
    # Control tokens are matched only with allow_special; user-defined symbols always (sentencepiece's rule).
    assert tok.encode("<bos>the cat", allow_special=True) == [2] + ref.encode("the cat")
    assert 2 not in tok.encode("<bos>the cat")
    assert tok.encode("<start_of_turn>user") == ref.encode("<start_of_turn>user")
    assert tok.encode("<start_of_turn>user")[0] == tok.special_token_id("<start_of_turn>")


def test_sentencepiece_llama2_style_pad_falls_back_to_eos(tmp_path):
    path = _train_sentencepiece(tmp_path, "llama2")  # sentencepiece defaults: <unk>=0, <s>=1, </s>=2, no pad
    tok = load_tokenizer(path)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 2)
    assert tok.special_token_id("<s>") == 1


def test_word_tokenizer_roundtrip(tmp_path):
    tok = WordTokenizer.build(CORPUS)
    ids = tok.encode("Where is the cat? Under a zebra.")
    assert tok.decode(ids) == "where is the cat ? <unk> a <unk> ."  # "under" and "zebra" are not in CORPUS
    assert tok.encode("<user> hi", allow_special=True)[0] == tok.special_token_id("<user>")
    assert tok.special_token_id("<user>") not in tok.encode("<user> hi")
    tok.save(tmp_path / "tokenizer.json")
    loaded = load_tokenizer(tmp_path)
    assert isinstance(loaded, WordTokenizer)
    assert loaded.vocab_size == tok.vocab_size
    assert loaded.encode(CORPUS[2]) == tok.encode(CORPUS[2])
    assert (loaded.bos_id, loaded.eos_id, loaded.pad_id) == (tok.bos_id, tok.eos_id, tok.pad_id)


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer in directory"):
        load_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "missing.model")
    (tmp_path / "x.json").write_text('{"vocab": []}')
    with pytest.raises(ValueError, match="neither a Hugging Face"):
        load_tokenizer(tmp_path / "x.json")
    (tmp_path / "y.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_tokenizer(tmp_path / "y.json")
    (tmp_path / "tokenizer.model").write_bytes(b"\x00\x01garbage")
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        load_tokenizer(tmp_path)
    (tmp_path / "vocab.txt").write_text("hello\n")
    with pytest.raises(ValueError, match="unrecognised tokenizer file"):
        load_tokenizer(tmp_path / "vocab.txt")
