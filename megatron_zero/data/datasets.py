"""Conversation datasets (LLaVA-1.5 JSON, text-only instruction JSONL), their tokenisation and ratio mixtures.

Reading turns a file into :class:`Conversation` records (malformed input raises with file name and record index);
:meth:`ChatDataset.build` applies the chat template once to every record and keeps the tokens in flat numpy
arrays, so lengths are known up front (for packing) and memory stays small; ``dataset[i]`` is a :class:`Sample`.

Length cap: lengths are measured with every image placeholder counted as ``num_image_tokens`` positions (what
the LLM sees after the placeholder is expanded into image features). An over-long sample loses its trailing
tokens; a cut that would fall inside an image's features is moved before that image, and images after the cut
are dropped with it. A sample that then keeps none of its images, or no token carrying loss, is skipped and
counted in :attr:`ChatDataset.skipped`.

Formats:

* LLaVA-1.5 JSON: ``[{"id", "image": "rel/path.jpg" (optional; a list for several images),
  "conversations": [{"from": "human"|"gpt"|"system", "value": "..."}]}]``; ``<image>`` tags mark where images go
  (if a record has images but no tag, one ``<image>\\n`` is put before the first user text, as LLaVA does).
* Instruction JSONL (GenQA-style), one object per line, with ``"messages"`` (or ``"conversations"``, or a list
  ``"text"``) of ``{"role", "content"}``/``{"from", "value"}`` dicts, or ``{"prompt", "response"}``, or
  ``{"question", "answer"}``.
"""
from __future__ import annotations

import collections
import json
import logging
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from megatron_zero.data.chat_template import IMAGE_TAG, ChatTemplate, Message
from megatron_zero.errors import DataError

__all__ = [
    "ChatDataset",
    "Conversation",
    "MixtureDataset",
    "Sample",
    "TokenizationConfig",
    "llava_conversation",
    "read_instruction_jsonl",
    "read_llava_json",
    "read_llava_records",
    "truncate_sample",
]

log = logging.getLogger(__name__)

_ROLE_ALIASES = {
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "model": "assistant",
    "system": "system",
}


@dataclass
class Conversation:
    """One training conversation before tokenisation."""

    messages: list[Message]
    image_paths: list[str] = field(default_factory=list)
    id: str = ""


@dataclass
class Sample:
    """A tokenised conversation: ``loss_mask`` is aligned with ``input_ids`` (True = training target)."""

    input_ids: np.ndarray  # int64 [n]
    loss_mask: np.ndarray  # bool [n]
    image_paths: list[str]
    source: str = ""
    id: str = ""

    @property
    def num_images(self) -> int:
        return len(self.image_paths)

    def labels(self, ignore_index: int = -100) -> np.ndarray:
        return np.where(self.loss_mask, self.input_ids, ignore_index)

    def expanded_length(self, num_image_tokens: int) -> int:
        """Length once each image placeholder is expanded into ``num_image_tokens`` positions."""
        return len(self.input_ids) + self.num_images * (num_image_tokens - 1)


@dataclass
class TokenizationConfig:
    max_seq_len: int  # cap on the expanded length (images counted as num_image_tokens)
    num_image_tokens: int = 576  # LLaVA-1.5's CLIP ViT-L/14 at 336 px: 24 x 24 patches
    loss_on_special_tokens: bool = False  # Sec. A.9's rule for encoder-only stages
    #: formats with varying prompts (``--prompt-format zero``'s image prompt) draw them from a generator seeded by
    #: (seed, record index, record id), so a dataset tokenises identically on every rank and every resume; the
    #: authors redraw per epoch, here the draw is fixed per record.
    prompt_seed: int = 0

    def __post_init__(self):
        if self.max_seq_len < 1 or self.num_image_tokens < 1:
            raise ValueError(f"max_seq_len and num_image_tokens must be >= 1, got {self}")


# ----------------------------------------------------------------------------------------------------- reading


class _RecordError(DataError):
    pass


