#!/usr/bin/env python
"""Build the surrogate T(a, b) of a target LLM (paper Sec. 1.2): keep layers 0..a-1, a translator copied from
layer a, drop a+1..b, keep b+1..L-1.

    python tools/build_surrogate.py --load-dir Llama-3.1-70B-Instruct --save-dir llama-70b-T40-78 \\
        --translator-start 40 --translator-end 78
    python tools/build_surrogate.py --load-dir ... --save-dir ... --from-trajectory outputs/trajectory.json

``--from-trajectory`` takes ``a`` from ``tools/analyze_trajectory.py``'s ``trajectory.json``; ``b`` defaults to L-2.

Input: an HF Llama checkpoint directory (output: an HF checkpoint ``transformers`` loads, streamed tensor by
tensor with the layer indices renamed, the target's dtype and tokenizer files kept; one process) or a
megatron_zero sharded ``torch_dist`` checkpoint (output: sharded, the *pipeline-stage pruner*)::

    torchrun --nproc-per-node 4 tools/build_surrogate.py --load-dir ckpt-70b-pp8 --save-dir ckpt-T40-78 \
        --translator-start 40 --target-pipeline-parallel-size 4 [--target-pipeline-stage-layers 12 10 10 10]

where the surrogate is built directly over the fewer stages and each rank reads only the pieces of the kept layers
it holds. The output config records the provenance (``LlamaConfig.surrogate``: target, a, b, translator index,
layer map, architecture/tokenizer hashes, the layers stage 1 trains) that training and grafting rely on. Prints
target/surrogate parameter counts and the expected compute ratio.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PROG = "build_surrogate"


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load-dir", required=True, help="target checkpoint (HF Llama dir or megatron_zero checkpoint)")
    p.add_argument("--save-dir", required=True)
    p.add_argument("--translator-start", type=int, default=None, help="a: the translator is a copy of layer a")
    p.add_argument("--translator-end", type=int, default=None, help="b: layers a+1..b are dropped (default L-2)")
    p.add_argument("--from-trajectory", default=None, help="trajectory.json: a = its transition layer")
    p.add_argument("--control-unfreeze-early", action="store_true",
                   help="record the T* control: stage 1 also trains every other layer before the translator")
    p.add_argument("--max-shard-size", default="5GB", help="(HF output) safetensors shard size")
    p.add_argument("--overwrite", action="store_true")
    g = p.add_argument_group("sharded (torch_dist) input; run under torchrun with TP x PP processes")
    g.add_argument("--target-pipeline-parallel-size", type=int, default=None,
                   help="pipeline stages the surrogate is partitioned over (default 1)")
    g.add_argument("--target-pipeline-stage-layers", type=int, nargs="+", default=None,
                   help="surrogate layers per stage, e.g. 22 20 (default: even split)")
    g.add_argument("--tensor-model-parallel-size", type=int, default=None,
                   help="TP of the build processes (splits the reads; the output is layout-independent)")
    return p.parse_args(argv)


def read_transition(path: str, num_layers: int) -> int:
    """The transition layer of a ``trajectory.json`` written by ``tools/analyze_trajectory.py`` for this target."""
    try:
        with open(path) as f:
            traj = json.load(f)
        a = int(traj["transition_layer"])
    except FileNotFoundError:
        raise SystemExit(f"{PROG}: error: --from-trajectory {path}: no such file") from None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise SystemExit(f"{PROG}: error: --from-trajectory {path}: not a trajectory.json with a transition_layer "
                         f"({type(e).__name__}: {e})") from None
    analysed = traj.get("num_layers")
    if analysed is not None and analysed != num_layers:
        raise SystemExit(f"{PROG}: error: --from-trajectory {path} analysed a {analysed}-layer model, but the "
                         f"target --load-dir has {num_layers} layers")
    return a


def resolve_span(args, num_layers: int) -> tuple[int, int]:
    """(a, b): ``--translator-start`` or the trajectory's transition layer; ``--translator-end`` or L-2."""
    a = args.translator_start
    if args.from_trajectory:
        a_traj = read_transition(args.from_trajectory, num_layers)
        if a is not None and a != a_traj:
            raise SystemExit(f"{PROG}: error: --translator-start {a} contradicts --from-trajectory's transition layer "
                             f"{a_traj}; give one of them")
        a = a_traj
    if a is None:
        raise SystemExit(f"{PROG}: error: give --translator-start or --from-trajectory")
    b = args.translator_end if args.translator_end is not None else num_layers - 2
    if not 0 <= a < b < num_layers - 1:
        a_src = (f"--from-trajectory {args.from_trajectory} detected transition layer {a}" if args.from_trajectory
                 else f"--translator-start {a}")
        b_src = (f"--translator-end {b}" if args.translator_end is not None
                 else f"the default end L-2 = {b}")
        hint_a = min(max(a, 0), max(num_layers - 3, 0))
        hint = (f"; e.g. --translator-start {hint_a} --translator-end {num_layers - 2}" if num_layers >= 3
                else "; the target has too few layers for a surrogate")
        raise SystemExit(f"{PROG}: error: {a_src} and {b_src} leave no layer to drop: T(a,b) drops layers a+1..b and "
                         f"needs 0 <= a < b < L-1 = {num_layers - 1} (the target has {num_layers} layers; its last "
                         f"one is kept){hint}")
    return a, b


