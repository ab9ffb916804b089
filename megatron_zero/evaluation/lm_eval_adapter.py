"""EleutherAI lm-evaluation-harness model ``megatron_zero``: any megatron_zero decoder checkpoint, TP/PP.

From the harness's API (importing this module registers the name)::

    import lm_eval, megatron_zero.evaluation.lm_eval_adapter
    lm_eval.simple_evaluate(model="megatron_zero", model_args="load=ckpt/llama-3b,tp=1", tasks=["hellaswag"])

From the harness's own CLI (this module's ``__main__`` registers the model, then runs ``lm_eval``'s CLI)::

    python -m megatron_zero.evaluation.lm_eval_adapter run --model megatron_zero \\
        --model_args load=ckpt/llama-70b,tp=8,dtype=bf16 --tasks arc_easy --batch_size 16
    torchrun --nproc-per-node 8 -m megatron_zero.evaluation.lm_eval_adapter run ...   # tp x pp processes

Model arguments: ``load`` (HF Llama dir, megatron_zero torch_dist checkpoint, or VLM checkpoint used text-only),
``tp``, ``pp``, ``dtype`` (fp32|bf16), ``tokenizer`` (default: the checkpoint's), ``batch_size``,
``max_length`` (default: the model's positions), ``add_bos_token`` (default: when the tokenizer has a BOS),
``max_gen_toks`` (default 256), ``seed``.

Model parallelism follows lm-eval's convention for model-parallel models (its Megatron-LM and NeMo adapters):
all TP x PP ranks form one logical model, so every rank reports ``rank == 0`` and ``world_size == 1`` to the
harness, receives every request and runs its part of each forward; the harness writes results only where
``LOCAL_RANK == 0``. Requests are sorted by length (longest first) and right-padded into batches.

Tokenisation follows the harness's HF model: trailing spaces of a context move to the continuation, the
continuation's tokens are those of ``encode(context + continuation)`` past ``encode(context)``, BOS is
prepended, and an empty context is the BOS (or EOS) token alone. ``loglikelihood_rolling`` uses the harness's
own rolling, disjoint windows of ``max_length`` tokens. ``generate_until`` is greedy (``do_sample``/temperature
are refused) and stops at any ``until`` string or the EOS token.
"""
from __future__ import annotations

import json
from typing import Any, Optional, Sequence

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from megatron_zero.evaluation.text_model import EvaluationError, ParallelTextModel

MODEL_NAME = "megatron_zero"
DEFAULT_MAX_GEN_TOKS = 256


def batches(order: Sequence[int], size: int):
    for start in range(0, len(order), size):
        yield order[start:start + size]


def _is_rank0() -> bool:
    from megatron_zero.parallel.initialize import is_rank0

    return is_rank0()


def _positive_int(name: str, value: Any) -> int:
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = 0
    if n < 1 or str(value).strip() != str(n):
        raise EvaluationError(f"model_args {name}={value!r}: expected a positive integer"
                              + (" ('auto' batch sizes are not supported)" if str(value).startswith("auto") else ""))
    return n


