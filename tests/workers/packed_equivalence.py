"""Worker for tests/test_packing_training.py: packed micro-batches train exactly like one sample per row.

A tiny VLM (tiny CLIP + tiny Llama, random weights) and eight samples: text-only, one-image, two-image and
multi-turn ones of different lengths. :class:`~megatron_zero.training.vlm_batches.VLMBatches` lays the same
global batch out padded (one sample per row) and packed (several samples per row, THD ``cu_seqlens``); for each
layout we record every sample's summed token loss and loss-token count (forward only) and the canonical gradients
of one forward/backward (the paper's length-weighted loss, partly frozen encoder).

``--reference OUT``: world of one; padded and packed at TP=PP=1 must agree; writes the padded result to OUT.
``--compare REF``: under torchrun with 4 processes, packed at TP=2/PP=2 and at TP=2/SP/DP=2 against REF.
"""
import argparse
import dataclasses
import sys
import zlib
from functools import partial

import numpy as np
import torch

from megatron_zero.data.datasets import Sample
from megatron_zero.models.clip_vit import get_vision_preset
from megatron_zero.models.freezing import apply_freezing
from megatron_zero.models.llama import RuntimeOptions
from megatron_zero.models.llama_config import get_preset
from megatron_zero.models.vlm import VLMConfig, build_vlm, encoder_canonical_state, load_vlm_canonical
from megatron_zero.parallel import initialize, sharding
from megatron_zero.training.optimizer import OptimizerOptions, unwrap, wrap_ddp
from megatron_zero.training.train_step import lm_loss_func
from megatron_zero.training.vlm_batches import VLMBatches, packed_seq_params
from tests.workers.common import report_failures

CFG = VLMConfig(dataclasses.replace(get_preset("tiny"), vocab_size=250), get_vision_preset("tiny-clip"), image_token_id=5)
E = CFG.num_image_embeddings  # 19
SEQ, MICRO_BATCH, GLOBAL_BATCH = 64, 2, 8
# (text tokens, images, assistant turns)
SHAPES = [(10, 1, 1), (12, 2, 1), (15, 0, 1), (30, 0, 3), (25, 1, 2), (8, 0, 1), (5, 1, 1), (40, 0, 2)]
TOL = 2e-5


def make_samples() -> list[Sample]:
    g = np.random.default_rng(0)
    samples = []
    for k, (n_text, n_img, turns) in enumerate(SHAPES):
        ids = g.integers(10, 250, n_text)
        ids = np.concatenate([ids[:2], [5] * n_img, ids[2:]])  # placeholders after a "BOS + header"
        mask = np.zeros(len(ids), dtype=bool)
        cuts = np.linspace(2 + n_img, len(ids), 2 * turns + 1).astype(int)
        for t in range(turns):  # user part, then an assistant part with loss
            mask[cuts[2 * t + 1]:cuts[2 * t + 2]] = True
        samples.append(Sample(ids.astype(np.int64), mask, [f"img{k}_{j}" for j in range(n_img)], id=str(k)))
    return samples


