"""Tokenizers behind one small interface, and :func:`load_tokenizer` that picks the backend from the files.

Backends:

* :class:`Llama3Tokenizer` -- the Llama-3 tiktoken BPE file (``tokenizer.model``, lines of ``base64 rank``), with
  the same regex and the same 256 special tokens, in the same order, as ``llama_models/llama3/tokenizer.py``
  (``<|begin_of_text|>`` = 128000 ... ``<|eot_id|>`` = 128009, then ``<|reserved_special_token_N|>``).
* :class:`SentencePieceTokenizer` -- Llama-2 / Gemma style SentencePiece ``.model`` files.
* :class:`HFTokenizer` -- a Hugging Face ``tokenizer.json`` (read with the ``tokenizers`` library); ``bos``/``eos``/
  ``pad`` come from a ``tokenizer_config.json`` next to it when present.
* :class:`WordTokenizer` -- a tiny whitespace/punctuation word-level tokenizer with a fixed vocabulary, saved as
  JSON, for the demo and tests.

Every backend offers ``encode(text, allow_special=False)``, ``decode(ids)``, ``vocab_size``,
``special_token_id(name)`` / ``special_tokens`` and ``bos_id`` / ``eos_id`` / ``pad_id``. With
``allow_special=False`` the text of a special token (e.g. a user typing ``<|eot_id|>``) is encoded as plain text,
so data cannot inject control tokens; the one exception is SentencePiece's *user-defined* symbols, which the
SentencePiece library always matches in text.
"""
from __future__ import annotations

import abc
import json
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

__all__ = [
    "HFTokenizer",
    "Llama3Tokenizer",
    "SentencePieceTokenizer",
    "Tokenizer",
    "WordTokenizer",
    "load_tokenizer",
]


class Tokenizer(abc.ABC):
    """Common interface of all tokenizer backends."""

    #: special token text -> id
    special_tokens: dict[str, int]

    @abc.abstractmethod
    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        """Token ids of ``text`` (no BOS/EOS added). ``allow_special`` maps special-token text to its id."""

    @abc.abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``; special tokens are rendered as their text where the backend can."""

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Number of ids, special tokens included."""

    @property
    def bos_id(self) -> int | None:
        return None

    @property
    def eos_id(self) -> int | None:
        return None

    @property
    def pad_id(self) -> int | None:
        return None

    def has_special_token(self, name: str) -> bool:
        return name in self.special_tokens

    def special_token_id(self, name: str) -> int:
        """Id of the special token ``name``; a clear ``KeyError`` if this tokenizer has none by that name."""
        try:
            return self.special_tokens[name]
        except KeyError:
            known = sorted(self.special_tokens, key=self.special_tokens.get)
            shown = ", ".join(known[:16]) + (f", ... ({len(known)} in all)" if len(known) > 16 else "")
            raise KeyError(f"{type(self).__name__} has no special token {name!r}; it has: {shown}") from None


# --------------------------------------------------------------------------------------------- Llama-3 (tiktoken)

# Verbatim from llama_models/llama3/tokenizer.py.
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_NUM_SPECIAL_TOKENS = 256
LLAMA3_NAMED_SPECIAL_TOKENS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
    "<|image|>",
)
# tiktoken panics on very long inputs and on very long runs of (non-)whitespace; llama_models splits like this.
_TIKTOKEN_MAX_ENCODE_CHARS = 400_000
_TIKTOKEN_MAX_RUN_CHARS = 25_000


def llama3_special_token_names() -> list[str]:
    """The 256 Llama-3 special tokens in id order (id = number of BPE ranks + position)."""
    named = list(LLAMA3_NAMED_SPECIAL_TOKENS)
    reserved = [f"<|reserved_special_token_{2 + i}|>" for i in range(LLAMA3_NUM_SPECIAL_TOKENS - len(named))]
    return named + reserved


def _split_long_runs(text: str, max_run: int) -> Iterable[str]:
    """Pieces of ``text`` with no run of whitespace or of non-whitespace longer than ``max_run`` characters."""
    run_len, run_is_space, start = 0, text[:1].isspace(), 0
    for i, ch in enumerate(text):
        if ch.isspace() != run_is_space:
            run_len, run_is_space = 1, ch.isspace()
        else:
            run_len += 1
            if run_len > max_run:
                yield text[start:i]
                start, run_len = i, 1
    yield text[start:]


