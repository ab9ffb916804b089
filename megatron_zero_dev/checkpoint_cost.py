"""What checkpoints cost (``tools/checkpoint_cost.py``, issue 23), measured in one process, never in a test:

* **bytes**: a stage-2 checkpoint (trainable-only: the top encoder layers + adapter, with optimizer state; the frozen
  surrogate referenced) against a full one (``--save-frozen``) and against the bytes of the decoder it trains on,
  on the 70B recipe scaled down by ``scale`` in width (42-layer surrogate of Llama-3.1-70B dims / scale, CLIP-L/336
  dims / scale, 8 trainable encoder layers): the frozen/trainable split of the recipe is kept;
* **stall**: the time training waits for an asynchronous save (the call + publishing) against a synchronous save of
  the same state (everything trainable), alternating, ``reps`` each, for both formats of the distributed optimizer's
  state, with the training process's CPU time; the steps that run while the background write goes on are timed
  against steps without one;
* **projection**: the 70B recipe's bytes per save (stage 2 trainable-only and full, stage 3) and seconds per save
  at ``bandwidth_gbs`` GB/s of filesystem bandwidth.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import time
from typing import Optional

import torch

BYTES_ADAM = 4 + 4 + 4  # fp32 main parameter + Adam's two moments, per trainable parameter


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def scaled_recipe(scale: int):
    """The 70B stage-2 recipe with every width divided by ``scale`` (depths kept)."""
    from megatron_zero.models.clip_vit import get_vision_preset
    from megatron_zero.models.llama_config import get_preset
    from megatron_zero.models.vlm import VLMConfig

    big = get_preset("llama-3.1-70b")
    dec = dataclasses.replace(big, num_layers=42, hidden_size=big.hidden_size // scale,
                              ffn_hidden_size=big.ffn_hidden_size // scale,
                              num_attention_heads=max(big.num_attention_heads // scale, 1),
                              num_query_groups=max(big.num_query_groups // scale, 1),
                              vocab_size=big.vocab_size // scale, name=f"llama-3.1-70b-T42/{scale}")
    clip = get_vision_preset("clip-vit-l-14-336")
    vis = dataclasses.replace(clip, hidden_size=clip.hidden_size // scale,
                              ffn_hidden_size=clip.ffn_hidden_size // scale,
                              num_attention_heads=max(clip.num_attention_heads // scale, 1), name=f"clip-l/{scale}")
    return VLMConfig(dec, vis, image_token_id=1)


def _build(cfg, stage: Optional[str], distributed: bool):
    from megatron_zero.checkpointing.training_checkpoint import ensure_optimizer_state
    from megatron_zero.models.freezing import apply_freezing
    from megatron_zero.models.llama import RuntimeOptions
    from megatron_zero.models.vlm import build_vlm_chunks
    from megatron_zero.training.optimizer import OptimizerOptions, build_optimizer, wrap_ddp

    chunks = build_vlm_chunks(cfg, RuntimeOptions())
    if stage is not None:
        apply_freezing(chunks, stage)
    oopts = OptimizerOptions(use_distributed_optimizer=distributed)
    chunks = wrap_ddp(chunks, oopts)
    optimizer = build_optimizer(chunks, oopts)
    if distributed:
        ensure_optimizer_state(optimizer)
    else:  # a plain Adam's state, as after its first step
        for inner in (o.optimizer for o in getattr(optimizer, "chained_optimizers", [optimizer])):
            for group in inner.param_groups:
                for p in group["params"]:
                    inner.state[p] = {"step": torch.tensor(1.0), "exp_avg": torch.zeros_like(p),
                                      "exp_avg_sq": torch.zeros_like(p)}
    return chunks, optimizer


def measure_bytes(cfg, work: str) -> dict:
    from megatron_zero.checkpointing.training_checkpoint import save_checkpoint

    # the plain optimizer: megatron-core's distributed-optimizer formats cannot describe a stacked key (the encoder's
    # layers) of which only some layers train at DP=1
    chunks, optimizer = _build(cfg, "stage2", distributed=False)
    trainable = sum(p.numel() for c in chunks for p in c.parameters() if p.requires_grad)
    decoder = sum(p.numel() * p.element_size() for c in chunks for p in c.module.language_model.parameters())
    out = {}
    for name, only in (("trainable_only", True), ("full", False)):
        root = os.path.join(work, f"bytes_{name}")
        shutil.rmtree(root, ignore_errors=True)
        save_checkpoint(root, 1, chunks, optimizer, trainable_only=only, frozen_base={"--decoder-load": work})
        out[name] = _dir_bytes(root)
        shutil.rmtree(root, ignore_errors=True)
    return {"trainable_parameters": trainable, "decoder_bytes": decoder, "stage2_trainable_only_bytes":
            out["trainable_only"], "stage2_full_bytes": out["full"],
            "trainable_only_vs_decoder": round(out["trainable_only"] / decoder, 4),
            "trainable_only_vs_full": round(out["trainable_only"] / out["full"], 4)}


def measure_stall(cfg, work: str, reps: int, log=print) -> dict:
    """Per format of the distributed optimizer's state (``dp_reshardable``, the default, and ``fully_reshardable``,
    ``--dist-ckpt-optim-fully-reshardable``), alternating within each repetition: a synchronous save, then an
    asynchronous one; wall-clock seconds and the training process's CPU seconds (the writer processes excluded)."""
    from megatron_zero.checkpointing import training_checkpoint as tc

    chunks, optimizer = _build(cfg, None, distributed=True)  # everything trains: the largest checkpoint
    x = torch.randn(512, 512)

    def step() -> float:  # a stand-in training step: compute only, touching no checkpointed tensor
        t = time.perf_counter()
        for _ in range(8):
            x @ x
        return time.perf_counter() - t

    base_steps = [step() for _ in range(20)]
    formats = {"dp_reshardable": False, "fully_reshardable": True}
    rows = {f: {"sync": [], "sync_cpu": [], "stall": [], "stall_cpu": []} for f in formats}
    during = []
    root = os.path.join(work, "stall")
    for r in range(reps + 1):  # the first round saves each structure once (megatron-core's plan is built): not timed
        for name, fully in formats.items():
            shutil.rmtree(root, ignore_errors=True)
            w, c = time.perf_counter(), time.process_time()
            tc.save_checkpoint(root, 2 * r + 1, chunks, optimizer, fully_reshardable=fully)
            sync, sync_cpu = time.perf_counter() - w, time.process_time() - c
            w, c = time.perf_counter(), time.process_time()
            tc.save_checkpoint(root, 2 * r + 2, chunks, optimizer, async_save=True, fully_reshardable=fully)
            waited, waited_cpu = time.perf_counter() - w, time.process_time() - c
            while tc.async_save_in_flight():
                during.append(step())
                w, c = time.perf_counter(), time.process_time()
                tc.finalize_async_save()
                waited += time.perf_counter() - w
                waited_cpu += time.process_time() - c
            if r == 0:
                continue
            for k, v in (("sync", sync), ("sync_cpu", sync_cpu), ("stall", waited), ("stall_cpu", waited_cpu)):
                rows[name][k].append(v)
            log(f"rep {r}/{reps} {name}: synchronous save {sync:.2f} s, asynchronous stall {waited:.2f} s "
                f"({waited_cpu:.2f} s CPU)")
    shutil.rmtree(root, ignore_errors=True)
    mean = lambda v: sum(v) / max(len(v), 1)  # noqa: E731
    out = {"checkpoint_bytes": sum(p.numel() for c in chunks for p in c.parameters()) * (4 + BYTES_ADAM),
           "step_slowdown_during_async_write": round(mean(during) / mean(base_steps), 3) if during else None}
    for name, v in rows.items():
        out[name] = {"sync_save_s": round(mean(v["sync"]), 3), "async_stall_s": round(mean(v["stall"]), 3),
                     "stall_vs_sync": round(mean(v["stall"]) / mean(v["sync"]), 4),
                     "async_stall_cpu_s": round(mean(v["stall_cpu"]), 3),
                     "sync_save_cpu_s": round(mean(v["sync_cpu"]), 3)}
    return out


