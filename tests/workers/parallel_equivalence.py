"""Worker for tests/test_parallel_equivalence.py.

``--reference OUT``: world of one (TP=PP=DP=1): random weights, logits, one optimizer step -> OUT.
``--compare REF``: under torchrun with 4 processes, runs several TP/PP/DP layouts in turn on the same
weights and global batch, and checks logits, loss, grad norm and the updated weights against REF.
"""
import dataclasses

import torch

from megatron_zero.models.llama import RuntimeOptions, build_llama_chunks
from megatron_zero.models.llama_config import LlamaConfig
from megatron_zero.parallel import initialize, sharding
from megatron_zero.training.optimizer import OptimizerOptions, build_optimizer, wrap_ddp
from megatron_zero.training.train_step import train_step
from tests.workers.common import main, report_failures

GLOBAL_BATCH, MICRO_BATCH, SEQ = 8, 2, 16
# Five layers: pipeline splits are uneven, as for surrogates.
CONFIGS = {
    "untied": LlamaConfig(num_layers=5, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                          num_query_groups=2, vocab_size=250, max_position_embeddings=64,
                          rope_theta=500000.0, rope_scaling_factor=8.0, name="equiv-untied"),
}
CONFIGS["tied"] = dataclasses.replace(CONFIGS["untied"], tie_word_embeddings=True, name="equiv-tied")
# (config, TP, PP, explicit stage layers, sequence parallel, virtual stages); DP = 4 / (TP * PP)
LAYOUTS = [
    ("untied", 2, 2, None, False, None),
    ("untied", 1, 2, [1, 4], False, None),
    ("untied", 2, 1, None, True, None),
    ("tied", 2, 2, None, True, None),
    ("untied", 1, 2, None, False, 2),  # interleaved 1F1B: 4 model chunks of [2, 1, 1, 1] layers
]