class Llama3Tokenizer(Tokenizer):
    """Llama-3 tiktoken BPE tokenizer (``tokenizer.model`` of the original Meta checkpoints)."""

    def __init__(self, model_path: str | os.PathLike):
        import tiktoken
        from tiktoken.load import load_tiktoken_bpe

        path = Path(model_path)
        if not path.is_file():
            raise FileNotFoundError(f"Llama-3 tokenizer file not found: {path}")
        try:
            ranks = load_tiktoken_bpe(str(path))
        except Exception as exc:  # tiktoken raises bare ValueErrors/binascii errors on a wrong file
            raise ValueError(f"{path} is not a tiktoken BPE file (lines of 'base64-token rank'): {exc}") from exc
        num_base = len(ranks)
        self.special_tokens = {name: num_base + i for i, name in enumerate(llama3_special_token_names())}
        self._encoding = tiktoken.Encoding(
            name=path.name, pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks, special_tokens=self.special_tokens
        )
        self._vocab_size = num_base + len(self.special_tokens)

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        allowed = "all" if allow_special else set()
        ids: list[int] = []
        for i in range(0, len(text), _TIKTOKEN_MAX_ENCODE_CHARS):
            for piece in _split_long_runs(text[i : i + _TIKTOKEN_MAX_ENCODE_CHARS], _TIKTOKEN_MAX_RUN_CHARS):
                ids.extend(self._encoding.encode(piece, allowed_special=allowed, disallowed_special=()))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._encoding.decode(list(ids))

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def bos_id(self) -> int:
        return self.special_tokens["<|begin_of_text|>"]

    @property
    def eos_id(self) -> int:
        return self.special_tokens["<|end_of_text|>"]

    @property
    def pad_id(self) -> int:
        return self.special_tokens["<|finetune_right_pad_id|>"]


# ------------------------------------------------------------------------------------------------- SentencePiece


class SentencePieceTokenizer(Tokenizer):
    """SentencePiece model (Llama-2, Gemma). Special tokens are its control and user-defined pieces."""

    def __init__(self, model_path: str | os.PathLike):
        import sentencepiece as spm

        path = Path(model_path)
        if not path.is_file():
            raise FileNotFoundError(f"SentencePiece model file not found: {path}")
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.Load(str(path))
        except Exception as exc:
            raise ValueError(f"{path} is not a SentencePiece model: {exc}") from exc
        sp = self._sp
        types = _sentencepiece_piece_types(sp.serialized_model_proto())
        self.special_tokens = {
            sp.IdToPiece(i): i for i, t in enumerate(types) if t in (_SP_UNKNOWN, _SP_CONTROL, _SP_USER_DEFINED)
        }
        # Longest first so that e.g. "<start_of_turn>" is not split by a shorter special token that prefixes it.
        names = sorted((n for n in self.special_tokens if n), key=len, reverse=True)
        self._special_pattern = re.compile("(" + "|".join(map(re.escape, names)) + ")") if names else None

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        if not allow_special or self._special_pattern is None:
            return list(self._sp.EncodeAsIds(text))
        ids: list[int] = []
        for i, piece in enumerate(self._special_pattern.split(text)):
            if i % 2:  # the pattern's capture group: a special token
                ids.append(self.special_tokens[piece])
            elif piece:
                ids.extend(self._sp.EncodeAsIds(piece))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.DecodeIds(list(ids))

    @property
    def vocab_size(self) -> int:
        return self._sp.GetPieceSize()

    @property
    def bos_id(self) -> int | None:
        return _optional_id(self._sp.bos_id())

    @property
    def eos_id(self) -> int | None:
        return _optional_id(self._sp.eos_id())

    @property
    def pad_id(self) -> int | None:
        """The model's pad piece; Llama-2 has none, so fall back to EOS (padding never carries loss)."""
        pad = _optional_id(self._sp.pad_id())
        return pad if pad is not None else self.eos_id


def _optional_id(i: int) -> int | None:
    return None if i < 0 else i


_SP_NORMAL, _SP_UNKNOWN, _SP_CONTROL, _SP_USER_DEFINED = 1, 2, 3, 4


