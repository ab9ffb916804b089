"""Cost planner (``tools/benchmark.py --project-only``): each training stage's hours on a cluster, from the FLOP model
and the paper's data sizes, without a GPU; printed beside the paper's Table 9.

Stages (the paper's Table 9 columns; data sizes from its Table A.4, trainable parts from Table A.4 and Sec. A.9):

==========  ===========  =============================================  ==========================================
method      stage        decoder (trained layers)                       data
==========  ===========  =============================================  ==========================================
baseline    pre.         target, frozen (the adapter trains)            LLaVA-1.5-665K
baseline    ft. enc.     --                                             none
baseline    ft. dec.     target, every layer; encoder's last 8 layers   LLaVA-1.5-665K
ours        pre.         surrogate T(a, b), its translator              GenQA-500K (text) + LLaVA-1.5-665K
ours        ft. enc.     surrogate, frozen; encoder's last 8 layers     LLaVA-1.5-665K
ours        ft. dec.     target, every layer; encoder's last 8 layers   20% of LLaVA-1.5-665K (Table 8's choice)
==========  ===========  =============================================  ==========================================

FLOPs per sample: :func:`megatron_zero.training.flops.decoder_training_flops` at the mean decoder length of a
sample (frozen layers at 2x forward, trained ones at 3x) plus, per image,
:func:`~megatron_zero.training.flops.vit_flops_per_image` (frozen encoder layers forward only). The adapter,
norms and the loss are not counted (< 0.1%). Hours = FLOPs / (GPUs x peak x MFU). The mean lengths are
assumptions (flags): 850 positions per image sample is the mean of the LLaVA-1.5-shaped length mix of
``tools/benchmark_packing.py`` with 579 image positions; GenQA's text samples are assumed as long as that mix's
text-only samples (1180).

Next to the projection: the paper's hours (128 A100-80G), the MFU at which the projection meets them on the given
cluster, and what the surrogate saves (stage 2 on the surrogate instead of the target, and the whole method).
"""
from __future__ import annotations

import dataclasses
import json
from typing import Optional

from megatron_zero.errors import UserError

PAPER_GPUS = 128
PAPER_GPU = "A100"
PAPER_HOURS = {  # Table 9: Llama-3.1-70B, 128 A100-80G; pre., ft. enc., ft. dec.
    "baseline": (7.01, 0.0, 27.88),
    "ours": (9.36, 4.25, 5.56),
}
PAPER_TOTALS = {"baseline": 34.79, "ours": 19.17}  # as Table 9 prints them (its baseline stages sum to 34.89)
STAGES = ("pre.", "ft. enc.", "ft. dec.")


class PlannerError(UserError, ValueError):
    """Planner settings that cannot give a projection."""


@dataclasses.dataclass
class PlanInputs:
    target: object  # LlamaConfig
    surrogate: object  # LlamaConfig of T(a, b)
    vision: object  # ClipVisionConfig
    num_gpus: int
    peak_tflops: float
    mfu: float
    vl_samples: int = 665_000  # LLaVA-1.5-665K (stages 2, 3 and both pre-trainings)
    text_samples_stage1: int = 500_000  # GenQA-500K (ours, stage 1)
    decoder_data_fraction: float = 0.2  # ours, stage 3
    vl_tokens: float = 850.0
    text_tokens: float = 1180.0
    encoder_trainable_layers: int = 8
    image_positions: int | None = None  # default: the encoder's (577 for ViT-L/14-336)

    def validate(self) -> None:
        if not 0 < self.mfu <= 1:
            raise PlannerError(f"--mfu {self.mfu}: must be in (0, 1]")
        if self.num_gpus < 1:
            raise PlannerError(f"--num-gpus-projection {self.num_gpus}: must be >= 1")
        if not self.peak_tflops > 0:
            raise PlannerError(f"--peak-tflops {self.peak_tflops}: must be > 0")
        if not 0 < self.decoder_data_fraction <= 1:
            raise PlannerError(f"--decoder-data-fraction {self.decoder_data_fraction}: must be in (0, 1]")
        if not 0 <= self.encoder_trainable_layers <= self.vision.num_layers:
            raise PlannerError(f"--encoder-trainable-layers {self.encoder_trainable_layers}: must be in "
                               f"[0, {self.vision.num_layers}]")


