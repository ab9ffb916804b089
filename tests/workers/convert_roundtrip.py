"""Worker for tests/test_convert_checkpoint.py, run under torchrun with 4 processes.

Steps, on the tiny HF Llama in ``--hf`` (reference logits from transformers in ``--ref``):

1. hf -> mcore at TP=2/PP=2; the checkpoint loaded into a TP=2/PP=2 model gives transformers' logits;
2. the same checkpoint loaded straight into TP=1/PP=1 (DP=4): megatron-core reshards on load, vocabulary
   padding 512 -> 384 rows;
3. mcore -> mcore reshard to TP=1/PP=2 with an uneven split [1, 3]; loaded there, same logits;
4. mcore -> hf (collective read, rank 0 writes small shards) into ``<work>/hf_out`` (checked by the test);
5. a save interrupted after the tensors were written leaves neither the checkpoint nor its temp directory;
6. the tiny HF ``CLIPVisionModel`` in ``--clip-hf``: hf -> mcore at TP=2 gives transformers' features
   (``--clip-ref``), and mcore -> hf writes ``<work>/clip_out`` (checked by the test).
"""
import argparse
import os
import sys

import torch
import torch.distributed as dist

from megatron_zero.checkpointing import mcore_checkpoint
from megatron_zero.models.llama import RuntimeOptions, build_llama_model
from megatron_zero.parallel import initialize
from megatron_zero.checkpointing import convert_clip, convert_llama

MICRO_BATCH = 1
TOLERANCE = 2e-5


def logits_forward_step(data_iterator, model):
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    tokens = next(data_iterator)
    pos = torch.arange(tokens.shape[1]).unsqueeze(0).expand(tokens.shape[0], -1)
    out = model(tokens, pos, None)

    def collect(output):
        full = gather_from_tensor_model_parallel_region(output)
        return output.sum() * 0, torch.tensor(1, dtype=torch.int), {"logits": full.detach()}

    return out, collect


def checkpoint_logits(ckpt, tp, pp, stage_layers, tokens):
    """Build a TP/PP model, load ``ckpt`` into it, run the pipeline forward; (rows, logits) on last stages."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    cfg = mcore_checkpoint.load_model_config(ckpt)
    dp = initialize.initialize_parallel(tp, pp)
    opts = RuntimeOptions(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                          pipeline_stage_layers=stage_layers)
    model = build_llama_model(cfg, opts).eval()
    mcore_checkpoint.load_model([model], ckpt)
    rows = list(range(tokens.shape[0]))[ps.get_data_parallel_rank()::dp]
    batches = iter([tokens[i:i + 1] for i in rows])
    out = get_forward_backward_func()(
        forward_step_func=logits_forward_step, data_iterator=batches, model=[model], num_microbatches=len(rows),
        seq_length=tokens.shape[1], micro_batch_size=MICRO_BATCH, forward_only=True)
    if not ps.is_pipeline_last_stage():
        return rows, None
    return rows, torch.cat([d["logits"] for d in out])[..., : cfg.vocab_size]


def check_logits(tag, ckpt, tp, pp, stage_layers, ref, failures):
    rows, logits = checkpoint_logits(ckpt, tp, pp, stage_layers, ref["tokens"])
    err = None if logits is None else (logits - ref["logits"][rows]).abs().max().item()
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, err)
    worst = max(e for e in errors if e is not None)
    if worst > TOLERANCE:
        failures.append(f"{tag}: logits differ from transformers by {worst:.3g}")
    if dist.get_rank() == 0:
        print(f"{tag}: max |logits - transformers| = {worst:.2e}", flush=True)


def interrupted_save(work, failures):
    """A save that dies after the tensors were written must leave nothing that looks like a checkpoint."""
    from megatron.core import dist_checkpointing

    cfg = mcore_checkpoint.load_model_config(os.path.join(work, "tp2pp2"))
    initialize.initialize_parallel(2, 2)
    model = build_llama_model(cfg, RuntimeOptions(tensor_model_parallel_size=2, pipeline_model_parallel_size=2))
    real_save = dist_checkpointing.save

    def save_then_die(*args, **kwargs):
        real_save(*args, **kwargs)
        raise KeyboardInterrupt("simulated interruption")

    target = os.path.join(work, "interrupted")
    dist_checkpointing.save = save_then_die
    try:
        mcore_checkpoint.save_model([model], target, cfg)
        failures.append("interrupted save did not raise")
    except KeyboardInterrupt:
        pass
    finally:
        dist_checkpointing.save = real_save
    dist.barrier()
    left = [n for n in os.listdir(work) if n.startswith("interrupted")]
    if left:
        failures.append(f"interrupted save left {left}")


def clip_steps(clip_hf, clip_ref, work, failures):
    from megatron_zero.models.clip_vit import ClipVisionConfig, ClipVisionTransformer

    ckpt = os.path.join(work, "clip_tp2")
    convert_clip.clip_to_mcore(clip_hf, ckpt, "hf", tp=2)
    cfg = ClipVisionConfig.load(os.path.join(ckpt, mcore_checkpoint.CONFIG_FILE))
    initialize.initialize_parallel(2, 1)
    model = ClipVisionTransformer(cfg, 2).eval()
    mcore_checkpoint.load_model([model], ckpt)
    with torch.no_grad():
        err = (model(clip_ref["pixels"]) - clip_ref["features"]).abs().max().item()
    if err > TOLERANCE:
        failures.append(f"CLIP hf -> mcore TP=2: features differ from transformers by {err:.3g}")
    if dist.get_rank() == 0:
        print(f"CLIP hf -> mcore TP=2: max |features - transformers| = {err:.2e}", flush=True)
    convert_clip.clip_mcore_to_hf(ckpt, os.path.join(work, "clip_out"), max_shard_bytes=20_000)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--hf", required=True)
    p.add_argument("--work", required=True)
    p.add_argument("--ref", required=True)
    p.add_argument("--clip-hf", required=True)
    p.add_argument("--clip-ref", required=True)
    a = p.parse_args()
    ref = torch.load(a.ref)
    failures = []
    tp2pp2, tp1pp2 = os.path.join(a.work, "tp2pp2"), os.path.join(a.work, "tp1pp2")

    convert_llama.hf_to_mcore(a.hf, tp2pp2, tp=2, pp=2)
    check_logits("hf -> mcore TP=2 PP=2", tp2pp2, 2, 2, None, ref, failures)
    check_logits("TP=2 PP=2 checkpoint loaded at TP=1 PP=1", tp2pp2, 1, 1, None, ref, failures)
    convert_llama.mcore_to_mcore(tp2pp2, tp1pp2, tp=1, pp=2, stage_layers=[1, 3])
    check_logits("mcore TP=2 PP=2 -> TP=1 PP=2 [1, 3]", tp1pp2, 1, 2, [1, 3], ref, failures)
    convert_llama.mcore_to_hf(tp2pp2, os.path.join(a.work, "hf_out"), max_shard_bytes=40_000)
    interrupted_save(a.work, failures)
    clip_steps(a.clip_hf, torch.load(a.clip_ref), a.work, failures)

    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, failures)
    everything = list(dict.fromkeys(f for fs in gathered for f in fs))
    if dist.get_rank() == 0:
        print("\n".join(everything) if everything else "ALL CHECKS PASSED", flush=True)
    initialize.destroy_parallel()
    return 1 if everything else 0


if __name__ == "__main__":
    sys.exit(main())