def _sentencepiece_piece_types(model_proto: bytes) -> list[int]:
    """Piece types from a serialized SentencePiece ``ModelProto`` (the Python API exposes no user-defined check).

    Reads the protobuf wire format directly: ``ModelProto.pieces`` is field 1, and in each piece ``type`` is
    field 3 (default NORMAL), so the ``protobuf`` package is not needed.
    """

    def varint(buf: bytes, pos: int) -> tuple[int, int]:
        value = shift = 0
        while True:
            byte = buf[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                return value, pos

    def fields(buf: bytes):
        pos = 0
        while pos < len(buf):
            key, pos = varint(buf, pos)
            number, wire = key >> 3, key & 7
            if wire == 0:
                value, pos = varint(buf, pos)
            elif wire == 2:
                size, pos = varint(buf, pos)
                value, pos = buf[pos : pos + size], pos + size
            elif wire in (1, 5):
                size = 8 if wire == 1 else 4
                value, pos = buf[pos : pos + size], pos + size
            else:
                raise ValueError(f"unsupported protobuf wire type {wire} in SentencePiece model")
            yield number, value

    types = []
    for number, piece in fields(model_proto):
        if number == 1:
            types.append(next((v for n, v in fields(piece) if n == 3), _SP_NORMAL))
    return types


# ---------------------------------------------------------------------------------------- Hugging Face tokenizers


class HFTokenizer(Tokenizer):
    """A Hugging Face ``tokenizer.json``; BOS/EOS/PAD from ``tokenizer_config.json`` beside it when present."""

    _BOS_GUESSES = ("<|begin_of_text|>", "<bos>", "<s>")
    _EOS_GUESSES = ("<|end_of_text|>", "<eos>", "</s>", "<|im_end|>", "<|endoftext|>")  # Qwen: <|im_end|> (chat)
    _PAD_GUESSES = ("<|finetune_right_pad_id|>", "<pad>", "<|endoftext|>")

    def __init__(self, tokenizer_json: str | os.PathLike):
        from tokenizers import Tokenizer as _HFTokenizer

        path = Path(tokenizer_json)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer.json not found: {path}")
        try:
            self._tok = _HFTokenizer.from_file(str(path))
        except Exception as exc:
            raise ValueError(f"{path} is not a Hugging Face tokenizer.json: {exc}") from exc
        self.special_tokens = {t.content: i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
        config = _read_tokenizer_config(path.parent / "tokenizer_config.json")
        self._bos = self._resolve(config.get("bos_token"), self._BOS_GUESSES)
        self._eos = self._resolve(config.get("eos_token"), self._EOS_GUESSES)
        self._pad = self._resolve(config.get("pad_token"), self._PAD_GUESSES)

    def _resolve(self, configured, guesses: Sequence[str]) -> int | None:
        if isinstance(configured, dict):  # {"content": "<s>", ...} in older configs
            configured = configured.get("content")
        for name in ([configured] if configured else []) + list(guesses):
            token_id = self._tok.token_to_id(name)
            if token_id is not None:
                return token_id
        return None

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        self._tok.encode_special_tokens = not allow_special
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int | None:
        return self._bos

    @property
    def eos_id(self) -> int | None:
        return self._eos

    @property
    def pad_id(self) -> int | None:
        return self._pad if self._pad is not None else self._eos


def _read_tokenizer_config(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: invalid JSON: {exc}") from exc


# -------------------------------------------------------------------------------------------- tiny word tokenizer

WORD_TOKENIZER_FORMAT = "megatron_zero.word_tokenizer"
_WORD_PATTERN = re.compile(r"\w+|[^\w\s]")


class WordTokenizer(Tokenizer):
    """Word-level tokenizer for toy corpora: words and single punctuation marks, lower-cased, fixed vocabulary.

    Ids ``0..len(specials)-1`` are the special tokens (``<pad>``, ``<unk>``, ``<bos>``, ``<eos>``, the chat-role
    markers ``<system>``/``<user>``/``<assistant>``, the turn end ``<eot>`` and the image placeholder ``<image>``),
    then the words. Unknown words map to ``<unk>``. ``decode`` joins tokens with spaces.
    """

    DEFAULT_SPECIALS = ("<pad>", "<unk>", "<bos>", "<eos>", "<system>", "<user>", "<assistant>", "<eot>", "<image>")

    def __init__(self, words: Sequence[str], specials: Sequence[str] = DEFAULT_SPECIALS):
        for required in ("<pad>", "<unk>", "<bos>", "<eos>"):
            if required not in specials:
                raise ValueError(f"WordTokenizer specials must include {required!r}, got {list(specials)}")
        self._itos = list(specials) + [w for w in words if w not in specials]
        if len(set(self._itos)) != len(self._itos):
            raise ValueError("WordTokenizer vocabulary has duplicate words")
        self._stoi = {w: i for i, w in enumerate(self._itos)}
        self.special_tokens = {name: i for i, name in enumerate(specials)}
        self._special_pattern = re.compile("(" + "|".join(map(re.escape, specials)) + ")")

    @classmethod
    def build(cls, texts: Iterable[str], specials: Sequence[str] = DEFAULT_SPECIALS) -> WordTokenizer:
        """Vocabulary = every word of ``texts``, most frequent first (ties: first seen)."""
        counts: dict[str, int] = {}
        for text in texts:
            for word in _WORD_PATTERN.findall(text.lower()):
                counts[word] = counts.get(word, 0) + 1
        return cls(sorted(counts, key=lambda w: -counts[w]), specials)

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        pieces = self._special_pattern.split(text) if allow_special else [text]
        ids: list[int] = []
        for i, piece in enumerate(pieces):
            if i % 2:
                ids.append(self.special_tokens[piece])
            else:
                unk = self.special_tokens["<unk>"]
                ids.extend(self._stoi.get(w, unk) for w in _WORD_PATTERN.findall(piece.lower()))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return " ".join(self._itos[i] for i in ids)

    @property
    def vocab_size(self) -> int:
        return len(self._itos)

    @property
    def bos_id(self) -> int:
        return self.special_tokens["<bos>"]

    @property
    def eos_id(self) -> int:
        return self.special_tokens["<eos>"]

    @property
    def pad_id(self) -> int:
        return self.special_tokens["<pad>"]

    def save(self, path: str | os.PathLike) -> None:
        specials = list(self.special_tokens)
        payload = {"format": WORD_TOKENIZER_FORMAT, "specials": specials, "words": self._itos[len(specials) :]}
        Path(path).write_text(json.dumps(payload, ensure_ascii=False, indent=0), encoding="utf-8")

    @classmethod
    def load(cls, path: str | os.PathLike) -> WordTokenizer:
        payload = json.loads(Path(path).read_text(encoding="utf-8"))
        if payload.get("format") != WORD_TOKENIZER_FORMAT:
            raise ValueError(f"{path}: not a {WORD_TOKENIZER_FORMAT} file")
        return cls(payload["words"], payload["specials"])


# ------------------------------------------------------------------------------------------------------- loading

_TIKTOKEN_LINE = re.compile(rb"^[A-Za-z0-9+/]+={0,2} \d+\r?$")
_DIR_CANDIDATES = ("tokenizer.json", "tokenizer.model", "original/tokenizer.model")
TOKENIZER_DIR_CANDIDATES = _DIR_CANDIDATES  # the files load_tokenizer looks for in a directory


def load_tokenizer(path_or_dir: str | os.PathLike) -> Tokenizer:
    """Open a tokenizer, choosing the backend from the files present.

    A directory is searched for ``tokenizer.json``, then ``tokenizer.model``, then ``original/tokenizer.model``
    (Meta's layout). A ``.json`` file is a :class:`WordTokenizer` file if it says so, else a Hugging Face
    ``tokenizer.json``. A ``.model`` file is a Llama-3 tiktoken BPE file if its first line is ``base64 rank``,
    else a SentencePiece model.
    """
    path = Path(path_or_dir)
    if path.is_dir():
        found = [path / c for c in _DIR_CANDIDATES if (path / c).is_file()]
        if not found:
            raise FileNotFoundError(
                f"no tokenizer in directory {path}: expected one of {', '.join(_DIR_CANDIDATES)}"
            )
        path = found[0]
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer path does not exist: {path}")

    if path.suffix == ".json":
        try:
            payload = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path}: tokenizer JSON is not valid JSON: {exc}") from exc
        if isinstance(payload, dict) and payload.get("format") == WORD_TOKENIZER_FORMAT:
            return WordTokenizer.load(path)
        if isinstance(payload, dict) and "model" in payload:
            return HFTokenizer(path)
        raise ValueError(f"{path}: JSON is neither a Hugging Face tokenizer.json (no 'model' key) "
                         f"nor a {WORD_TOKENIZER_FORMAT} file")

    with open(path, "rb") as f:
        first_line = f.readline(4096).rstrip(b"\n")
    if _TIKTOKEN_LINE.match(first_line):
        return Llama3Tokenizer(path)
    if path.suffix == ".model":
        return SentencePieceTokenizer(path)
    raise ValueError(
        f"{path}: unrecognised tokenizer file; expected tokenizer.json (Hugging Face), a tiktoken BPE "
        "tokenizer.model (Llama-3), a SentencePiece .model (Llama-2/Gemma) or a word-tokenizer JSON"
    )