@dataclasses.dataclass
class Stage:
    method: str
    name: str
    decoder: object | None  # LlamaConfig, None: no such stage
    decoder_trainable_layers: int
    encoder_trainable_layers: int
    vl_samples: int
    text_samples: int


def stages(p: PlanInputs) -> list[Stage]:
    t, s, enc = p.target, p.surrogate, p.encoder_trainable_layers
    translators = len(s.surrogate["translator_indices"])
    return [
        Stage("baseline", "pre.", t, 0, 0, p.vl_samples, 0),
        Stage("baseline", "ft. enc.", None, 0, 0, 0, 0),
        Stage("baseline", "ft. dec.", t, t.num_layers, enc, p.vl_samples, 0),
        Stage("ours", "pre.", s, translators, 0, p.vl_samples, p.text_samples_stage1),
        Stage("ours", "ft. enc.", s, 0, enc, p.vl_samples, 0),
        Stage("ours", "ft. dec.", t, t.num_layers, enc, round(p.vl_samples * p.decoder_data_fraction), 0),
    ]


def stage_flops(p: PlanInputs, st: Stage) -> float:
    """Training FLOPs of one stage: every sample once (one epoch, Table A.4)."""
    from megatron_zero.training.flops import decoder_training_flops, vit_flops_per_image

    if st.decoder is None:
        return 0.0
    v = p.vision
    per_vl = decoder_training_flops(st.decoder, 1, round(p.vl_tokens), st.decoder_trainable_layers)
    per_vl += vit_flops_per_image(v.num_layers, v.hidden_size, v.ffn_hidden_size,
                                  p.image_positions or v.num_positions, st.encoder_trainable_layers)
    per_text = decoder_training_flops(st.decoder, 1, round(p.text_tokens), st.decoder_trainable_layers)
    return st.vl_samples * per_vl + st.text_samples * per_text


def hours(flops: float, num_gpus: int, peak_tflops: float, mfu: float) -> float:
    return flops / (num_gpus * peak_tflops * 1e12 * mfu) / 3600


def plan(p: PlanInputs) -> dict:
    """Per stage: FLOPs, projected hours, the paper's hours and the MFU that meets them; totals; the savings."""
    p.validate()
    rows = []
    for st in stages(p):
        f = stage_flops(p, st)
        paper = PAPER_HOURS[st.method][STAGES.index(st.name)]
        rows.append({"method": st.method, "stage": st.name, "decoder": st.decoder.name if st.decoder else None,
                     "decoder_layers": st.decoder.num_layers if st.decoder else 0,
                     "decoder_trainable_layers": st.decoder_trainable_layers,
                     "encoder_trainable_layers": st.encoder_trainable_layers, "vl_samples": st.vl_samples,
                     "text_samples": st.text_samples, "flops": f,
                     "hours": hours(f, p.num_gpus, p.peak_tflops, p.mfu), "paper_hours": paper,
                     "mfu_to_meet_paper": f / (p.num_gpus * p.peak_tflops * 1e12 * paper * 3600) if paper else None})
    totals = {}
    for method in PAPER_HOURS:
        f = sum(r["flops"] for r in rows if r["method"] == method)
        paper = PAPER_TOTALS[method]
        totals[method] = {"flops": f, "hours": hours(f, p.num_gpus, p.peak_tflops, p.mfu), "paper_hours": paper,
                          "mfu_to_meet_paper": f / (p.num_gpus * p.peak_tflops * 1e12 * paper * 3600)}
    # stage 2 on the full target instead of the surrogate: what the surrogate itself saves
    on_target = Stage("ours", "ft. enc.", p.target, 0, p.encoder_trainable_layers, p.vl_samples, 0)
    enc_target_h = hours(stage_flops(p, on_target), p.num_gpus, p.peak_tflops, p.mfu)
    enc_surrogate_h = next(r["hours"] for r in rows if r["method"] == "ours" and r["stage"] == "ft. enc.")
    b, o = totals["baseline"], totals["ours"]
    savings = {"hours": b["hours"] - o["hours"], "fraction": 1 - o["hours"] / b["hours"],
               "paper_fraction": 1 - o["paper_hours"] / b["paper_hours"],
               "stage2_on_target_hours": enc_target_h, "stage2_on_surrogate_hours": enc_surrogate_h,
               "stage2_fraction": 1 - enc_surrogate_h / enc_target_h}
    return {"inputs": {"target": p.target.name, "surrogate": p.surrogate.name, "vision": p.vision.name,
                       "num_gpus": p.num_gpus, "peak_tflops": p.peak_tflops, "mfu": p.mfu,
                       "vl_tokens": p.vl_tokens, "text_tokens": p.text_tokens,
                       "decoder_data_fraction": p.decoder_data_fraction,
                       "encoder_trainable_layers": p.encoder_trainable_layers},
            "stages": rows, "totals": totals, "savings": savings}


