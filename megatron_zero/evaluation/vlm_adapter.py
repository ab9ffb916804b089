"""lmms-eval model ``megatron_zero_vlm``: a megatron_zero VLM checkpoint on image benchmarks (A.10).

Two layers:

* :class:`VLMEvaluator` -- harness-independent: prompts (the decoder's chat template, one ``<image>`` per image,
  LLaVA's ``<image>\\n`` prefix when the text has none), images through our CLIP preprocessing
  (:func:`megatron_zero.data.images.preprocess_pil`, the same as training), batched scoring, greedy/sampled
  generation (:func:`megatron_zero.inference.generate.generate`, KV-cached) and the paper's binary mode.
* :class:`MegatronZeroVLM` -- the lmms-eval ``lmms`` subclass: it unpacks lmms-eval's requests
  (``(context, target|gen_kwargs, doc_to_visual, doc_id, task, split)``) and hands them to the evaluator. It exists
  only when lmms-eval is importable (:data:`HAVE_LMMS_EVAL`); importing this module never requires it.

Binary yes/no prompting (the paper's MME/POPE "binary" columns: a decoder grafted zero-shot was never tuned on
instructions and does not follow "answer with a single word"): for tasks named in ``binary`` (name prefixes, e.g.
``binary=mme|pope``, or ``all``) the prompt's single-word instruction is replaced by :data:`BINARY_INSTRUCTION`
and the answer is whichever of "yes" and "no" has the larger log-likelihood as the first answer token
(:func:`megatron_zero.inference.generate.answer_yes_no`).

Model arguments: ``load`` (a VLM checkpoint: ``tools/graft.py`` output or a training run's export), ``tp``,
``dtype`` (fp32|bf16), ``tokenizer`` (default: the checkpoint's ``decoder/``), ``chat_family`` (default: from the
tokenizer), ``batch_size``, ``binary``, ``yes_words``/``no_words`` (``|``-separated spellings, default
``yes|Yes`` / ``no|No``), ``seed``, ``prompt_format`` (``meta`` | ``zero``: the authors' Llama-3 layout and image
prompt, :class:`~megatron_zero.data.chat_template.ZeroLlama3ChatTemplate`).

Parallelism: tensor parallelism (every TP rank runs the same requests; lmms-eval sees ``rank 0`` / ``world 1``);
generation needs the decoder on one pipeline stage, so ``pp`` is 1.

Usage (the model name is registered with lmms-eval's registry when this module is imported, and by the
``lmms_eval.models`` entry point of :mod:`~megatron_zero.evaluation.lmms_registration` once installed)::

    import lmms_eval.evaluator, megatron_zero.evaluation.vlm_adapter
    lmms_eval.evaluator.simple_evaluate(model="megatron_zero_vlm",
                                        model_args="load=ckpt/vlm_3b,binary=mme|pope", tasks=["mme"])
"""
from __future__ import annotations

import json
import os
from typing import Any, Optional, Sequence

import torch

from megatron_zero.evaluation.lmms_registration import MODEL_NAME, model_manifest
from megatron_zero.evaluation.text_model import DTYPES, EvaluationError

try:  # the harness is optional (the "eval" extra)
    from lmms_eval.api.model import lmms as _LmmsBase

    HAVE_LMMS_EVAL = True
except ImportError:  # pragma: no cover - exercised only without lmms-eval
    _LmmsBase = object
    HAVE_LMMS_EVAL = False

IMAGE_TAG = "<image>"
SINGLE_WORD_INSTRUCTIONS = ("Answer the question using a single word or phrase.", "Answer the question with Yes or No.")
BINARY_INSTRUCTION = "Please answer yes or no."
DEFAULT_MAX_NEW_TOKENS = 128


def binary_prompt(context: str) -> str:
    """``context`` asking for a yes/no answer: a single-word instruction in it is replaced, else appended."""
    for instruction in SINGLE_WORD_INSTRUCTIONS:
        if instruction in context:
            return context.replace(instruction, BINARY_INSTRUCTION)
    return context.rstrip() + "\n" + BINARY_INSTRUCTION


