"""Chat templates per model family, producing token ids and an exact token-level loss mask.

A template lays a conversation out as *segments* -- special tokens (looked up by name in the tokenizer, never
hard-coded ids), template text (role names, newlines), prompt text and response text -- and tokenises segment by
segment, so every token's origin, and hence its loss flag, is known exactly.

Which tokens carry loss (``loss_mask[i]`` is True when ``input_ids[i]`` is a prediction target):

* default (VLM practice, the green tokens of Sec. A.9): the assistant's response tokens and the special token that
  closes an assistant turn (``<|eot_id|>`` for Llama-3, ``</s>`` for Llama-2, ``<end_of_turn>`` for Gemma,
  ``<eot>`` for the word tokenizer).
* ``loss_on_special_tokens=True`` (Sec. A.9's rule for encoder-only training, the blue tokens): additionally every
  special token the template inserts -- for Llama-3 ``<|begin_of_text|>``, ``<|start_header_id|>``,
  ``<|end_header_id|>`` and the ``<|eot_id|>`` closing user/system turns. A.9's example colours exactly these
  blue; the role names (``user``, ``assistant``) and the ``\\n\\n`` after each header stay black (no loss), and so
  does all prompt text. For the other families the same rule applies to their special tokens (Llama-2: ``<s>``,
  ``</s>``; Gemma: ``<bos>``, ``<start_of_turn>``, ``<end_of_turn>``; word: ``<bos>``, role markers, ``<eot>``).
* Never: prompt text, template text, image placeholders.

The mask is aligned with ``input_ids`` (not shifted): under next-token prediction the target at position ``i`` is
predicted from position ``i-1``, so the first token (``<|begin_of_text|>``) can never actually be a target even
when its flag is set; shifting happens when batches are built (:mod:`megatron_zero.data.packing`).

Images: each ``<image>`` tag in user/system text becomes one placeholder id, which the model later expands into
the image's embeddings. Defaults: Llama-3 uses ``<|reserved_special_token_0|>`` (id 128002, reserved and unused
in every Llama-3.x release; ``<|image|>`` is avoided because its id differs between releases), Gemma
``<image_soft_token>`` or ``<unused0>``, the word tokenizer ``<image>``; Llama-2 has no spare token, so pass
``image_placeholder`` (a token name or id) for image data there. Text is otherwise encoded with
``allow_special=False``, so data cannot forge special tokens or placeholders.
"""
from __future__ import annotations

import abc
import enum
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from megatron_zero.data.tokenizers import Tokenizer, WordTokenizer

__all__ = [
    "IMAGE_TAG",
    "PROMPT_FORMATS",
    "ZERO_IMAGE_PROMPTS",
    "ZeroLlama3ChatTemplate",
    "zero_image_prompt",
    "ChatTemplate",
    "EncodedChat",
    "GemmaChatTemplate",
    "Llama2ChatTemplate",
    "Llama3ChatTemplate",
    "Message",
    "Qwen3ChatTemplate",
    "QwenChatTemplate",
    "WordChatTemplate",
    "chat_template_for",
]

IMAGE_TAG = "<image>"
ROLES = ("system", "user", "assistant")
#: ``--prompt-format``: ``meta`` = each family's own chat format; ``zero`` = the authors' (facebookresearch/zero)
#: Llama-3 layout, image prompt and loss masks (:class:`ZeroLlama3ChatTemplate`).
PROMPT_FORMATS = ("meta", "zero")

