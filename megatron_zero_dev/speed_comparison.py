"""Our training step vs plain transformers on the same Llama, alternating in one process (``tools/compare_speed.py``).

Both sides train the same architecture in fp32 with AdamW (betas 0.9/0.999, eps 1e-8, no weight decay) and
gradient clipping at 1.0 on the same random token batches:

* ``megatron_zero``: megatron-core ``GPTModel`` with our layer spec (the CPU path: local spec +
  :class:`~megatron_zero.models.attention.SDPACoreAttention`), megatron DDP, megatron's optimizer (the plain one,
  ``pretrain_lm``'s default; ``distributed_optimizer=True`` for ``--use-distributed-optimizer``, whose shard
  copies and buffer fills cost ~5-15% of a CPU step at DP=1, where it shards nothing) and
  megatron's schedule and LR scheduler: :meth:`~megatron_zero.training.trainer.Trainer.step`, exactly what
  ``pretrain_lm`` runs per iteration;
* ``transformers``: ``LlamaForCausalLM`` (``attn_implementation="eager"`` by default), ``loss.backward()``,
  ``clip_grad_norm_`` and ``torch.optim.AdamW``.

Steps alternate (ours, theirs, ours, ...) so that load from other processes on the machine hits both alike; the
reported ratio is over the per-round ratios (median, min, max) of wall time, and of process CPU time (which
other jobs on a shared machine disturb less).
"""
from __future__ import annotations

import dataclasses
import statistics
import time

import torch


@dataclasses.dataclass
class SpeedConfig:
    num_layers: int = 4
    hidden_size: int = 512
    ffn_hidden_size: int = 1536
    num_attention_heads: int = 8
    num_query_groups: int = 2
    vocab_size: int = 32000
    seq_length: int = 256
    batch_size: int = 8
    rounds: int = 5
    warmup: int = 1
    attn_implementation: str = "eager"
    clip_grad: float = 1.0
    seed: int = 0
    distributed_optimizer: bool = False


def llama_config(cfg: SpeedConfig):
    from megatron_zero.models.llama_config import LlamaConfig

    return LlamaConfig(num_layers=cfg.num_layers, hidden_size=cfg.hidden_size, ffn_hidden_size=cfg.ffn_hidden_size,
                       num_attention_heads=cfg.num_attention_heads, num_query_groups=cfg.num_query_groups,
                       vocab_size=cfg.vocab_size, max_position_embeddings=max(cfg.seq_length, 128),
                       rope_theta=10000.0, rope_scaling_factor=None, name="speed-compare")


class OurStep:
    """The library's Trainer (:func:`megatron_zero_dev.steps.step_trainer`): one ``step`` per call."""

    def __init__(self, cfg: SpeedConfig, tokens: torch.Tensor):
        from megatron_zero.models.llama import RuntimeOptions, build_llama_chunks
        from megatron_zero.training.train_step import lm_forward_step
        from megatron_zero_dev.steps import alternating_token_batches, step_trainer

        torch.manual_seed(cfg.seed)
        chunks = build_llama_chunks(llama_config(cfg), RuntimeOptions(make_vocab_size_divisible_by=1))
        self.trainer = step_trainer(
            chunks, lm_forward_step, alternating_token_batches(tokens, cfg.seq_length, cfg.batch_size,
                                                               cfg.batch_size),
            steps=cfg.warmup + cfg.rounds, seq_length=cfg.seq_length, global_batch_size=cfg.batch_size,
            micro_batch_size=cfg.batch_size, lr=1e-5, clip_grad=cfg.clip_grad,
            distributed_optimizer=cfg.distributed_optimizer)

    def __call__(self, i: int) -> float:
        return self.trainer.step(i).loss