def with_image_tags(context: str, num_images: int) -> str:
    """One ``<image>`` per image: LLaVA's ``<image>\\n`` prefix when the text has no tags; a mismatch is an error."""
    tags = context.count(IMAGE_TAG)
    if tags == 0:
        return (IMAGE_TAG + "\n") * num_images + context
    if tags != num_images:
        raise EvaluationError(f"a prompt has {tags} {IMAGE_TAG} tags but {num_images} images: {context[:80]!r}")
    return context


def image_tensor(visual: Any, size: int) -> torch.Tensor:
    """One lmms-eval visual (a PIL image or an image file path) -> our preprocessed ``[3, size, size]``."""
    from PIL import Image

    from megatron_zero.data.images import load_image, preprocess_pil

    if isinstance(visual, Image.Image):
        return preprocess_pil(visual, size)
    if isinstance(visual, (str, os.PathLike)):
        return load_image(visual, size)
    raise EvaluationError(f"unsupported visual input {type(visual).__name__} (expected a PIL image or a file path; "
                          f"video and audio tasks are not supported)")


def _batches(items: Sequence[int], size: int):
    for start in range(0, len(items), size):
        yield items[start:start + size]


class VLMEvaluator:
    """This rank's VLM plus tokenizer and chat template, answering batches of (text, images) requests."""

    def __init__(self, load: str, tp: int = 1, dtype: str = "fp32", tokenizer: Optional[str] = None,
                 chat_family: Optional[str] = None, yes_words: Sequence[str] = ("yes", "Yes"),
                 no_words: Sequence[str] = ("no", "No"), seed: int = 1234, prompt_format: str = "meta"):
        from megatron_zero.checkpointing.resolve import VLM_KINDS, resolve_checkpoint
        from megatron_zero.checkpointing.sources import load_vlm
        from megatron_zero.data.chat_template import chat_template_for
        from megatron_zero.evaluation.text_model import open_tokenizer
        from megatron_zero.models.llama import RuntimeOptions
        from megatron_zero.parallel.initialize import initialize_parallel

        if dtype not in DTYPES:
            raise EvaluationError(f"dtype={dtype!r}: expected one of {sorted(DTYPES)}")
        try:
            ckpt = resolve_checkpoint(load, "load=", accept=VLM_KINDS)
        except ValueError as e:
            raise EvaluationError(str(e)) from None
        self.cfg = ckpt.vlm_config
        self.tokenizer = open_tokenizer(load, tokenizer, self.cfg.decoder.vocab_size)
        try:
            self.template = chat_template_for(self.tokenizer, chat_family, image_placeholder=self.cfg.image_token_id,
                                              prompt_format=prompt_format, model_family=self.cfg.decoder.family)
        except ValueError as e:
            raise EvaluationError(str(e)) from None
        dp = initialize_parallel(tp, 1, seed=seed)
        if dp != 1:
            raise EvaluationError(f"launch exactly tp = {tp} processes (data parallelism is not used)")
        self.dtype = DTYPES[dtype]
        try:
            self.model = load_vlm(ckpt, RuntimeOptions(tensor_model_parallel_size=tp, params_dtype=self.dtype,
                                                       bf16=self.dtype == torch.bfloat16))
        except ValueError as e:
            raise EvaluationError(str(e)) from None
        self.model.eval()
        self.yes_ids = sorted({self.tokenizer.encode(w)[0] for w in yes_words})
        self.no_ids = sorted({self.tokenizer.encode(w)[0] for w in no_words})

    # ---- inputs --------------------------------------------------------------------------------------------
    def prompt_ids(self, context: str, num_images: int) -> list[int]:
        from megatron_zero.data.chat_template import Message

        text = with_image_tags(context, num_images)
        return self.template.encode([Message("user", text)], add_generation_prompt=True).input_ids

    def pixels(self, visuals: Sequence[Any]) -> Optional[torch.Tensor]:
        if not visuals:
            return None
        return torch.stack([image_tensor(v, self.cfg.vision.image_size) for v in visuals]).to(self.dtype)

    # ---- requests ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def loglikelihood(self, contexts: Sequence[str], continuations: Sequence[str],
                      visuals: Sequence[Sequence[Any]]) -> list[tuple[float, bool]]:
        """``(log p(continuation | prompt, images), greedy)`` per request: the continuation is scored as the start
        of the assistant's answer. One forward for the batch."""
        from megatron_zero import platform
        from megatron_zero.models.vlm import expand_image_placeholders

        prompts = [self.prompt_ids(c, len(v)) for c, v in zip(contexts, visuals)]
        answers = [self.tokenizer.encode(x) for x in continuations]
        if any(not a for a in answers):
            raise EvaluationError("a loglikelihood request with an empty continuation (nothing to score)")
        rows = [p + a for p, a in zip(prompts, answers)]
        expanded = expand_image_placeholders(rows, None, None, self.cfg.image_token_id,
                                             self.model.num_image_embeddings)
        lengths = (expanded.segment_ids >= 0).sum(1).tolist()
        device = platform.device()
        ids = expanded.input_ids.to(device)
        positions = torch.arange(ids.shape[1], device=device).expand_as(ids)
        stacks = [self.pixels(v) for v in visuals]
        stacks = [s for s in stacks if s is not None]
        images = torch.cat(stacks).to(device) if stacks else None
        logits = self.model(ids, positions, images=images, image_mask=expanded.image_mask.to(device),
                            runtime_gather_output=True)[..., :self.cfg.decoder.vocab_size].float()
        out = []
        for i, (n, answer) in enumerate(zip(lengths, answers)):
            k = len(answer)
            row = torch.log_softmax(logits[i, n - k - 1:n - 1], dim=-1)
            target = ids[i, n - k:n]
            logp = row.gather(-1, target[:, None]).squeeze(-1)
            out.append((float(logp.double().sum()), bool((row.argmax(-1) == target).all())))
        return out

    def generate(self, contexts: Sequence[str], visuals: Sequence[Sequence[Any]], gen_kwargs: dict) -> list[str]:
        """Answers for a batch sharing ``gen_kwargs`` (lmms-eval's ``until``, ``max_new_tokens``, ``temperature``,
        ``top_p``; beams are refused), cut at the first ``until`` string."""
        from megatron_zero.inference.generate import SamplingOptions, generate

        if int(gen_kwargs.get("num_beams", 1) or 1) > 1:
            raise EvaluationError(f"{MODEL_NAME} does not do beam search (num_beams={gen_kwargs['num_beams']})")
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        options = SamplingOptions(max_new_tokens=int(gen_kwargs.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)),
                                  temperature=float(gen_kwargs.get("temperature", 0) or 0),
                                  top_p=float(gen_kwargs.get("top_p", 1.0) or 1.0))
        prompts = [self.prompt_ids(c, len(v)) for c, v in zip(contexts, visuals)]
        stops = set(self.template.stop_token_ids)
        outputs = generate(self.model, prompts, [self.pixels(v) for v in visuals], options,
                           self.template.stop_token_ids)
        texts = []
        for ids in outputs:
            text = self.tokenizer.decode([t for t in ids if t not in stops])
            for u in until:
                if u:
                    text = text.split(u)[0]
            texts.append(text.strip())
        return texts

    def answer_binary(self, contexts: Sequence[str], visuals: Sequence[Sequence[Any]]) -> list[str]:
        """The paper's binary mode: "yes" or "no", whichever is likelier as the first answer token."""
        from megatron_zero.inference.generate import answer_yes_no

        prompts = [self.prompt_ids(binary_prompt(c), len(v)) for c, v in zip(contexts, visuals)]
        return [a.answer for a in answer_yes_no(self.model, prompts, [self.pixels(v) for v in visuals],
                                                self.yes_ids, self.no_ids)]