#: The authors' 30 caption templates wrapped around the image tokens (``template_for_image_tokens`` in their
#: ``src/methods/_questions_prompt_for_caption.py``), in their order: training draws one at random per user turn,
#: evaluation and inference use the first.
ZERO_IMAGE_PROMPTS = (
    "Based on the visual elements captured in this image of",
    "Drawing from what's shown in this photograph/illustration of",
    "Examining the details visible in this visual representation of",
    "Looking at the scene depicted in this image featuring",
    "Observing the components displayed in this visual of",
    "With attention to the specific details portrayed in this image of",
    "Considering the visual narrative presented in this scene of",
    "Noting the key elements highlighted in this visual capture of",
    "Reviewing the visual information documented in this image of",
    "Analyzing the pictorial evidence shown in this representation of",
    "In the context of what's depicted in this visual of",
    "Given the scene captured in this image showing",
    "Within the framework of what's illustrated here about",
    "From the perspective offered by this visual portrayal of",
    "Through the lens of what's represented in this image of",
    "Interpreting the visual cues present in this depiction of",
    "Decoding the visual information conveyed in this image of",
    "Making sense of the visual elements arranged in this scene of",
    "Processing the visual data presented in this capture of",
    "Reading the visual story told through this image of",
    "Focusing on the specific visual components shown in this image of",
    "Zeroing in on the particular elements depicted in this visual of",
    "Concentrating on the detailed representation provided in this image of",
    "Examining the precise visual information contained in this portrayal of",
    "Studying the exact visual features presented in this illustration of",
    "Let's explore what this image reveals about",
    "Let's break down the visual elements shown here regarding",
    "Let's analyze what we can see in this depiction of",
    "Let's examine the visual information captured about",
    "Let's investigate what this image tells us about",
)


@dataclass(frozen=True)
class Message:
    role: str  # "system" | "user" | "assistant"
    content: str


@dataclass
class EncodedChat:
    input_ids: list[int]
    loss_mask: list[bool]  # aligned with input_ids: True = this token is a training target
    num_images: int

    def labels(self, ignore_index: int = -100) -> list[int]:
        """``input_ids`` with non-target positions set to ``ignore_index`` (unshifted, like ``loss_mask``)."""
        return [t if m else ignore_index for t, m in zip(self.input_ids, self.loss_mask)]


class _Kind(enum.Enum):
    SPECIAL = "special"  # a template special token: loss only with loss_on_special_tokens
    SPECIAL_NO_LOSS = "special_no_loss"  # a template special token that never carries loss
    TURN_END = "turn_end"  # the special token closing an assistant turn: always loss
    TEXT = "text"  # template text (role names, newlines): never loss
    PROMPT = "prompt"  # user/system content, may hold <image> tags: never loss
    RESPONSE = "response"  # assistant content: loss


@dataclass(frozen=True)
class _Segment:
    kind: _Kind
    value: str  # the special token's name, or the text


class ChatTemplate(abc.ABC):
    """Base class: subclasses lay out segments; this class tokenises them and builds the mask."""

    family: str
    prompt_format: str = "meta"
    image_token_candidates: tuple[str, ...] = ()

    def __init__(self, tokenizer: Tokenizer, image_placeholder: int | str | None = None):
        self.tokenizer = tokenizer
        self.image_placeholder_id = self._resolve_image_placeholder(image_placeholder)

    def _resolve_image_placeholder(self, placeholder: int | str | None) -> int | None:
        if isinstance(placeholder, int):
            if not 0 <= placeholder < self.tokenizer.vocab_size:
                raise ValueError(f"image placeholder id {placeholder} outside the vocabulary "
                                 f"[0, {self.tokenizer.vocab_size})")
            return placeholder
        if isinstance(placeholder, str):
            return self.tokenizer.special_token_id(placeholder)
        for name in self.image_token_candidates:
            if self.tokenizer.has_special_token(name):
                return self.tokenizer.special_token_id(name)
        return None

    @property
    @abc.abstractmethod
    def stop_token_ids(self) -> list[int]:
        """Ids that end a generated assistant turn."""

    @abc.abstractmethod
    def _segments(self, messages: Sequence[Message], add_generation_prompt: bool) -> Iterator[_Segment]:
        """The conversation as segments, in order."""

    def encode(
        self,
        messages: Sequence[Message],
        *,
        loss_on_special_tokens: bool = False,
        add_generation_prompt: bool = False,
        rng: random.Random | None = None,
    ) -> EncodedChat:
        """Token ids and loss mask of ``messages``; with ``add_generation_prompt`` it ends with the assistant header.

        ``rng`` (training) lets a format that varies its prompts draw them (the ``zero`` format's image prompt);
        without it (evaluation, inference) the format's fixed default is used. The ``meta`` formats ignore it.
        """
        _validate(messages)
        messages = self._rewrite(messages, rng)
        ids: list[int] = []
        mask: list[bool] = []
        num_images = 0
        for seg in self._segments(messages, add_generation_prompt):
            if seg.kind in (_Kind.SPECIAL, _Kind.TURN_END, _Kind.SPECIAL_NO_LOSS):
                ids.append(self.tokenizer.special_token_id(seg.value))
                mask.append(seg.kind is _Kind.TURN_END or (loss_on_special_tokens and seg.kind is _Kind.SPECIAL))
            elif seg.kind is _Kind.PROMPT:
                pieces = seg.value.split(IMAGE_TAG)
                for i, piece in enumerate(pieces):
                    if i:
                        ids.append(self._image_id())
                        mask.append(False)
                        num_images += 1
                    toks = self.tokenizer.encode(piece) if piece else []
                    ids.extend(toks)
                    mask.extend([False] * len(toks))
            else:
                toks = self.tokenizer.encode(seg.value) if seg.value else []
                ids.extend(toks)
                mask.extend([seg.kind is _Kind.RESPONSE] * len(toks))
        return EncodedChat(ids, mask, num_images)

    def _rewrite(self, messages: Sequence[Message], rng: random.Random | None) -> Sequence[Message]:
        """Hook for formats that rewrite message contents before layout (identity here)."""
        return messages

    def _image_id(self) -> int:
        if self.image_placeholder_id is None:
            raise ValueError(
                f"the {self.family} chat template has no image placeholder token for {IMAGE_TAG!r}: this tokenizer "
                f"has none of {list(self.image_token_candidates)}; pass image_placeholder=<token name or id>"
            )
        return self.image_placeholder_id


