"""Image(s) + prompt -> text with the VLM: KV-cached decoding on megatron-core's static inference context.

Decoding (:func:`generate`). Prompts are token ids with one image placeholder per image; each is expanded like in
training (:func:`~megatron_zero.models.vlm.expand_image_placeholders`) and the whole prompt's decoder input --
text embeddings with the image embeddings spliced in -- is computed once. Rows of different lengths are
right-padded; the batch prefills the positions every prompt has, then advances one position per step through
megatron-core's ``StaticInferenceContext`` KV cache (which works on CPU): a row still inside its prompt is fed its
next prompt embedding (its prediction ignored), a row past it is fed the token it just generated. Causal attention
makes the right padding invisible. ``use_cache=False`` runs the full forward over the whole sequence at every
step instead: the slow reference the tests compare with.

Sampling: greedy by default; ``temperature > 0`` samples from ``softmax(logits / T)`` restricted to the top-p
nucleus, with one generator per prompt seeded ``seed + row`` (identical on every tensor-parallel rank, since
logits are gathered), so a prompt's sample does not depend on the rest of the batch.

Binary mode (:func:`answer_yes_no`): one forward, then the log-likelihood of "yes" vs "no" as the first answer
token (each the log-sum-exp over its listed spellings, e.g. "yes"/"Yes"), as the paper does for MME/POPE with a
grafted decoder that does not follow the "single word" instruction.

Tensor parallelism: every TP rank runs the same loop (logits are all-gathered). Pipeline parallelism is not
supported here (refused with a clear error).
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import torch

from megatron_zero.errors import UserError
from megatron_zero.models.vlm import VisionLanguageModel, expand_image_placeholders


class GenerationRequestError(UserError, ValueError):
    """A request the model cannot serve (too long for its context, ...)."""


@dataclasses.dataclass
class SamplingOptions:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"--temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p must be in (0, 1], got {self.top_p}")


def _check_model(model: VisionLanguageModel) -> None:
    if not (model.pre_process and model.post_process):
        raise ValueError("generation needs the whole decoder on one pipeline stage (--pipeline-model-parallel-size 1)")
    if model.config.sequence_parallel:
        raise ValueError("generation does not use sequence parallelism; build the model without --sequence-parallel")


def _images(images: Optional[Sequence[Optional[torch.Tensor]]]) -> Optional[torch.Tensor]:
    """Per-prompt image stacks -> one ``[n, C, H, W]`` tensor in placeholder order."""
    if images is None:
        return None
    stacks = [x for x in images if x is not None and len(x)]
    return torch.cat(stacks) if stacks else None


def choose_token(logits: torch.Tensor, options: SamplingOptions, generator: torch.Generator) -> int:
    """The next token from one row's ``[vocab]`` logits: argmax, or a top-p sample at ``options.temperature``."""
    if options.temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / options.temperature, dim=-1)
    if options.top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs >= options.top_p  # the first token is always kept
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs.masked_fill(outside, 0))
    return int(torch.multinomial(probs, 1, generator=generator))


def _generators(n: int, options: SamplingOptions, device) -> list[torch.Generator]:
    """One generator per prompt (seed + row index): a row's samples do not depend on the rest of the batch."""
    return [torch.Generator(device=device).manual_seed(options.seed + i) for i in range(n)]


@torch.no_grad()
def generate(model: VisionLanguageModel, prompts: Sequence[Sequence[int]],
             images: Optional[Sequence[Optional[torch.Tensor]]] = None, options: SamplingOptions = SamplingOptions(),
             stop_token_ids: Sequence[int] = (), use_cache: bool = True) -> list[list[int]]:
    """Generated token ids per prompt (stop token included when reached, at most ``options.max_new_tokens``).

    ``prompts``: token ids with one ``model.cfg.image_token_id`` per image; ``images``: per prompt a
    ``[n_i, C, H, W]`` tensor (or None) in placeholder order.
    """
    _check_model(model)
    model.eval()
    cfg = model.cfg
    vocab = cfg.decoder.vocab_size
    expanded = expand_image_placeholders(prompts, None, None, cfg.image_token_id, model.num_image_embeddings)
    lengths = [int(n) for n in (expanded.segment_ids >= 0).sum(1)]
    total = max(lengths) + options.max_new_tokens
    if total > cfg.decoder.max_position_embeddings:
        raise GenerationRequestError(f"prompt ({max(lengths)} positions after image expansion) + --max-new-tokens "
                                     f"{options.max_new_tokens} exceeds the decoder's "
                                     f"{cfg.decoder.max_position_embeddings} positions")
    device = next(model.language_model.parameters()).device
    ids = expanded.input_ids.to(device)
    positions = torch.arange(ids.shape[1], device=device).expand_as(ids)
    pixels = _images(images)
    if pixels is not None:
        pixels = pixels.to(device)
    generators = _generators(len(prompts), options, device)
    if not use_cache:
        return _generate_without_cache(model, ids, expanded.image_mask.to(device), pixels, lengths, options,
                                       stop_token_ids, generators)

    from megatron.core.inference.contexts import StaticInferenceContext

    lm = model.language_model
    b = len(prompts)
    prompt_embeddings = model.embed(ids, positions, pixels, expanded.image_mask.to(device))  # [L, b, h]
    context = StaticInferenceContext(b, total)
    start = min(lengths)
    logits = lm(ids[:, :start], positions[:, :start], None, decoder_input=prompt_embeddings[:start],
                inference_context=context, runtime_gather_output=True)[:, -1, :vocab]
    context.sequence_len_offset += start
    outputs: list[list[int]] = [[] for _ in range(b)]
    done = [False] * b
    for pos in range(start, total):
        in_prompt = torch.tensor([pos < n for n in lengths], device=device)
        chosen = torch.zeros(b, dtype=torch.long, device=device)
        for i in range(b):
            if not in_prompt[i] and not done[i]:
                token = chosen[i] = choose_token(logits[i], options, generators[i])
                outputs[i].append(token)
                done[i] = token in stop_token_ids or len(outputs[i]) >= options.max_new_tokens
        if all(done):
            break
        tokens = chosen.clone()
        step_positions = torch.full((b, 1), pos, device=device)
        if in_prompt.any():
            tokens[in_prompt] = ids[in_prompt, pos]
        embedding = lm.embedding(input_ids=tokens[:, None], position_ids=step_positions)  # [1, b, h]
        if in_prompt.any():
            embedding = torch.where(in_prompt[None, :, None], prompt_embeddings[pos:pos + 1].to(embedding.dtype),
                                    embedding)
        context.enable_decode_mode()
        logits = lm(tokens[:, None], step_positions, None, decoder_input=embedding, inference_context=context,
                    runtime_gather_output=True)[:, -1, :vocab]
        context.sequence_len_offset += 1
    return outputs