def report(cfg, scfg) -> None:
    from megatron_zero.surrogate import compute_ratio

    n_t, n_s = cfg.num_parameters(), scfg.num_parameters()
    print(f"[{PROG}] target {cfg.name}: {cfg.num_layers} layers, {n_t:,} parameters ({n_t / 1e9:.2f}B)")
    print(f"[{PROG}] surrogate {scfg.name}: {scfg.num_layers} layers (target layers "
          f"{compact(scfg.surrogate['layer_map'])}), {n_s:,} parameters ({n_s / 1e9:.2f}B, {100 * n_s / n_t:.1f}% "
          f"of the target); decoder compute per token: {100 * compute_ratio(cfg, scfg):.1f}% of the target's")
    print(f"[{PROG}] stage 1 trains layers {scfg.surrogate['stage1_trainable_layers']} (translator at "
          f"{scfg.surrogate['translator_index']})")


def compact(layers: list[int]) -> str:
    """[0, 1, 2, 5, 6] -> '0-2, 5-6'."""
    runs, start = [], layers[0]
    for prev, cur in zip(layers, layers[1:] + [None]):
        if cur != prev + 1:
            runs.append(f"{start}-{prev}" if prev != start else str(start))
            start = cur
    return ", ".join(runs)


def provenance_extra(load_dir: str) -> dict:
    from megatron_zero.checkpointing.vlm_checkpoint import tokenizer_hash

    return {"tokenizer_sha256": tokenizer_hash(load_dir)}


def build_hf(args) -> None:
    """HF -> HF in one process, streamed tensor by tensor (layer indices renamed), tokenizer files carried."""
    from tqdm import tqdm

    from megatron_zero.checkpointing import hf_llama
    from megatron_zero.checkpointing.hf_reader import HFCheckpoint
    from megatron_zero.checkpointing.hf_writer import (
        ShardedSafetensorsWriter,
        atomic_directory,
        check_save_dir,
        copy_tokenizer_files,
        parse_size,
        write_config,
    )
    from megatron_zero.models.llama_config import LlamaConfig
    from megatron_zero.surrogate import iter_surrogate, surrogate_config, surrogate_key

    for flag in ("target_pipeline_parallel_size", "target_pipeline_stage_layers", "tensor_model_parallel_size"):
        if getattr(args, flag) is not None:
            raise SystemExit(f"{PROG}: error: --{flag.replace('_', '-')} is for sharded (torch_dist) targets; "
                             f"--load-dir {args.load_dir} is an HF checkpoint, which gives an HF surrogate")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise SystemExit(f"{PROG}: error: an HF surrogate is built by one process; do not launch it with torchrun")
    max_shard = parse_size(args.max_shard_size)
    check_save_dir(args.save_dir, args.overwrite)
    reader = HFCheckpoint(args.load_dir)
    cfg = LlamaConfig.from_hf_config(reader.config, name=os.path.basename(os.path.normpath(args.load_dir)))
    a, b = resolve_span(args, cfg.num_layers)
    scfg = surrogate_config(cfg, a, b, os.path.abspath(args.load_dir), args.control_unfreeze_early,
                            provenance_extra(args.load_dir))
    keys = hf_llama.canonical_keys(scfg)
    mapping = scfg.surrogate["layer_map"]
    reader.validate([n for k in keys for n in hf_llama.hf_sources(surrogate_key(k, mapping))])  # before writing
    report(cfg, scfg)
    getter = hf_llama.canonical_getter(reader.get, cfg)
    with atomic_directory(args.save_dir, args.overwrite) as tmp:
        writer = ShardedSafetensorsWriter(tmp, max_shard, log=lambda m: print(f"[{PROG}] {m}"))
        for ckey, tensor in tqdm(iter_surrogate(getter, scfg), total=len(keys), desc="surrogate tensors",
                                 unit="tensor", file=sys.stdout):
            for name, t in hf_llama.from_canonical(ckey, tensor, scfg).items():
                writer.add(name, t)
        writer.close()
        copy_tokenizer_files(args.load_dir, tmp)
        hf = scfg.to_hf_config()
        for key in ("torch_dtype", "dtype"):  # the tensors are copied unchanged: keep the target's dtype
            if key in reader.config:
                hf[key] = reader.config[key]
        write_config(tmp, hf)
    print(f"[{PROG}] wrote {args.save_dir}")