@register_model(MODEL_NAME)
class MegatronZeroLM(LM):
    """lm-eval model over :class:`~megatron_zero.evaluation.text_model.ParallelTextModel`."""

    def __init__(self, load: str, tp: int = 1, pp: int = 1, dtype: str = "fp32", tokenizer: Optional[str] = None,
                 batch_size: Any = 8, max_length: Optional[int] = None, add_bos_token: Optional[bool] = None,
                 max_gen_toks: int = DEFAULT_MAX_GEN_TOKS, seed: int = 1234, max_batch_size: Any = None,
                 device: Any = None):
        """Arguments as in the module docstring. ``max_batch_size``/``device`` are accepted because the harness
        passes them to every model; they are unused (each rank computes on its own device)."""
        super().__init__()
        self.batch_size = _positive_int("batch_size", batch_size)
        self.max_gen_toks = _positive_int("max_gen_toks", max_gen_toks)
        self.lm = ParallelTextModel(str(load), _positive_int("tp", tp), _positive_int("pp", pp), str(dtype),
                                             tokenizer, int(seed))
        self.load = str(load)
        self.tokenizer = self.lm.tokenizer
        self.max_length = self.lm.max_length if max_length is None else _positive_int("max_length", max_length)
        if self.max_length > self.lm.max_length:
            raise EvaluationError(f"model_args max_length={self.max_length} exceeds the model's "
                                  f"{self.lm.max_length} positions")
        bos, eos = self.tokenizer.bos_id, self.tokenizer.eos_id
        self.add_bos_token = (bos is not None) if add_bos_token is None else bool(add_bos_token)
        if self.add_bos_token and bos is None:
            raise EvaluationError("model_args add_bos_token=True but the tokenizer has no BOS token")
        if bos is None and eos is None:
            raise EvaluationError("the tokenizer has neither a BOS nor an EOS token to condition an empty context on")
        self.prefix_token_id = bos if bos is not None else eos

    # ---- harness bookkeeping -------------------------------------------------------------------------------
    @property
    def tokenizer_name(self) -> str:
        return f"{type(self.tokenizer).__name__}:{self.load}"

    def get_model_info(self) -> dict:
        return {"model_load": self.load, "tp": self.lm.tp, "pp": self.lm.pp, "vocab_size": self.lm.cfg.vocab_size,
                "max_length": self.max_length, "add_bos_token": self.add_bos_token}

    # ---- tokenisation --------------------------------------------------------------------------------------
    def tok_encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = self.tokenizer.encode(text)
        return [self.prefix_token_id] + ids if add_bos else ids

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Context and continuation token ids, as the harness's HF model splits them."""
        if context == "":
            return [self.prefix_token_id], self.tok_encode(continuation)
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        whole = self.tok_encode(context + continuation, add_bos=self.add_bos_token)
        context_ids = self.tok_encode(context, add_bos=self.add_bos_token)
        return context_ids, whole[len(context_ids):]

    # ---- requests ------------------------------------------------------------------------------------------
    def score_tokens(self, pairs: Sequence[tuple[list[int], list[int]]], desc: str = "loglikelihood",
                     disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """``(log p(continuation | context), greedy)`` per ``(context ids, continuation ids)``, batched by length.
        Contexts are cut from the left to fit ``max_length``."""
        sequences, scored = [], []
        for context, continuation in pairs:
            if not continuation:
                raise EvaluationError("a loglikelihood request with an empty continuation (nothing to score)")
            if len(continuation) > self.max_length:
                raise EvaluationError(f"a {len(continuation)}-token continuation exceeds max_length {self.max_length}")
            sequences.append((context + continuation)[-(self.max_length + 1):])
            scored.append(len(continuation))
        order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
        results: list[Optional[tuple[float, bool]]] = [None] * len(sequences)
        bar = tqdm(total=len(sequences), desc=desc, disable=disable_tqdm or not _is_rank0())
        for batch in batches(order, self.batch_size):
            for i, r in zip(batch, self.lm.score_batch([sequences[i] for i in batch], [scored[i] for i in batch])):
                results[i] = r
            bar.update(len(batch))
        bar.close()
        return results  # type: ignore[return-value]

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [self.encode_pair(*req.args) for req in requests]
        results = self.score_tokens(pairs, disable_tqdm=disable_tqdm)
        for req, r in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", req.args, r)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        windows, owner = [], []
        for n, req in enumerate(requests):
            (text,) = req.args
            for w in get_rolling_token_windows(self.tok_encode(text), self.prefix_token_id, self.max_length, 1):
                windows.append(make_disjoint_window(w))
                owner.append(n)
        scores = self.score_tokens(windows, desc="loglikelihood_rolling", disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for n, (logp, _) in zip(owner, scores):
            totals[n] += logp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def _stop_strings(self, gen_kwargs: dict) -> list[str]:
        until = gen_kwargs.get("until") or []
        if isinstance(until, str):
            until = [until]
        if not isinstance(until, list) or not all(isinstance(u, str) for u in until):
            raise EvaluationError(f"generation 'until' must be a string or a list of strings, got {until!r}")
        return [u for u in until if u]

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy generation, batched among requests with the same generation arguments."""
        groups: dict[str, list[int]] = {}
        for n, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(n)
        results: list[Optional[str]] = [None] * len(requests)
        eos = self.tokenizer.eos_id
        bar = tqdm(total=len(requests), desc="generate_until", disable=disable_tqdm or not _is_rank0())
        for members in groups.values():
            gen_kwargs = dict(requests[members[0]].args[1])
            if gen_kwargs.get("do_sample") or float(gen_kwargs.get("temperature", 0) or 0) > 0:
                raise EvaluationError(f"{MODEL_NAME} generates greedily; got sampling arguments {gen_kwargs}")
            until = self._stop_strings(gen_kwargs)
            max_new = _positive_int("max_gen_toks", gen_kwargs.get("max_gen_toks", self.max_gen_toks))
            if max_new >= self.max_length:
                raise EvaluationError(f"max_gen_toks {max_new} leaves no room for a prompt in {self.max_length} "
                                      f"positions")
            room = self.max_length - max_new  # prompts are cut from the left to leave room for the answer
            prompts = {n: self.tok_encode(requests[n].args[0], add_bos=self.add_bos_token)[-room:] for n in members}
            order = sorted(members, key=lambda n: -len(prompts[n]))
            for batch in batches(order, self.batch_size):

                def finished(row: int, new: list[int]) -> bool:
                    if eos is not None and new[-1] == eos:
                        return True
                    text = self.tokenizer.decode(new)
                    return any(u in text for u in until)

                outputs = self.lm.generate_greedy([prompts[n] for n in batch], max_new, finished)
                for n, ids in zip(batch, outputs):
                    if eos is not None and ids and ids[-1] == eos:
                        ids = ids[:-1]
                    text = self.tokenizer.decode(ids)
                    for u in until:
                        text = text.split(u)[0]
                    results[n] = text
                    self.cache_hook.add_partial("generate_until", requests[n].args, text)
                bar.update(len(batch))
        bar.close()
        return results  # type: ignore[return-value]


def main() -> None:
    """lm-eval's own CLI, with the ``megatron_zero`` model registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