def _messages_from_turns(turns: Any) -> list[Message]:
    if not isinstance(turns, list) or not turns:
        raise _RecordError("conversation must be a non-empty list of turns")
    messages = []
    for j, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise _RecordError(f"turn {j} must be an object, got {type(turn).__name__}")
        role = turn.get("role", turn.get("from"))
        content = turn.get("content", turn.get("value"))
        if role not in _ROLE_ALIASES:
            raise _RecordError(f"turn {j}: unknown role {role!r}; expected one of {sorted(_ROLE_ALIASES)}")
        if not isinstance(content, str):
            raise _RecordError(f"turn {j}: content/value must be a string, got {type(content).__name__}")
        messages.append(Message(_ROLE_ALIASES[role], content))
    return messages


def _attach_images(messages: list[Message], images: list[str]) -> list[Message]:
    """Check that ``<image>`` tags match the images; add the tag LLaVA-style when a record has none."""
    tags = sum(m.content.count(IMAGE_TAG) for m in messages)
    if images and tags == 0:
        first_user = next((j for j, m in enumerate(messages) if m.role == "user"), None)
        if first_user is None:
            raise _RecordError("record has an image but no user turn to attach it to")
        m = messages[first_user]
        messages = list(messages)
        messages[first_user] = Message(m.role, IMAGE_TAG * len(images) + "\n" + m.content)
    elif tags != len(images):
        raise _RecordError(f"{tags} {IMAGE_TAG} tag(s) but {len(images)} image(s)")
    return messages


def read_llava_json(path: str | os.PathLike, image_root: str | os.PathLike | None = None) -> list[Conversation]:
    """Read a LLaVA-1.5 JSON file; image paths are joined to ``image_root`` (default: the file's folder)."""
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    out = []
    for i, rec in enumerate(read_llava_records(path)):
        conv = llava_conversation(rec, f"{path}: record {i}", default_id=str(i))
        out.append(Conversation(conv.messages, [str(root / p) for p in conv.image_paths], conv.id))
    return out


def read_llava_records(path: str | os.PathLike) -> list:
    """The raw records of a LLaVA-1.5 JSON file (a JSON list), unchecked; unreadable files raise ``DataError``."""
    try:
        with open(path, encoding="utf-8") as f:
            records = json.load(f)
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason}); expected a UTF-8 JSON file") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from exc
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a JSON list of records, got {type(records).__name__}")  # noqa: TRY004 (bad file)
    return records


def llava_conversation(rec: Any, where: str, default_id: str = "") -> Conversation:
    """One LLaVA-1.5 record as a :class:`Conversation` (image paths as the record gives them).

    Raises:
        DataError: ``"<where> (id ...): <what is wrong>"``.
    """
    try:
        if not isinstance(rec, dict):
            raise _RecordError(f"expected an object, got {type(rec).__name__}")
        if "conversations" not in rec:
            raise _RecordError("missing 'conversations'")
        image = rec.get("image")
        images = [] if image is None else [image] if isinstance(image, str) else image
        if not isinstance(images, list) or not all(isinstance(p, str) and p for p in images):
            raise _RecordError(f"'image' must be a path or a list of paths, got {image!r}")
        messages = _attach_images(_messages_from_turns(rec["conversations"]), images)
    except _RecordError as exc:
        raise DataError(f"{where} (id {_record_id(rec)}): {exc}") from None
    return Conversation(messages, list(images), str(rec.get("id", default_id)))


def _record_id(rec: Any) -> str:
    return repr(rec.get("id")) if isinstance(rec, dict) and "id" in rec else "n/a"


def read_instruction_jsonl(path: str | os.PathLike) -> list[Conversation]:
    """Read a text-only instruction JSONL file (formats in the module docstring)."""
    path = Path(path)
    out = []
    with open(path, encoding="utf-8", errors="strict") as f:
        try:
            lines = list(f)
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason}); expected a UTF-8 JSONL file") from None
        for line_no, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}: line {line_no}: invalid JSON: {exc.msg}") from exc
            try:
                messages = _instruction_messages(rec)
                _attach_images(messages, [])
            except _RecordError as exc:
                raise DataError(f"{path}: line {line_no} (id {_record_id(rec)}): {exc}") from None
            out.append(Conversation(messages, [], str(rec.get("id", line_no))))
    return out