def parse_binary_tasks(value: Any) -> tuple[str, ...]:
    """``binary=`` model argument: task-name prefixes separated by ``|`` (``,`` separates model arguments), or
    ``all``; empty/None/False: none."""
    if value in (None, False, "", "none", "None", "False"):
        return ()
    if value is True or value == "all":
        return ("",)
    return tuple(p.strip() for p in str(value).split("|") if p.strip())


class MegatronZeroVLM(_LmmsBase):
    """lmms-eval model over :class:`VLMEvaluator` (see the module docstring)."""

    is_simple = True

    def __init__(self, load: str, tp: int = 1, dtype: str = "fp32", tokenizer: Optional[str] = None,
                 chat_family: Optional[str] = None, batch_size: Any = 8, binary: Any = None,
                 yes_words: str = "yes|Yes", no_words: str = "no|No", seed: int = 1234, prompt_format: str = "meta",
                 **harness_kwargs: Any):
        """Arguments as in the module docstring. ``harness_kwargs``: what lmms-eval passes to every model
        (``device``, ``max_batch_size``), unused: each rank computes on its own device."""
        if not HAVE_LMMS_EVAL:
            raise EvaluationError("lmms-eval is not installed: pip install 'megatron_zero[eval]'")
        super().__init__()
        try:
            self.batch_size = int(batch_size)
        except (TypeError, ValueError):
            self.batch_size = 0
        if self.batch_size < 1:
            raise EvaluationError(f"model_args batch_size={batch_size!r}: expected a positive integer")
        self.binary_tasks = parse_binary_tasks(binary)
        self.vlm = VLMEvaluator(str(load), int(tp), str(dtype), tokenizer, chat_family,
                                             str(yes_words).split("|"), str(no_words).split("|"), int(seed),
                                             str(prompt_format))

    def _is_binary(self, task: str) -> bool:
        return any(task.startswith(prefix) for prefix in self.binary_tasks)

    def _doc(self, task: str, split: str, doc_id: int):
        return self.task_dict[task][split][doc_id]

    def _visuals(self, doc_to_visual, task: str, split: str, doc_id: int) -> list:
        if doc_to_visual is None:
            return []
        visuals = doc_to_visual(self._doc(task, split, doc_id)) or []
        return [v for v in (visuals if isinstance(visuals, list) else [visuals]) if v is not None]

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        items = []
        for context, target, doc_to_visual, doc_id, task, split in (r.args for r in requests):
            continuation = target if isinstance(target, str) else target(self._doc(task, split, doc_id))
            items.append((context, continuation, self._visuals(doc_to_visual, task, split, doc_id)))
        order = sorted(range(len(items)), key=lambda i: -len(items[i][0]) - len(items[i][1]))
        results: list[Any] = [None] * len(items)
        for batch in _batches(order, self.batch_size):
            scores = self.vlm.loglikelihood(*zip(*[items[i] for i in batch]))
            for i, s in zip(batch, scores):
                results[i] = s
        return results

    def generate_until(self, requests) -> list[str]:
        groups: dict[str, list[int]] = {}
        args = [r.args for r in requests]
        for n, (_, gen_kwargs, _, _, task, _) in enumerate(args):
            key = json.dumps([self._is_binary(task), gen_kwargs], sort_keys=True, default=str)
            groups.setdefault(key, []).append(n)
        results: list[Any] = [None] * len(requests)
        for members in groups.values():
            for batch in _batches(members, self.batch_size):
                contexts = [args[n][0] for n in batch]
                visuals = [self._visuals(args[n][2], args[n][4], args[n][5], args[n][3]) for n in batch]
                if self._is_binary(args[batch[0]][4]):
                    answers = self.vlm.answer_binary(contexts, visuals)
                else:
                    answers = self.vlm.generate(contexts, visuals, dict(args[batch[0]][1]))
                for n, a in zip(batch, answers):
                    results[n] = a
        return results

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError(f"{MODEL_NAME} does not implement multi-round generation")


if HAVE_LMMS_EVAL:
    from lmms_eval.models import MODEL_REGISTRY_V2

    MODEL_REGISTRY_V2.register_manifest(model_manifest(), overwrite=True)