def load_image(path: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(zlib.crc32(path.encode()))
    return torch.randn(3, CFG.vision.image_size, CFG.vision.image_size, generator=g)


def forward_step(data_iterator, model, collect=False):
    b = next(data_iterator)
    out = model(b["tokens"], b["position_ids"], None, images=b["images"], image_mask=b["image_mask"],
                labels=b["labels"], packed_seq_params=packed_seq_params(b))
    if not collect:
        return out, partial(lm_loss_func, b["loss_mask"], token_weights=b.get("token_weights"))

    def per_sample(output):
        return output.sum() * 0, torch.tensor(1, dtype=torch.int), {
            "ce": output.detach().reshape(-1), "mask": b["loss_mask"].reshape(-1), "sample": b["sample_index"].reshape(-1)}

    return out, per_sample


def canonical_grads(vlm) -> dict:
    """Canonical (TP-gathered) gradients of this rank's chunk: main_grad swapped into the parameters."""
    from megatron.core import parallel_state as ps

    saved = {}
    for p in vlm.parameters():
        saved[p] = p.data.clone()
        grad = getattr(p, "main_grad", None)
        p.data.copy_(grad if grad is not None else torch.zeros_like(p))
    out = {"decoder": sharding.gather_canonical([vlm.language_model], vocab_size=CFG.decoder.vocab_size)}
    out["encoder"] = encoder_canonical_state(vlm) if ps.get_pipeline_model_parallel_rank() == 0 else {}
    for p, v in saved.items():
        p.data.copy_(v)
    return out


def run(tp, pp, sp, pack, canonical=None):
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    dp = initialize.initialize_parallel(tp, pp, seed=1)
    opts = RuntimeOptions(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, sequence_parallel=sp)
    model = build_vlm(CFG, opts)
    if canonical is not None:
        load_vlm_canonical(model, canonical["encoder"], canonical["decoder"])
    initial = {"encoder": encoder_canonical_state(model),
               "decoder": sharding.gather_canonical([model.language_model], vocab_size=CFG.decoder.vocab_size)}
    apply_freezing([model], "stage3", encoder_trainable_layers=2)
    chunks = wrap_ddp([model], OptimizerOptions(use_distributed_optimizer=False))
    batches = VLMBatches(make_samples(), image_token_id=CFG.image_token_id, num_image_embeddings=E, seq_length=SEQ,
                         pad_id=0, global_batch_size=GLOBAL_BATCH, micro_batch_size=MICRO_BATCH,
                         dp_rank=ps.get_data_parallel_rank(), dp_size=dp, seed=3, load_image=load_image,
                         loss_weighting="length-weighted", dp_group=ps.get_data_parallel_group(), pack_sequences=pack)

    def schedule(collect):
        step = batches.iteration(0)
        seq, mbs = step.schedule_shape
        return step, get_forward_backward_func()(
            forward_step_func=partial(forward_step, collect=collect), data_iterator=step, model=chunks,
            num_microbatches=step.num_microbatches, seq_length=seq, micro_batch_size=mbs, forward_only=collect)

    step, outs = schedule(collect=True)
    losses = {}
    for d in outs or []:
        for s in d["sample"][d["mask"] > 0].unique().tolist():
            on = (d["sample"] == s) & (d["mask"] > 0)
            losses[s] = (d["ce"][on].double().sum().item(), int(on.sum()))
    gathered = [None] * ps.get_data_parallel_world_size()
    dist.all_gather_object(gathered, losses, group=ps.get_data_parallel_group())
    losses = {k: v for g in gathered for k, v in g.items()}
    for c in chunks:
        c.zero_grad_buffer()
    schedule(collect=False)
    grads = canonical_grads(unwrap(chunks[0]))
    info = {"real": step.real_tokens, "computed": step.computed_tokens, "micro_batches": step.num_microbatches}
    return initial, losses, grads, info


def check(tag, losses, grads, ref, last_stage, failures):
    if last_stage:
        if sorted(losses) != sorted(ref["losses"]):
            failures.append(f"{tag}: samples {sorted(losses)} != {sorted(ref['losses'])}")
        for s, (total, count) in ref["losses"].items():
            got = losses.get(s)
            if got is None:
                continue
            if got[1] != count or abs(got[0] - total) > TOL * max(1.0, abs(total)):
                failures.append(f"{tag}: sample {s} loss {got} != {(total, count)}")
    for part in ("encoder", "decoder"):
        for k, v in grads[part].items():
            want = ref["grads"][part].get(k)
            if want is None:
                failures.append(f"{tag}: no reference gradient for {part} {k}")
                continue
            err = (v - want).abs().max().item()
            if err > TOL * max(1.0, want.abs().max().item()):
                failures.append(f"{tag}: {part} gradient {k} differs by {err:.3g}")
    nonzero = sum(int(v.abs().sum() > 0) for part in grads.values() for v in part.values())
    if not nonzero:
        failures.append(f"{tag}: every gradient is zero")


def reference(out) -> int:

    initial, losses, grads, info = run(1, 1, False, pack=False)
    ref = {"initial": initial, "losses": losses, "grads": grads}
    _, p_losses, p_grads, p_info = run(1, 1, False, pack=True, canonical=initial)
    failures = []
    check("packed TP=1 PP=1", p_losses, p_grads, ref, True, failures)
    if p_info["computed"] >= info["computed"] or p_info["real"] != info["real"]:
        failures.append(f"packing did not remove padding: padded {info}, packed {p_info}")
    print(f"padded {info} | packed {p_info}", flush=True)
    torch.save(ref, out)
    return report_failures(failures, "PACKED TP=1 MATCHES PADDED")


def compare(ref_path) -> int:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    ref = torch.load(ref_path, weights_only=False)
    failures = []
    for tp, pp, sp in [(2, 2, False), (2, 1, True)]:
        tag = f"packed TP={tp} PP={pp} DP={4 // (tp * pp)} SP={sp}"
        _, losses, grads, _ = run(tp, pp, sp, pack=True, canonical=ref["initial"])
        check(tag, losses, grads, ref, ps.is_pipeline_last_stage(), failures)
        if dist.get_rank() == 0:
            print(f"checked {tag}", flush=True)
    return report_failures(failures, "PACKED LAYOUTS MATCH PADDED")


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--reference")
    p.add_argument("--compare")
    a = p.parse_args()
    sys.exit(reference(a.reference) if a.reference else compare(a.compare))