def _generate_without_cache(model, ids, image_mask, pixels, lengths, options, stop_token_ids, generators):
    """Reference decoding: the full forward over every row's whole sequence at every step."""
    b, vocab = ids.shape[0], model.cfg.decoder.vocab_size
    total = max(lengths) + options.max_new_tokens
    seq = torch.zeros(b, total, dtype=ids.dtype, device=ids.device)
    seq[:, :ids.shape[1]] = ids
    mask = torch.zeros(b, total, dtype=torch.bool, device=ids.device)
    mask[:, :image_mask.shape[1]] = image_mask
    outputs: list[list[int]] = [[] for _ in range(b)]
    done = [False] * b
    while not all(done):
        length = max(n + len(o) for n, o in zip(lengths, outputs))
        positions = torch.arange(length, device=ids.device).expand(b, -1)
        logits = model(seq[:, :length], positions, images=pixels, image_mask=mask[:, :length],
                       runtime_gather_output=True)
        last = [n + len(o) - 1 for n, o in zip(lengths, outputs)]
        for i in range(b):
            if not done[i]:
                token = choose_token(logits[i, last[i], :vocab], options, generators[i])
                seq[i, lengths[i] + len(outputs[i])] = token
                outputs[i].append(token)
                done[i] = token in stop_token_ids or len(outputs[i]) >= options.max_new_tokens
    return outputs


@dataclasses.dataclass
class BinaryAnswer:
    answer: str  # "yes" | "no"
    logprob_yes: float
    logprob_no: float


@torch.no_grad()
def answer_yes_no(model: VisionLanguageModel, prompts: Sequence[Sequence[int]],
                  images: Optional[Sequence[Optional[torch.Tensor]]], yes_token_ids: Sequence[int],
                  no_token_ids: Sequence[int]) -> list[BinaryAnswer]:
    """The paper's binary-prompt mode: compare log P("yes") and log P("no") as the first answer token.

    ``yes_token_ids``/``no_token_ids``: the first token of each accepted spelling (e.g. of "yes" and "Yes");
    each side's log-likelihood is the log-sum-exp over its spellings. Ties answer "yes".
    """
    _check_model(model)
    if not yes_token_ids or not no_token_ids:
        raise ValueError("binary mode needs at least one token id for 'yes' and one for 'no'")
    if set(yes_token_ids) & set(no_token_ids):
        raise ValueError(f"'yes' and 'no' share token ids {sorted(set(yes_token_ids) & set(no_token_ids))}")
    model.eval()
    cfg = model.cfg
    expanded = expand_image_placeholders(prompts, None, None, cfg.image_token_id, model.num_image_embeddings)
    lengths = (expanded.segment_ids >= 0).sum(1)
    device = next(model.language_model.parameters()).device
    ids = expanded.input_ids.to(device)
    positions = torch.arange(ids.shape[1], device=device).expand_as(ids)
    pixels = _images(images)
    logits = model(ids, positions, images=None if pixels is None else pixels.to(device),
                   image_mask=expanded.image_mask.to(device), runtime_gather_output=True)
    last = logits[torch.arange(len(prompts)), lengths.to(device) - 1, :cfg.decoder.vocab_size]
    logp = torch.log_softmax(last.float(), dim=-1)
    yes = torch.logsumexp(logp[:, list(yes_token_ids)], dim=-1)
    no = torch.logsumexp(logp[:, list(no_token_ids)], dim=-1)
    return [BinaryAnswer("yes" if y >= n else "no", float(y), float(n)) for y, n in zip(yes, no)]