def _instruction_messages(rec: Any) -> list[Message]:
    if not isinstance(rec, dict):
        raise _RecordError(f"expected an object, got {type(rec).__name__}")
    for key in ("messages", "conversations", "text"):
        if isinstance(rec.get(key), list):
            return _messages_from_turns(rec[key])
    for q, a in (("prompt", "response"), ("question", "answer")):
        if q in rec and a in rec:
            if not isinstance(rec[q], str) or not isinstance(rec[a], str):
                raise _RecordError(f"'{q}' and '{a}' must be strings")
            return [Message("user", rec[q]), Message("assistant", rec[a])]
    raise _RecordError("expected 'messages' (list of {role, content}), 'prompt'+'response' or 'question'+'answer'; "
                       f"found keys {sorted(rec)}")


# ------------------------------------------------------------------------------------------------- truncation


def truncate_sample(
    input_ids: np.ndarray,
    loss_mask: np.ndarray,
    image_paths: Sequence[str],
    placeholder_id: int | None,
    num_image_tokens: int,
    max_len: int,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Drop trailing tokens so the expanded length is at most ``max_len``, never cutting inside an image.

    Each placeholder occupies ``num_image_tokens`` positions; the cut is at the last token boundary that fits,
    so an image that does not fit entirely is dropped together with everything after it.
    """
    is_image = input_ids == placeholder_id if placeholder_id is not None else np.zeros(len(input_ids), bool)
    ends = np.cumsum(np.where(is_image, num_image_tokens, 1))
    keep = int(np.searchsorted(ends, max_len, side="right"))
    kept_images = int(is_image[:keep].sum())
    return input_ids[:keep], loss_mask[:keep], list(image_paths[:kept_images])


# ---------------------------------------------------------------------------------------------------- datasets


class ChatDataset:
    """Tokenised conversations of one source, stored flat; ``len``/``[i]`` give :class:`Sample` objects."""

    def __init__(self, source: str, ids: np.ndarray, masks: np.ndarray, offsets: np.ndarray,
                 images: list[list[str]], record_ids: list[str], placeholder_id: int | None,
                 skipped: collections.Counter, truncated: int):
        self.source = source
        self._ids, self._masks, self._offsets = ids, masks, offsets
        self._images, self._record_ids = images, record_ids
        self.placeholder_id = placeholder_id
        #: reason -> number of records dropped ("image_does_not_fit", "no_target_tokens")
        self.skipped = skipped
        #: number of kept samples that lost trailing tokens to the length cap
        self.truncated = truncated

    @classmethod
    def build(cls, conversations: Sequence[Conversation], template: ChatTemplate, config: TokenizationConfig,
              source: str = "") -> ChatDataset:
        """Apply ``template`` to every conversation, cap lengths, drop what cannot be trained on."""
        ids, masks, lengths, images, record_ids = [], [], [], [], []
        needed = []  # every conversation's full length, images expanded (for the error a too-short cap gives)
        skipped: collections.Counter = collections.Counter()
        truncated = 0
        placeholder = template.image_placeholder_id
        for index, conv in enumerate(tqdm(conversations, desc=f"tokenising {source or 'conversations'}", unit="conv",
                                          disable=len(conversations) < 10_000)):
            try:
                rng = random.Random(f"{config.prompt_seed}:{index}:{conv.id}")
                enc = template.encode(conv.messages, loss_on_special_tokens=config.loss_on_special_tokens, rng=rng)
            except ValueError as exc:
                raise ValueError(f"{source}: conversation {conv.id!r}: {exc}") from None
            tok = np.asarray(enc.input_ids, dtype=np.int64)
            mask = np.asarray(enc.loss_mask, dtype=bool)
            needed.append(len(tok) + int((tok == placeholder).sum()) * (config.num_image_tokens - 1)
                          if placeholder is not None else len(tok))
            tok, mask, kept = truncate_sample(tok, mask, conv.image_paths, placeholder, config.num_image_tokens,
                                              config.max_seq_len)
            if conv.image_paths and not kept:
                skipped["image_does_not_fit"] += 1
                continue
            if not mask.any():
                skipped["no_target_tokens"] += 1
                continue
            truncated += len(tok) < len(enc.input_ids)
            ids.append(tok)
            masks.append(mask)
            lengths.append(len(tok))
            images.append(kept)
            record_ids.append(conv.id)
        if skipped:
            log.warning("%s: skipped %s of %d conversations (max_seq_len=%d, num_image_tokens=%d)", source,
                        dict(skipped), len(conversations), config.max_seq_len, config.num_image_tokens)
        offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
        flat_ids = np.concatenate(ids).astype(np.int32) if ids else np.zeros(0, np.int32)
        flat_masks = np.concatenate(masks) if masks else np.zeros(0, bool)
        ds = cls(source, flat_ids, flat_masks, offsets, images, record_ids, placeholder, skipped, truncated)
        ds.needed_lengths = np.asarray(needed, dtype=np.int64)
        return ds

    def __len__(self) -> int:
        return len(self._images)

    def __getitem__(self, i: int) -> Sample:
        if not -len(self) <= i < len(self):
            raise IndexError(f"{self.source}: index {i} out of range for {len(self)} samples")
        i = i % len(self)
        lo, hi = self._offsets[i], self._offsets[i + 1]
        return Sample(self._ids[lo:hi].astype(np.int64), self._masks[lo:hi].copy(), list(self._images[i]),
                      self.source, self._record_ids[i])

    def lengths(self, num_image_tokens: int) -> np.ndarray:
        """Expanded length of every sample (for packing/bucketing without materialising samples)."""
        num_images = np.fromiter((len(x) for x in self._images), dtype=np.int64, count=len(self))
        return np.diff(self._offsets) + num_images * (num_image_tokens - 1)


class MixtureDataset:
    """Samples from several datasets in fixed proportions, deterministic given ``seed``.

    ``weights`` are normalised. Of ``num_samples`` mixture samples (default: as many as possible without repeating
    any dataset, i.e. ``min_k len_k / w_k``), dataset ``k`` supplies ``round(w_k * num_samples)`` (largest
    remainder), drawn from seeded permutations of its indices (a new permutation each time it is exhausted).
    The sources are interleaved evenly, so every prefix of the mixture has close to the target proportions.
    """

    def __init__(self, datasets: Sequence[ChatDataset], weights: Sequence[float], seed: int = 0,
                 num_samples: int | None = None):
        if len(datasets) != len(weights) or not datasets:
            raise ValueError(f"need one weight per dataset, got {len(datasets)} datasets, {len(weights)} weights")
        w = np.asarray(weights, dtype=np.float64)
        if (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"mixture weights must be >= 0 and not all 0, got {list(weights)}")
        for d, wk in zip(datasets, w):
            if wk > 0 and len(d) == 0:
                raise ValueError(f"dataset {d.source!r} has weight {wk} but no samples")
        w = w / w.sum()
        if num_samples is None:
            num_samples = int(min(len(d) / wk for d, wk in zip(datasets, w) if wk > 0))
        self.datasets = list(datasets)
        self.weights = w
        self.counts = _largest_remainder(w, num_samples)
        rng = np.random.default_rng(seed)
        picks, positions = [], []
        for k, (d, n) in enumerate(zip(datasets, self.counts)):
            reps = -(-n // len(d)) if n else 0
            perm = np.concatenate([rng.permutation(len(d)) for _ in range(reps)])[:n] if n else np.zeros(0, int)
            picks.append(np.stack([np.full(n, k), perm], axis=1))
            positions.append((np.arange(n) + 0.5) / n if n else np.zeros(0))  # even spread of source k
        picks_all = np.concatenate(picks)
        order = np.lexsort((picks_all[:, 0], np.concatenate(positions)))
        self._index = picks_all[order]  # [num_samples, 2]: (dataset, sample)

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, i: int) -> Sample:
        k, j = self._index[i]
        return self.datasets[k][int(j)]

    def source_of(self, i: int) -> int:
        return int(self._index[i, 0])

    def lengths(self, num_image_tokens: int) -> np.ndarray:
        out = np.zeros(len(self), dtype=np.int64)
        for k, d in enumerate(self.datasets):
            rows = self._index[:, 0] == k
            out[rows] = d.lengths(num_image_tokens)[self._index[rows, 1]]
        return out


def _largest_remainder(weights: np.ndarray, total: int) -> list[int]:
    exact = weights * total
    counts = np.floor(exact).astype(int)
    short = total - counts.sum()
    counts[np.argsort(-(exact - counts), kind="stable")[:short]] += 1
    return counts.tolist()