def make_batch():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 250, (GLOBAL_BATCH, SEQ + 1), generator=g)
    loss_mask = (torch.rand(GLOBAL_BATCH, SEQ, generator=g) > 0.3).float()
    return {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": loss_mask}


def micro_batches(batch, rows):
    for i in range(0, len(rows), MICRO_BATCH):
        idx = rows[i:i + MICRO_BATCH]
        yield {k: v[idx] for k, v in batch.items()}


def logits_forward_step(data_iterator, model):
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    b = next(data_iterator)
    pos = torch.arange(SEQ).unsqueeze(0).expand(b["tokens"].shape[0], -1)
    out = model(b["tokens"], pos, None)

    def collect(output):
        full = gather_from_tensor_model_parallel_region(output)
        return output.sum() * 0, torch.tensor(1, dtype=torch.int), {"logits": full.detach()}

    return out, collect


def lm_step(data_iterator, model):
    from megatron_zero.training.train_step import lm_forward_step

    return lm_forward_step(data_iterator, model)


def run_layout(cfg, tp, pp, stage_layers, canonical=None, sequence_parallel=False, vpp=None):
    """Returns (logits [B,S,V] on last stage else None, StepResult, canonical weights after the step)."""
    from megatron.core import parallel_state as ps

    dp = initialize.initialize_parallel(tp, pp, vpp, seed=1)
    opts = RuntimeOptions(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                          pipeline_stage_layers=stage_layers, sequence_parallel=sequence_parallel,
                          virtual_pipeline_model_parallel_size=vpp)
    models = build_llama_chunks(cfg, opts)
    if canonical is not None:
        for model in models:
            sharding.load_canonical(model, canonical, ps.get_tensor_model_parallel_rank(), tp)
    initial = sharding.gather_canonical(models, vocab_size=cfg.vocab_size)
    # eps 1e-5 (not 1e-8): Adam's first step is lr * g / (|g| + eps), whose sensitivity to g is lr / eps at g ~ 0;
    # at 1e-8 the fp32 summation-order noise of a near-zero gradient (~1e-9) could move a weight by ~lr / 10,
    # at 1e-5 by ~1e-6, so the weights after the step can be compared tightly.
    chunks = wrap_ddp(models, OptimizerOptions(lr=1e-2, adam_eps=1e-5))
    opt = build_optimizer(chunks, OptimizerOptions(lr=1e-2, adam_eps=1e-5))

    batch = make_batch()
    dp_rank = ps.get_data_parallel_rank()
    rows = list(range(GLOBAL_BATCH))[dp_rank::dp]
    nmb = len(rows) // MICRO_BATCH

    from megatron.core.pipeline_parallel import get_forward_backward_func

    def data():  # the interleaved schedule takes one iterator per model chunk
        its = [micro_batches(batch, rows) for _ in chunks]
        return its if len(its) > 1 else its[0]

    logits = get_forward_backward_func()(
        forward_step_func=logits_forward_step, data_iterator=data(), model=chunks,
        num_microbatches=nmb, seq_length=SEQ, micro_batch_size=MICRO_BATCH, forward_only=True,
    )
    local_logits = torch.cat([d["logits"] for d in logits]) if logits else None
    result = train_step(lm_step, data(), chunks, opt, nmb, SEQ, MICRO_BATCH)
    result_after = train_step(lm_step, data(), chunks, opt, nmb, SEQ, MICRO_BATCH,
                              forward_only=True)
    after = sharding.gather_canonical([c.module for c in chunks], vocab_size=cfg.vocab_size)
    return initial, rows, local_logits, result, result_after.loss, after


def reference(out):
    results = {}
    for name, cfg in CONFIGS.items():
        initial, _, logits, result, loss_after, after = run_layout(cfg, 1, 1, None)
        results[name] = dict(initial=initial, logits=logits[..., : cfg.vocab_size], loss=result.loss,
                             grad_norm=result.grad_norm, loss_after=loss_after, after=after)
    torch.save(results, out)


def compare(ref_path):
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    ref = torch.load(ref_path, weights_only=False)
    failures = []
    for name, tp, pp, stage_layers, sp, vpp in LAYOUTS:
        r = ref[name]
        tag = f"{name} TP={tp} PP={pp} VPP={vpp} DP={4 // (tp * pp)} SP={sp} stages={stage_layers}"
        _, rows, logits, result, loss_after, after = run_layout(
            CONFIGS[name], tp, pp, stage_layers, r["initial"], sequence_parallel=sp, vpp=vpp)
        if ps.is_pipeline_last_stage():
            err = (logits[..., : CONFIGS[name].vocab_size] - r["logits"][rows]).abs().max().item()
            if err > 1e-5:
                failures.append(f"{tag}: logits differ by {err:.3g}")
            if abs(result.loss - r["loss"]) > 1e-5:
                failures.append(f"{tag}: loss {result.loss} != {r['loss']}")
            if abs(loss_after - r["loss_after"]) > 1e-5:
                failures.append(f"{tag}: loss after the step {loss_after} != {r['loss_after']}")
        if abs(result.grad_norm - r["grad_norm"]) > 1e-5 * max(1.0, r["grad_norm"]):
            failures.append(f"{tag}: grad norm {result.grad_norm} != {r['grad_norm']}")
        for k, v in r["after"].items():
            if k not in after:
                failures.append(f"{tag}: missing {k} after step")
            # 0.1% of lr (see the optimizer's eps in run_layout)
            elif (after[k] - v).abs().max().item() > 1e-5:
                failures.append(f"{tag}: {k} differs after step by {(after[k] - v).abs().max().item():.3g}")
        if dist.get_rank() == 0:
            print(f"checked {tag}: grad-norm {result.grad_norm:.6f} (reference {r['grad_norm']:.6f})", flush=True)
    return report_failures(failures, "ALL LAYOUTS MATCH")


if __name__ == "__main__":
    main(reference, compare)
