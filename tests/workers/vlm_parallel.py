"""Worker for tests/test_vlm.py: the VLM under TP/PP matches TP=PP=1.

``--reference OUT``: world of one. Random VLM weights (tiny CLIP + tiny Llama), a batch with one-image,
two-image and text-only samples expanded to a fixed sequence length; logits, one stage-3 training step with
partly frozen encoder (loss, grad norm, updated weights) -> OUT.
``--compare REF``: under torchrun with 4 processes, runs TP=2/PP=2 and TP=2/DP=2 with sequence parallelism on the
same weights and batch and checks everything against REF.
"""
import dataclasses
from functools import partial

import torch

from megatron_zero.models.clip_vit import get_vision_preset
from megatron_zero.models.freezing import apply_freezing
from megatron_zero.models.llama import RuntimeOptions
from megatron_zero.models.llama_config import get_preset
from megatron_zero.models.vlm import VLMConfig, build_vlm, encoder_canonical_state, expand_image_placeholders, \
    load_vlm_canonical
from megatron_zero.parallel import initialize, sharding
from megatron_zero.training.optimizer import OptimizerOptions, build_optimizer, wrap_ddp
from megatron_zero.training.train_step import lm_loss_func, train_step
from tests.workers.common import main, report_failures

CFG = VLMConfig(dataclasses.replace(get_preset("tiny"), vocab_size=250), get_vision_preset("tiny-clip"), image_token_id=5)
SEQ, MICRO_BATCH = 64, 2
SAMPLES = [[1, 5, 7, 8, 9, 10], [3, 4, 5, 6, 5, 11], [12, 13, 14, 15], [5, 20, 21]]  # 1, 2, 0, 1 images
LAYOUTS = [(2, 2, False), (2, 1, True)]  # (TP, PP, sequence parallel); DP = 4 / (TP * PP)


def make_batch():
    g = torch.Generator().manual_seed(0)
    labels = [torch.randint(0, 250, (len(s),), generator=g).tolist() for s in SAMPLES]
    mask = [(torch.rand(len(s), generator=g) > 0.3).tolist() for s in SAMPLES]
    ex = expand_image_placeholders(SAMPLES, labels, mask, CFG.image_token_id, CFG.num_image_embeddings, seq_length=SEQ)
    images = [torch.randn(sum(t == CFG.image_token_id for t in s), 3, 16, 16, generator=g) for s in SAMPLES]
    return {"tokens": ex.input_ids, "labels": ex.labels.clamp(min=0), "loss_mask": ex.loss_mask.float(),
            "image_mask": ex.image_mask, "images": images}


def micro_batches(batch, rows):
    for i in range(0, len(rows), MICRO_BATCH):
        idx = rows[i:i + MICRO_BATCH]
        out = {k: batch[k][idx] for k in ("tokens", "labels", "loss_mask", "image_mask")}
        out["images"] = torch.cat([batch["images"][j] for j in idx])
        yield out


def forward_step(data_iterator, model, with_labels=True):
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    b = next(data_iterator)
    pos = torch.arange(SEQ).expand_as(b["tokens"])
    out = model(b["tokens"], pos, images=b["images"], image_mask=b["image_mask"],
                labels=b["labels"] if with_labels else None)
    if with_labels:
        return out, partial(lm_loss_func, b["loss_mask"])

    def collect(output):
        full = gather_from_tensor_model_parallel_region(output)
        return output.sum() * 0, torch.tensor(1, dtype=torch.int), {"logits": full.detach()}

    return out, collect


def run(tp, pp, sp, canonical=None):
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
    chunks = wrap_ddp([model], OptimizerOptions(lr=1e-2))
    opt = build_optimizer(chunks, OptimizerOptions(lr=1e-2))
    batch = make_batch()
    rows = list(range(len(SAMPLES)))[ps.get_data_parallel_rank()::dp]
    nmb = len(rows) // MICRO_BATCH
    logits = get_forward_backward_func()(
        forward_step_func=partial(forward_step, with_labels=False), data_iterator=micro_batches(batch, rows),
        model=chunks, num_microbatches=nmb, seq_length=SEQ, micro_batch_size=MICRO_BATCH, forward_only=True)
    logits = torch.cat([d["logits"] for d in logits])[..., :CFG.decoder.vocab_size] if logits else None
    result = train_step(forward_step, micro_batches(batch, rows), chunks, opt, nmb, SEQ, MICRO_BATCH)
    vlm = chunks[0].module
    after = {"encoder": encoder_canonical_state(vlm),
             "decoder": sharding.gather_canonical([vlm.language_model], vocab_size=CFG.decoder.vocab_size)}
    return initial, rows, logits, result, after


def reference(out):
    initial, _, logits, result, after = run(1, 1, False)
    torch.save(dict(initial=initial, logits=logits, loss=result.loss, grad_norm=result.grad_norm, after=after), out)


def compare(ref_path):
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    ref = torch.load(ref_path, weights_only=False)
    failures = []
    for tp, pp, sp in LAYOUTS:
        tag = f"TP={tp} PP={pp} DP={4 // (tp * pp)} SP={sp}"
        _, rows, logits, result, after = run(tp, pp, sp, ref["initial"])
        if ps.is_pipeline_last_stage():
            err = (logits - ref["logits"][rows]).abs().max().item()
            if err > 1e-5:
                failures.append(f"{tag}: logits differ by {err:.3g}")
            if abs(result.loss - ref["loss"]) > 1e-5:
                failures.append(f"{tag}: loss {result.loss} != {ref['loss']}")
        if abs(result.grad_norm - ref["grad_norm"]) > 1e-5 * max(1.0, ref["grad_norm"]):
            failures.append(f"{tag}: grad norm {result.grad_norm} != {ref['grad_norm']}")
        for part in ("encoder", "decoder"):
            if not after[part]:
                continue  # this stage holds no encoder
            for k, v in ref["after"][part].items():
                if part == "decoder" and k not in after[part]:
                    failures.append(f"{tag}: missing decoder tensor {k}")
                elif k in after[part] and (after[part][k] - v).abs().max().item() > 1e-4:
                    failures.append(f"{tag}: {part} {k} differs after the step")
            frozen_same = torch.equal(after[part].get("vision_model.pre_layernorm.weight", torch.zeros(1)),
                                      ref["initial"][part].get("vision_model.pre_layernorm.weight", torch.zeros(1)))
            if not frozen_same:
                failures.append(f"{tag}: frozen encoder pre_layernorm changed")
        if dist.get_rank() == 0:
            print(f"checked {tag}: grad-norm {result.grad_norm:.6f} (reference {ref['grad_norm']:.6f})", flush=True)
    return report_failures(failures, "ALL VLM LAYOUTS MATCH")


if __name__ == "__main__":
    main(reference, compare)