def _validate(messages: Sequence[Message]) -> None:
    if not messages:
        raise ValueError("empty conversation")
    for i, m in enumerate(messages):
        if m.role not in ROLES:
            raise ValueError(f"message {i}: unknown role {m.role!r}; expected one of {ROLES}")
        if not isinstance(m.content, str):
            raise TypeError(f"message {i}: content must be a string, got {type(m.content).__name__}")
        if m.role == "system" and i != 0:
            raise ValueError(f"message {i}: a system message may only come first")
        if m.role == "assistant" and IMAGE_TAG in m.content:
            raise ValueError(f"message {i}: {IMAGE_TAG!r} in an assistant turn; images belong to user turns")


def _content_kind(role: str) -> _Kind:
    return _Kind.RESPONSE if role == "assistant" else _Kind.PROMPT


class Llama3ChatTemplate(ChatTemplate):
    """``<|begin_of_text|>`` then per turn ``<|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>``.

    Tokenised as ``llama_models.llama3.chat_format.ChatFormat`` does (role, ``\\n\\n`` and content separately).
    """

    family = "llama3"
    image_token_candidates = ("<|reserved_special_token_0|>",)

    @property
    def stop_token_ids(self) -> list[int]:
        return [self.tokenizer.special_token_id(t) for t in ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>")]

    def _header(self, role: str) -> Iterator[_Segment]:
        yield _Segment(_Kind.SPECIAL, "<|start_header_id|>")
        yield _Segment(_Kind.TEXT, role)
        yield _Segment(_Kind.SPECIAL, "<|end_header_id|>")
        yield _Segment(_Kind.TEXT, "\n\n")

    def _segments(self, messages, add_generation_prompt):
        yield _Segment(_Kind.SPECIAL, "<|begin_of_text|>")
        for m in messages:
            yield from self._header(m.role)
            yield _Segment(_content_kind(m.role), m.content)
            yield _Segment(_Kind.TURN_END if m.role == "assistant" else _Kind.SPECIAL, "<|eot_id|>")
        if add_generation_prompt:
            yield from self._header("assistant")


def zero_image_prompt(content: str, prompt: str) -> str:
    """The authors' image prompt for a user turn holding one ``<image>``: ``"{prompt}<image>, {question}"``.

    As their ``forward_hf``/``_construct_model_inputs`` do: drop ``"<image>\\n"`` and ``"\\n<image>"``, strip, lower-case
    the first character of the question, then join with no space before the image and ``", "`` after it. Their
    code handles only an image at the start or end of the turn (LLaVA's layout); any other ``<image>`` would stay
    as literal text there, so it is an error here.
    """
    text = content.replace(IMAGE_TAG + "\n", "").replace("\n" + IMAGE_TAG, "").strip()
    if IMAGE_TAG in text:
        raise ValueError(
            f"--prompt-format zero supports one {IMAGE_TAG!r} per user turn, at its start ('<image>\\n...') or end "
            f"('...\\n<image>'), as the authors' code; got {content[:80]!r}")
    if text:
        text = text[0].lower() + text[1:]
    return f"{prompt}{IMAGE_TAG}, {text}"


class ZeroLlama3ChatTemplate(Llama3ChatTemplate):
    """The authors' Llama-3 layout (facebookresearch/zero, ``engine_ar_instruction_llama.py``), ``--prompt-format zero``.

    Their ``chat_template``: ``<|begin_of_text|>`` then per turn
    ``<|start_header_id|>{role}<|end_header_id|>\\n{content}<|eot_id|>`` -- a *single* ``\\n`` after the header
    (Meta's format has ``\\n\\n``) and no system prompt; the generation prompt is
    ``<|start_header_id|>assistant<|end_header_id|>\\n``. The ``\\n`` and the content are tokenised as one string,
    as their ``apply_chat_template`` does (special tokens split it, so the image placeholder is its own token).

    A user turn with an ``<image>`` gets their image prompt (:func:`zero_image_prompt`): one of
    :data:`ZERO_IMAGE_PROMPTS` drawn with ``encode(..., rng=...)`` in training, the first one without ``rng``.

    Loss mask (their ``ignore_instruction_token_ids=True``): the ``\\n`` after the assistant header, the response
    and its ``<|eot_id|>``. With ``loss_on_special_tokens`` (their
    ``include_special_tokens_in_masking_instruction_tokens``, on in their stages 1 and 2) also
    ``<|start_header_id|>``/``<|end_header_id|>`` of every turn and the ``<|eot_id|>`` closing user turns; never
    ``<|begin_of_text|>``, the role names, or prompt text.
    """

    prompt_format = "zero"

    def _header(self, role: str) -> Iterator[_Segment]:
        yield _Segment(_Kind.SPECIAL, "<|start_header_id|>")
        yield _Segment(_Kind.TEXT, role)
        yield _Segment(_Kind.SPECIAL, "<|end_header_id|>")

    def _rewrite(self, messages, rng):
        out = []
        for m in messages:
            if m.role == "user" and IMAGE_TAG in m.content:
                prompt = rng.choice(ZERO_IMAGE_PROMPTS) if rng is not None else ZERO_IMAGE_PROMPTS[0]
                m = Message(m.role, zero_image_prompt(m.content, prompt))
            out.append(m)
        return out

    def _segments(self, messages, add_generation_prompt):
        yield _Segment(_Kind.SPECIAL_NO_LOSS, "<|begin_of_text|>")
        for m in messages:
            yield from self._header(m.role)
            yield _Segment(_content_kind(m.role), "\n" + m.content)
            yield _Segment(_Kind.TURN_END if m.role == "assistant" else _Kind.SPECIAL, "<|eot_id|>")
        if add_generation_prompt:
            yield from self._header("assistant")
            yield _Segment(_Kind.TEXT, "\n")


class QwenChatTemplate(ChatTemplate):
    """Qwen2.5's ChatML: per turn ``<|im_start|>{role}\n{content}<|im_end|>\n``; generation prompt
    ``<|im_start|>assistant\n``. Without a system message Qwen2.5 inserts its default one (as its HF template does).

    Loss (default): the assistant's content and its ``<|im_end|>``; the ``\n`` after it and the role lines carry
    none. With ``loss_on_special_tokens`` every ``<|im_start|>`` / ``<|im_end|>`` as well.
    """

    family = "qwen2"
    image_token_candidates = ("<|image_pad|>", "<|vision_pad|>")
    default_system = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

    @property
    def stop_token_ids(self) -> list[int]:
        return [self.tokenizer.special_token_id(t) for t in ("<|im_end|>", "<|endoftext|>")
                if self.tokenizer.has_special_token(t)]

    def _assistant_prefix(self) -> str:
        return ""

    def _segments(self, messages, add_generation_prompt):
        if self.default_system and messages[0].role != "system":
            messages = [Message("system", self.default_system), *messages]
        for m in messages:
            yield _Segment(_Kind.SPECIAL, "<|im_start|>")
            yield _Segment(_Kind.TEXT, f"{m.role}\n" + (self._assistant_prefix() if m.role == "assistant" else ""))
            yield _Segment(_content_kind(m.role), m.content)
            yield _Segment(_Kind.TURN_END if m.role == "assistant" else _Kind.SPECIAL, "<|im_end|>")
            yield _Segment(_Kind.TEXT, "\n")
        if add_generation_prompt:
            yield _Segment(_Kind.SPECIAL, "<|im_start|>")
            yield _Segment(_Kind.TEXT, "assistant\n" + self._assistant_prefix())


class Qwen3ChatTemplate(QwenChatTemplate):
    """Qwen3's ChatML (no default system message) with its thinking switch.

    ``enable_thinking=True`` (Qwen3's default): the generation prompt is ``<|im_start|>assistant\n`` and the model
    writes its own ``<think>...</think>``; assistant contents are taken as written (a response that includes its
    reasoning carries loss on it). ``enable_thinking=False``: the generation prompt ends with the empty block
    ``<think>\n\n</think>\n\n`` (as ``apply_chat_template(..., enable_thinking=False)`` renders it), and every
    assistant turn is laid out the same way, the block as template text without loss, so training matches
    inference.
    """

    family = "qwen3"
    default_system = None
    EMPTY_THINK = "<think>\n\n</think>\n\n"

    def __init__(self, tokenizer: Tokenizer, image_placeholder: int | str | None = None, enable_thinking: bool = True):
        super().__init__(tokenizer, image_placeholder)
        self.enable_thinking = enable_thinking

    def _assistant_prefix(self) -> str:
        return "" if self.enable_thinking else self.EMPTY_THINK


class Llama2ChatTemplate(ChatTemplate):
    """Meta's Llama-2 chat layout: ``<s>[INST] {user} [/INST] {answer} </s>`` per exchange.

    A system message is folded into the first user turn as ``<<SYS>>\\n{system}\\n<</SYS>>\\n\\n``. Turns must
    alternate user/assistant. Text segments are tokenised separately; SentencePiece's dummy prefix supplies the
    space before each of them.
    """

    family = "llama2"
    image_token_candidates = ("<image>",)

    @property
    def stop_token_ids(self) -> list[int]:
        return [self.tokenizer.special_token_id("</s>")]

    def _segments(self, messages, add_generation_prompt):
        turns = _fold_system(messages, lambda s: f"<<SYS>>\n{s}\n<</SYS>>\n\n")
        if add_generation_prompt and turns[-1].role != "user":
            raise ValueError("a Llama-2 generation prompt needs the conversation to end with a user turn")
        for i, m in enumerate(turns):
            expected = "user" if i % 2 == 0 else "assistant"
            if m.role != expected:
                raise ValueError(f"Llama-2 chat turns must alternate user/assistant; turn {i} is {m.role!r}")
            if m.role == "user":
                yield _Segment(_Kind.SPECIAL, "<s>")
                yield _Segment(_Kind.TEXT, "[INST]")
                yield _Segment(_Kind.PROMPT, m.content.strip())
                yield _Segment(_Kind.TEXT, "[/INST]")
            else:
                yield _Segment(_Kind.RESPONSE, m.content.strip() + " ")  # Meta's trailing space before </s>
                yield _Segment(_Kind.TURN_END, "</s>")


class GemmaChatTemplate(ChatTemplate):
    """``<bos>`` then per turn ``<start_of_turn>{user|model}\\n{content}<end_of_turn>\\n``.

    Gemma has no system role: a system message is prepended to the first user turn, separated by ``\\n\\n``.
    """

    family = "gemma"
    image_token_candidates = ("<image_soft_token>", "<unused0>")

    @property
    def stop_token_ids(self) -> list[int]:
        return [self.tokenizer.special_token_id("<end_of_turn>")]

    def _segments(self, messages, add_generation_prompt):
        yield _Segment(_Kind.SPECIAL, "<bos>")
        for m in _fold_system(messages, lambda s: f"{s}\n\n"):
            yield _Segment(_Kind.SPECIAL, "<start_of_turn>")
            yield _Segment(_Kind.TEXT, ("model" if m.role == "assistant" else "user") + "\n")
            yield _Segment(_content_kind(m.role), m.content)
            yield _Segment(_Kind.TURN_END if m.role == "assistant" else _Kind.SPECIAL, "<end_of_turn>")
            yield _Segment(_Kind.TEXT, "\n")
        if add_generation_prompt:
            yield _Segment(_Kind.SPECIAL, "<start_of_turn>")
            yield _Segment(_Kind.TEXT, "model\n")


class WordChatTemplate(ChatTemplate):
    """For :class:`WordTokenizer`: ``<bos>`` then per turn ``<{role}> {content} <eot>``."""

    family = "word"
    image_token_candidates = ("<image>",)

    @property
    def stop_token_ids(self) -> list[int]:
        return [self.tokenizer.special_token_id("<eot>")]

    def _segments(self, messages, add_generation_prompt):
        yield _Segment(_Kind.SPECIAL, "<bos>")
        for m in messages:
            yield _Segment(_Kind.SPECIAL, f"<{m.role}>")
            yield _Segment(_content_kind(m.role), m.content)
            yield _Segment(_Kind.TURN_END if m.role == "assistant" else _Kind.SPECIAL, "<eot>")
        if add_generation_prompt:
            yield _Segment(_Kind.SPECIAL, "<assistant>")


def _fold_system(messages: Sequence[Message], render_system) -> list[Message]:
    """Merge a leading system message into the first user message (families without a system role)."""
    if messages[0].role != "system":
        return list(messages)
    if len(messages) < 2 or messages[1].role != "user":
        raise ValueError("a system message must be followed by a user message")
    first = Message("user", render_system(messages[0].content) + messages[1].content)
    return [first, *messages[2:]]


_TEMPLATES = {t.family: t for t in (Llama3ChatTemplate, Llama2ChatTemplate, GemmaChatTemplate, WordChatTemplate,
                                     QwenChatTemplate, Qwen3ChatTemplate)}


def chat_template_for(
    tokenizer: Tokenizer, family: str | None = None, image_placeholder: int | str | None = None,
    prompt_format: str = "meta", enable_thinking: bool = True, model_family: str | None = None,
) -> ChatTemplate:
    """The chat template of ``family`` (``llama3``, ``llama2``, ``gemma``, ``word``, ``qwen3``, ``qwen2`` for
    Qwen2/2.5; ``enable_thinking`` is Qwen3's thinking switch), or detected from the
    tokenizer's special tokens when ``family`` is None; ``prompt_format="zero"`` gives the authors' Llama-3 format
    (:class:`ZeroLlama3ChatTemplate`, Llama-3 only). ``model_family``: the decoder's family
    (``DecoderConfig.family``), which tells Qwen2.5 from Qwen3 (their tokenizers share the vocabulary)."""
    if prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"--prompt-format must be one of {', '.join(PROMPT_FORMATS)}, got {prompt_format!r}")
    if family is None:
        if tokenizer.has_special_token("<|start_header_id|>"):
            family = "llama3"
        elif tokenizer.has_special_token("<|im_start|>"):  # Qwen3 and Qwen2.5 share the vocabulary: the decoder's
            family = "qwen2" if model_family == "qwen2" else "qwen3"
        elif tokenizer.has_special_token("<start_of_turn>"):
            family = "gemma"
        elif isinstance(tokenizer, WordTokenizer):
            family = "word"
        elif tokenizer.has_special_token("<s>") and tokenizer.has_special_token("</s>"):
            family = "llama2"
        else:
            raise ValueError(
                f"cannot tell the chat-template family of {type(tokenizer).__name__} from its special tokens; "
                f"pass family= one of {sorted(_TEMPLATES)}"
            )
    if family not in _TEMPLATES and family != "qwen3-no-thinking":
        raise ValueError(f"unknown chat-template family {family!r}; expected one of {sorted(_TEMPLATES)}")
    if prompt_format == "zero":
        if family != "llama3":
            raise ValueError(f"--prompt-format zero is the authors' Llama-3 format; the tokenizer's chat family is "
                             f"{family!r}")
        return ZeroLlama3ChatTemplate(tokenizer, image_placeholder)
    if family in ("qwen3", "qwen3-no-thinking"):
        return Qwen3ChatTemplate(tokenizer, image_placeholder,
                                 enable_thinking=enable_thinking and family == "qwen3")
    return _TEMPLATES[family](tokenizer, image_placeholder)
