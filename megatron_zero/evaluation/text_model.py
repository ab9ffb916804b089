"""A megatron_zero decoder as a batched scorer/generator of token sequences, under TP and PP.

:class:`ParallelTextModel` loads any decoder checkpoint :func:`~megatron_zero.checkpointing.sources.resolve_decoder`
reads -- an HF Llama directory (target or surrogate), a megatron_zero ``torch_dist`` model checkpoint, or a VLM
checkpoint (its decoder, used text-only) -- and its tokenizer.

Every rank of the (TP x PP) world calls the same methods with the same arguments, in the same order: each rank
runs its part of the forward (megatron-core's forward-only pipeline schedule carries hidden states between
stages), the last stage turns its vocabulary-parallel logits into log-probabilities or next tokens with TP
reductions (:mod:`~megatron_zero.parallel.vocab_parallel`), and the results are broadcast along the pipeline,
so every rank returns the same values. Data parallelism is not used: launch exactly TP x PP processes.

Batches are right-padded: with causal attention a row never sees the padding after it, so a sequence scores the
same alone or in any batch.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist

from megatron_zero.parallel.vocab_parallel import gather_vocab, token_logprobs
from megatron_zero.errors import UserError

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


class EvaluationError(UserError, ValueError):
    """Bad evaluation input: a checkpoint, tokenizer, model argument or request that cannot be used."""


def default_tokenizer_path(load: str) -> str:
    """Where a checkpoint keeps its tokenizer (a VLM's ``decoder/``, a run's export, ...), else ``load`` itself."""
    from megatron_zero.checkpointing.resolve import resolve_checkpoint

    try:
        found = resolve_checkpoint(load).tokenizer_dir
    except ValueError:
        found = None
    return found or load


def open_tokenizer(load: str, tokenizer: Optional[str], vocab_size: int):
    """The checkpoint's tokenizer (or ``tokenizer``), checked against the decoder's vocabulary."""
    from megatron_zero.data.tokenizers import load_tokenizer

    path = tokenizer or default_tokenizer_path(load)
    try:
        tok = load_tokenizer(path)
    except (FileNotFoundError, ValueError) as e:
        raise EvaluationError(f"tokenizer: {e} (pass tokenizer=<file or directory>)") from None
    if tok.vocab_size > vocab_size:
        raise EvaluationError(f"tokenizer {path} has {tok.vocab_size} ids but the decoder of {load} only "
                              f"{vocab_size}: they do not belong together")
    return tok


class ParallelTextModel:
    """This rank's part of a decoder, plus the tokenizer; see the module docstring for the calling rules."""

    def __init__(self, load: str, tp: int = 1, pp: int = 1, dtype: str = "fp32", tokenizer: Optional[str] = None,
                 seed: int = 1234):
        from megatron.core import parallel_state as ps

        from megatron_zero.checkpointing.sources import WeightSourceError, resolve_decoder
        from megatron_zero.models.llama import RuntimeOptions, build_llama_model
        from megatron_zero.parallel.initialize import initialize_parallel

        if dtype not in DTYPES:
            raise EvaluationError(f"dtype={dtype!r}: expected one of {sorted(DTYPES)}")
        try:
            source = resolve_decoder(load, flag="load=")
        except WeightSourceError as e:
            raise EvaluationError(str(e)) from None
        dp = initialize_parallel(tp, pp, seed=seed)
        if dp != 1:
            raise EvaluationError(f"evaluation runs one model over the whole world: launch tp x pp = {tp * pp} "
                                  f"processes, not {dist.get_world_size()} (data parallelism is not used)")
        self.cfg = source.cfg
        self.tokenizer = open_tokenizer(load, tokenizer, self.cfg.vocab_size)
        bf16 = DTYPES[dtype] == torch.bfloat16
        opts = RuntimeOptions(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                              params_dtype=DTYPES[dtype], bf16=bf16, initialize_weights=False)
        self.model = build_llama_model(self.cfg, opts)
        source.load_into([self.model])
        self.model.eval()
        self.tp, self.pp = tp, pp
        self.is_last_stage = ps.is_pipeline_last_stage()
        self.max_length = self.cfg.max_position_embeddings

    # ---- forward -------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        from megatron_zero import platform

        return platform.device()

    def _forward(self, tokens: torch.Tensor, on_logits: Callable[[torch.Tensor], object]) -> object:
        """``on_logits(logits [b, s, V/tp])`` computed on the last stage, returned on every rank."""
        from megatron.core import parallel_state as ps
        from megatron.core.pipeline_parallel import get_forward_backward_func

        tokens = tokens.to(self.device)
        positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)

        def forward_step(_data_iterator, model):
            output = model(tokens, positions, None)
            return output, lambda out, non_loss_data=True: on_logits(out)

        with torch.no_grad():
            stored = get_forward_backward_func()(
                forward_step_func=forward_step, data_iterator=iter([None]), model=[self.model], num_microbatches=1,
                seq_length=tokens.shape[1], micro_batch_size=tokens.shape[0], forward_only=True,
                collect_non_loss_data=True)
        box = [stored[0] if self.is_last_stage else None]
        if self.pp > 1:
            dist.broadcast_object_list(box, src=ps.get_pipeline_model_parallel_last_rank(),
                                       group=ps.get_pipeline_model_parallel_group())
        return box[0]

    @staticmethod
    def _padded(rows: Sequence[Sequence[int]]) -> torch.Tensor:
        out = torch.zeros(len(rows), max(len(r) for r in rows), dtype=torch.long)
        for i, r in enumerate(rows):
            out[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        return out

    # ---- scoring -------------------------------------------------------------------------------------------
    def score_batch(self, sequences: Sequence[Sequence[int]], num_scored: Sequence[int]) -> list[tuple[float, bool]]:
        """For each sequence: the summed log-probability of its last ``num_scored`` tokens given everything
        before them, and whether each of those tokens is the greedy (argmax) choice. One forward pass."""
        for seq, n in zip(sequences, num_scored):
            if not 1 <= n < len(seq):
                raise EvaluationError(f"cannot score the last {n} of {len(seq)} tokens (needs 1 <= n < length)")
            if len(seq) - 1 > self.max_length:
                raise EvaluationError(f"a {len(seq)}-token sequence exceeds the model's {self.max_length} positions")
        inputs = self._padded([s[:-1] for s in sequences])
        rows, cols, targets = [], [], []
        for i, (seq, n) in enumerate(zip(sequences, num_scored)):
            first = len(seq) - 1 - n
            rows += [i] * n
            cols += range(first, len(seq) - 1)
            targets += seq[len(seq) - n:]
        rows_t, cols_t = torch.tensor(rows, device=self.device), torch.tensor(cols, device=self.device)
        targets_t = torch.tensor(targets, device=self.device)
        vocab = self.cfg.vocab_size

        def on_logits(logits: torch.Tensor):
            logp, greedy = token_logprobs(logits[rows_t, cols_t], targets_t, vocab)
            out, start = [], 0
            for n in num_scored:
                out.append((float(logp[start:start + n].double().sum()), bool(greedy[start:start + n].all())))
                start += n
            return out

        return self._forward(inputs, on_logits)

    # ---- generation ----------------------------------------------------------------------------------------
    def next_tokens(self, sequences: Sequence[Sequence[int]]) -> list[int]:
        """The greedy next token after each sequence (one forward over the right-padded batch)."""
        last = torch.tensor([len(s) - 1 for s in sequences], device=self.device)
        vocab = self.cfg.vocab_size

        def on_logits(logits: torch.Tensor):
            full = gather_vocab(logits[torch.arange(len(sequences), device=logits.device), last], vocab)
            return [int(t) for t in full.float().argmax(dim=-1)]

        return self._forward(self._padded(sequences), on_logits)

    def generate_greedy(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                        finished: Callable[[int, list[int]], bool]) -> list[list[int]]:
        """Greedy continuations of a batch of prompts: row ``i`` stops when ``finished(i, its new tokens)`` or after
        ``max_new_tokens``. Each step re-runs the whole (right-padded) batch; finished rows are dropped from it."""
        outputs: list[list[int]] = [[] for _ in prompts]
        active = [i for i in range(len(prompts)) if max_new_tokens > 0]
        while active:
            chosen = self.next_tokens([list(prompts[i]) + outputs[i] for i in active])
            still = []
            for i, token in zip(active, chosen):
                outputs[i].append(token)
                if not finished(i, outputs[i]) and len(outputs[i]) < max_new_tokens:
                    still.append(i)
            active = still
        return outputs