class TransformersStep:
    def __init__(self, cfg: SpeedConfig, tokens: torch.Tensor):
        from transformers import LlamaConfig as HFLlamaConfig
        from transformers import LlamaForCausalLM

        torch.manual_seed(cfg.seed)
        hf = HFLlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                           intermediate_size=cfg.ffn_hidden_size, num_hidden_layers=cfg.num_layers,
                           num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_query_groups,
                           max_position_embeddings=max(cfg.seq_length, 128), rope_theta=10000.0,
                           tie_word_embeddings=False, attention_dropout=0.0)
        self.model = LlamaForCausalLM._from_config(hf, attn_implementation=cfg.attn_implementation,
                                                   dtype=torch.float32)
        self.model.train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-5, betas=(0.9, 0.999), eps=1e-8,
                                     weight_decay=0.0)
        n = cfg.batch_size * (cfg.seq_length + 1)
        self.batches = [tokens[k * n:(k + 1) * n].view(cfg.batch_size, cfg.seq_length + 1) for k in range(2)]
        self.cfg = cfg

    def __call__(self, i: int) -> float:
        b = self.batches[i % 2]
        out = self.model(input_ids=b[:, :-1])
        loss = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), b[:, 1:].flatten())
        loss.backward()
        if self.cfg.clip_grad:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.clip_grad)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(loss)


def run_comparison(cfg: SpeedConfig, log=print) -> dict:
    """Alternate one training step of each side ``warmup + rounds`` times; tokens/s per step and the ratio."""
    g = torch.Generator().manual_seed(cfg.seed)
    tokens = torch.randint(0, cfg.vocab_size, (2 * cfg.batch_size * (cfg.seq_length + 1) + 1,), generator=g)
    sides = {"megatron_zero": OurStep(cfg, tokens), "transformers": TransformersStep(cfg, tokens)}
    times = {k: [] for k in sides}
    cpu = {k: [] for k in sides}
    ntok = cfg.batch_size * cfg.seq_length
    for r in range(cfg.warmup + cfg.rounds):
        order = list(sides) if r % 2 == 0 else list(sides)[::-1]
        for name in order:
            t0, c0 = time.perf_counter(), time.process_time()
            loss = sides[name](r)
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            if r >= cfg.warmup:
                times[name].append(dt)
                cpu[name].append(dc)
            log(f"round {r}{' (warm-up)' if r < cfg.warmup else ''} {name:14s} {dt * 1e3:8.1f} ms  "
                f"{ntok / dt:8.1f} tok/s  loss {loss:.4f}")
    ratios = [t / o for o, t in zip(times["megatron_zero"], times["transformers"])]
    cpu_ratios = [t / o for o, t in zip(cpu["megatron_zero"], cpu["transformers"])]
    return {
        "config": dataclasses.asdict(cfg),
        "tokens_per_step": ntok,
        "megatron_zero_tokens_per_s": [ntok / t for t in times["megatron_zero"]],
        "transformers_tokens_per_s": [ntok / t for t in times["transformers"]],
        "ratio_per_round": ratios,
        "ratio_median": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        # CPU seconds of this process per step: less sensitive to other jobs on a shared machine
        "cpu_time_ratio_per_round": cpu_ratios,
        "cpu_time_ratio_median": statistics.median(cpu_ratios),
        "threads": torch.get_num_threads(),
    }


def format_result(r: dict) -> str:
    ours, theirs = r["megatron_zero_tokens_per_s"], r["transformers_tokens_per_s"]
    return (f"megatron_zero {statistics.median(ours):8.1f} tok/s (median; {min(ours):.1f}-{max(ours):.1f}) | "
            f"transformers {statistics.median(theirs):8.1f} tok/s ({min(theirs):.1f}-{max(theirs):.1f}) | "
            f"ratio ours/transformers {r['ratio_median']:.2f}x (per round {r['ratio_min']:.2f}-{r['ratio_max']:.2f}x, "
            f"{len(r['ratio_per_round'])} rounds, {r['threads']} threads); by process CPU time "
            f"{r['cpu_time_ratio_median']:.2f}x ({min(r['cpu_time_ratio_per_round']):.2f}-"
            f"{max(r['cpu_time_ratio_per_round']):.2f}x)")
