"""Worker for tests/test_qwen.py, run under torchrun with 4 processes (one launch for every multi-process check).

For each tiny HF model directory given (``--case NAME HF_DIR REF``: Qwen3ForCausalLM, Qwen2ForCausalLM):

1. hf -> mcore at TP=2/PP=2 with the conversion every tool uses; the checkpoint loaded into a TP=2/PP=2 model
   gives transformers' logits (``REF``: tokens and logits);
2. mcore -> hf into ``<work>/<NAME>_hf_out`` (compared bit for bit with ``HF_DIR`` by the test).

``--lora REF``: a LoRA model at TP=2 (PP=1, DP=2) gives the TP=1 logits and gradients of the LoRA weights written
by the test in ``REF`` (see tests/test_lora.py).
"""
import argparse
import os
import sys

import torch
import torch.distributed as dist

from megatron_zero.checkpointing import mcore_checkpoint
from megatron_zero.models.llama import RuntimeOptions, build_llama_model
from megatron_zero.parallel import initialize
from tests.workers.common import report_failures

try:  # the library home of the conversions (tools/convert_checkpoint.py is its CLI)
    from megatron_zero.checkpointing import convert_llama as conversion
except ImportError:  # pragma: no cover - before the move
    from megatron_zero.checkpointing import convert_llama as conversion

TOLERANCE = 2e-5


def logits_forward_step(data_iterator, model):
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    tokens = next(data_iterator)
    pos = torch.arange(tokens.shape[1]).unsqueeze(0).expand(tokens.shape[0], -1)
    out = model(tokens, pos, None)

    def collect(output):
        return output.sum() * 0, torch.tensor(1, dtype=torch.int), {
            "logits": gather_from_tensor_model_parallel_region(output).detach()}

    return out, collect


def pipeline_logits(ckpt, tp, pp, tokens):
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    cfg = mcore_checkpoint.load_model_config(ckpt)
    dp = initialize.initialize_parallel(tp, pp)
    model = build_llama_model(cfg, RuntimeOptions(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)).eval()
    mcore_checkpoint.load_model([model], ckpt)
    rows = list(range(tokens.shape[0]))[ps.get_data_parallel_rank()::dp]
    out = get_forward_backward_func()(
        forward_step_func=logits_forward_step, data_iterator=iter([tokens[i:i + 1] for i in rows]), model=[model],
        num_microbatches=len(rows), seq_length=tokens.shape[1], micro_batch_size=1, forward_only=True)
    if not ps.is_pipeline_last_stage():
        return rows, None
    return rows, torch.cat([d["logits"] for d in out])[..., : cfg.vocab_size]


def family_case(name, hf_dir, ref_path, work, failures):
    ref = torch.load(ref_path)
    ckpt = os.path.join(work, f"{name}_tp2pp2")
    conversion.hf_to_mcore(hf_dir, ckpt, tp=2, pp=2)
    rows, logits = pipeline_logits(ckpt, 2, 2, ref["tokens"])
    err = None if logits is None else (logits - ref["logits"][rows]).abs().max().item()
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, err)
    worst = max(e for e in errors if e is not None)
    if worst > TOLERANCE:
        failures.append(f"{name}: hf -> mcore TP=2 PP=2 logits differ from transformers by {worst:.3g}")
    if dist.get_rank() == 0:
        print(f"{name}: hf -> mcore TP=2 PP=2: max |logits - transformers| = {worst:.2e}", flush=True)
    conversion.mcore_to_hf(ckpt, os.path.join(work, f"{name}_hf_out"), max_shard_bytes=60_000)


def lora_case(ref_path, failures):
    from tests.workers.lora_reference import lora_logits_and_grads

    ref = torch.load(ref_path)
    initialize.initialize_parallel(2, 1)
    logits, grads = lora_logits_and_grads(ref, tensor_parallel_size=2)
    err = (logits - ref["logits"]).abs().max().item()
    gerr = max((grads[k] - ref["grads"][k]).abs().max().item() for k in ref["grads"])
    if grads.keys() != ref["grads"].keys():
        failures.append(f"LoRA TP=2: gradient keys {sorted(grads)} != {sorted(ref['grads'])}")
    if err > TOLERANCE or gerr > 1e-4:
        failures.append(f"LoRA TP=2 vs TP=1: logits differ by {err:.3g}, LoRA gradients by {gerr:.3g}")
    if dist.get_rank() == 0:
        print(f"LoRA TP=2 vs TP=1: max |logits diff| = {err:.2e}, max |grad diff| = {gerr:.2e}", flush=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--case", nargs=3, action="append", default=[], metavar=("NAME", "HF_DIR", "REF"))
    p.add_argument("--work", required=True)
    p.add_argument("--lora", default=None)
    a = p.parse_args()
    failures = []
    for name, hf_dir, ref in a.case:
        family_case(name, hf_dir, ref, a.work, failures)
    if a.lora:
        lora_case(a.lora, failures)
    return report_failures(failures, "ALL QWEN CHECKS PASSED")


if __name__ == "__main__":
    sys.exit(main())