def format_plan(result: dict, gpu_label: str, mfu_source: str) -> str:
    i, s = result["inputs"], result["savings"]
    lines = [
        f"Projected training hours: {i['target']} with surrogate {i['surrogate']}, {i['vision']} (last "
        f"{i['encoder_trainable_layers']} layers trained in ft. enc./ft. dec.)",
        f"on {i['num_gpus']} x {gpu_label} ({i['peak_tflops']:.1f} TFLOP/s bf16 dense) at MFU {100 * i['mfu']:.1f}% "
        f"({mfu_source}); FLOP model: Megatron-LM convention, frozen layers 2x forward; one epoch of Table A.4's data; "
        f"mean {i['vl_tokens']:.0f} positions per image sample, {i['text_tokens']:.0f} per text sample",
        "",
        f"{'method':9s} {'stage':9s} {'decoder':22s} {'samples':>9s} {'EFLOP':>8s} {'projected h':>12s} "
        f"{'paper h':>8s} {'MFU to meet paper':>18s}",
    ]
    for r in result["stages"]:
        samples = r["vl_samples"] + r["text_samples"]
        mfu = f"{100 * r['mfu_to_meet_paper']:.1f}%" if r["mfu_to_meet_paper"] is not None else "-"
        lines.append(f"{r['method']:9s} {r['stage']:9s} {r['decoder'] or '-':22s} {samples:9d} "
                     f"{r['flops'] / 1e18:8.1f} {r['hours']:12.2f} {r['paper_hours']:8.2f} {mfu:>18s}")
    lines.append("")
    lines.append(f"{'method':9s} {'# gpu':>6s} {'pre.':>7s} {'ft. enc.':>9s} {'ft. dec.':>9s} {'total hours':>12s}   "
                 f"(projected | paper's Table 9, {PAPER_GPUS} {PAPER_GPU}-80G)")
    for method in PAPER_HOURS:
        mine = [r["hours"] for r in result["stages"] if r["method"] == method]
        paper = PAPER_HOURS[method]
        lines.append(f"{method:9s} {i['num_gpus']:6d} " + " ".join(f"{h:{w}.2f}" for h, w in zip(mine, (7, 9, 9), strict=True))
                     + f" {sum(mine):12.2f}   | {PAPER_GPUS} " + " + ".join(f"{h:.2f}" for h in paper)
                     + f" = {PAPER_TOTALS[method]:.2f}"
                     + (f" (as printed; the stages sum to {sum(paper):.2f})"
                        if abs(sum(paper) - PAPER_TOTALS[method]) > 0.005 else ""))
    t = result["totals"]
    lines += [
        "",
        f"cost reduction (ours vs baseline): projected {100 * s['fraction']:.1f}% ({s['hours']:.2f} h saved), "
        f"paper {100 * s['paper_fraction']:.1f}%",
        f"MFU at which the projection meets the paper's total hours on this cluster: baseline "
        f"{100 * t['baseline']['mfu_to_meet_paper']:.1f}%, ours {100 * t['ours']['mfu_to_meet_paper']:.1f}%",
        f"the surrogate saves in ft. enc.: {s['stage2_on_surrogate_hours']:.2f} h on the surrogate vs "
        f"{s['stage2_on_target_hours']:.2f} h on the full target ({100 * s['stage2_fraction']:.1f}% less); "
        f"the rest of the saving is ft. dec. on {100 * i['decoder_data_fraction']:.0f}% of the data",
    ]
    return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class ProjectionRequest:
    """What ``tools/benchmark.py --project-only`` is asked (its flags; ``None``: the paper's setting)."""

    model: Optional[str] = None  # default llama-3.1-70b
    surrogate: Optional[str] = None  # translator span "a,b", default 40,78
    gpu_type: Optional[str] = None  # default A100
    peak_tflops: Optional[float] = None  # default: the gpu type's datasheet peak
    mfu: float = 0.40
    mfu_from: Optional[str] = None  # a gpu_check.json whose measured MFU replaces ``mfu``
    vision: str = "clip-vit-l-14-336"
    num_gpus_projection: int = 128
    vl_samples: int = 665_000
    text_samples: int = 500_000
    decoder_data_fraction: float = 0.2
    vl_tokens: float = 850.0
    text_tokens: float = 1180.0
    encoder_trainable_layers: int = 8
    output_json: Optional[str] = None