def build_mcore(args) -> None:
    """Sharded -> sharded, the pipeline-stage pruner: the surrogate is built over ``--target-pipeline-parallel-size``
    stages (x ``--tensor-model-parallel-size``), and each rank reads from the target checkpoint only the pieces of
    the kept layers it holds (its stage's layers, its TP slice); dropped layers are never read. Tensors keep the
    target's dtype, so kept layers are bit-identical."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    from megatron_zero.checkpointing import mcore_checkpoint
    from megatron_zero.models.llama import ModelConfigError, RuntimeOptions, build_llama_model, validate
    from megatron_zero.parallel.initialize import ParallelConfigError, initialize_parallel
    from megatron_zero.surrogate import load_surrogate_from_sharded, surrogate_config

    cfg = mcore_checkpoint.load_model_config(args.load_dir)
    a, b = resolve_span(args, cfg.num_layers)
    scfg = surrogate_config(cfg, a, b, os.path.abspath(args.load_dir), args.control_unfreeze_early,
                            provenance_extra(args.load_dir))
    tp, pp = args.tensor_model_parallel_size or 1, args.target_pipeline_parallel_size or 1
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != tp * pp:
        raise SystemExit(f"{PROG}: error: run under torchrun with --nproc-per-node {tp * pp} (= "
                         f"--tensor-model-parallel-size {tp} x --target-pipeline-parallel-size {pp}); this launch "
                         f"has {world} process(es)")
    stored = dist_checkpointing.load_tensors_metadata(args.load_dir)
    dtype = stored["embedding.word_embeddings.weight"].dtype
    opts = RuntimeOptions(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                          pipeline_stage_layers=args.target_pipeline_stage_layers, params_dtype=dtype,
                          initialize_weights=False)
    try:
        stage_layers = validate(scfg, opts)
        initialize_parallel(tp, pp)
    except (ModelConfigError, ParallelConfigError) as e:
        raise SystemExit(f"{PROG}: error: {e}") from None
    if dist.get_rank() == 0:
        report(cfg, scfg)
        print(f"[{PROG}] surrogate layers per pipeline stage: {stage_layers}")
    model = build_llama_model(scfg, opts)
    load_surrogate_from_sharded(model, args.load_dir, cfg, scfg.surrogate["layer_map"])
    mcore_checkpoint.save_model([model], args.save_dir, scfg, overwrite=args.overwrite, copy_files_from=args.load_dir,
                                extra_meta={"pipeline_stage_layers": stage_layers})
    if dist.get_rank() == 0:
        print(f"[{PROG}] wrote {args.save_dir} (PP={pp}, stages {stage_layers})")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    from megatron_zero.checkpointing.hf_reader import CheckpointFormatError
    from megatron_zero.checkpointing.hf_writer import SaveDirError
    from megatron_zero.checkpointing.mcore_checkpoint import CheckpointError

    hf = os.path.isfile(os.path.join(args.load_dir, "config.json"))
    sharded = os.path.isfile(os.path.join(args.load_dir, "checkpoint_meta.json"))
    try:
        if hf and sharded:
            raise SystemExit(f"{PROG}: error: --load-dir {args.load_dir} holds both an HF config.json and a "
                             f"megatron_zero checkpoint_meta.json; point it at one checkpoint")
        if hf:
            build_hf(args)
        elif sharded:
            build_mcore(args)
        else:
            raise SystemExit(f"{PROG}: error: --load-dir {args.load_dir}: neither an HF checkpoint (config.json) "
                             f"nor a megatron_zero checkpoint (checkpoint_meta.json)")
    except (CheckpointFormatError, CheckpointError, SaveDirError, ValueError, KeyError) as e:
        raise SystemExit(f"{PROG}: error: {e}") from None
    return 0


if __name__ == "__main__":
    from megatron_zero.errors import run_main

    run_main(main)