def projection(bandwidth_gbs: float) -> dict:
    """The 70B recipe, from the presets' exact parameter counts (bf16 weights, fp32 main + Adam state)."""
    from megatron_zero.models.clip_vit import get_vision_preset
    from megatron_zero.models.llama_config import get_preset

    big, clip = get_preset("llama-3.1-70b"), get_vision_preset("clip-vit-l-14-336")
    surrogate = big.num_parameters(42)
    d, f = clip.hidden_size, clip.ffn_hidden_size
    per_vit_layer = 4 * d * d + 2 * d * f + 9 * d + f  # qkv + proj + fc1 + fc2 (with biases) + 2 LayerNorms
    adapter = d * big.hidden_size + big.hidden_size ** 2 + 2 * big.hidden_size + 2 * big.hidden_size  # + start/end
    stage2_trainable = 8 * per_vit_layer + adapter + 2 * d  # top 8 layers, adapter, post-LN
    tower = clip.num_channels * clip.patch_size ** 2 * d + (clip.num_positions + 1) * d + 4 * d \
        + clip.num_layers * per_vit_layer
    encoder = tower + adapter
    full_target = big.num_parameters()
    rows = {
        # + the encoder's frozen layers: megatron-core saves the stacked layer key whole
        "stage2_trainable_only": stage2_trainable * (2 + BYTES_ADAM) + (encoder - stage2_trainable) * 2,
        "stage2_full": surrogate * 2 + encoder * 2 + stage2_trainable * BYTES_ADAM,
        "stage3_full": (full_target + stage2_trainable) * (2 + BYTES_ADAM) + (encoder - stage2_trainable) * 2,
    }
    return {"bandwidth_GB_per_s": bandwidth_gbs, "surrogate_parameters": surrogate,
            "stage2_trainable_parameters": stage2_trainable,
            **{f"{k}_GB": round(v / 1e9, 1) for k, v in rows.items()},
            **{f"{k}_s": round(v / 1e9 / bandwidth_gbs, 1) for k, v in rows.items()}}


def run(scale: int, reps: int, bandwidth_gbs: float, work: str, log=print) -> dict:
    from megatron_zero.parallel.initialize import initialize_parallel

    os.makedirs(work, exist_ok=True)
    initialize_parallel(1, 1, seed=1)
    cfg = scaled_recipe(scale)
    log(f"scaled recipe: decoder {cfg.decoder.name} ({cfg.decoder.num_parameters():,} parameters), encoder "
        f"{cfg.vision.name}")
    out = {"bytes": measure_bytes(cfg, work)}
    log(f"bytes: {out['bytes']}")
    out["stall"] = measure_stall(cfg, work, reps, log)
    out["projection_70b"] = projection(bandwidth_gbs)
    return out