def project(req: ProjectionRequest) -> dict:
    """``tools/benchmark.py --project-only``: plan, print the table (and write ``output_json``)."""
    from megatron_zero.models.clip_vit import get_vision_preset
    from megatron_zero.models.llama_config import load_model_config
    from megatron_zero.surrogate import surrogate_config
    from megatron_zero.training.flops import PEAK_TFLOPS
    from megatron_zero_dev.benchmark import parse_span

    gpu = req.gpu_type or "A100"
    if req.peak_tflops is None and gpu not in PEAK_TFLOPS:
        raise PlannerError(f"--gpu-type {gpu}: unknown; choose from {', '.join(PEAK_TFLOPS)} or give --peak-tflops")
    peak = req.peak_tflops or PEAK_TFLOPS[gpu]
    mfu, source = req.mfu, "assumed"
    if req.mfu_from:
        mfu, source = measured_mfu(req.mfu_from)
    cfg = load_model_config(req.model or "llama-3.1-70b")
    try:
        scfg = surrogate_config(cfg, *parse_span(req.surrogate or "40,78"))
    except ValueError as e:
        raise PlannerError(f"--surrogate {req.surrogate}: {e}") from None
    result = plan(PlanInputs(cfg, scfg, get_vision_preset(req.vision), req.num_gpus_projection, peak, mfu,
                             req.vl_samples, req.text_samples, req.decoder_data_fraction, req.vl_tokens,
                             req.text_tokens, req.encoder_trainable_layers))
    print(format_plan(result, gpu if req.peak_tflops is None else "GPU", source))
    if req.output_json:
        with open(req.output_json, "w") as f:
            json.dump(result, f, indent=2)
    return result


def measured_mfu(path: str) -> tuple[float, str]:
    """bf16 MFU (datasheet peak) of a GPU check's throughput_bf16 record, and a description of it."""
    try:
        with open(path) as f:
            result = json.load(f)
        rec = next(r for r in result["checks"] if r["check"] == "throughput_bf16")
        mfu = rec["metrics"]["mfu_datasheet"]
    except (OSError, ValueError, KeyError, StopIteration) as e:
        raise PlannerError(f"--mfu-from {path}: no throughput_bf16 MFU in it ({type(e).__name__}: {e})") from None
    if not mfu:
        raise PlannerError(f"--mfu-from {path}: throughput_bf16 has no datasheet MFU (status {rec['status']})")
    return mfu, f"measured on {result['device']}, {result['started']}"
