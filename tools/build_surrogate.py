#!/usr/bin/env python
"""Build the surrogate T(a, b) of a target LLM (paper Sec. 1.2): keep layers 0..a-1, a translator copied from
layer a, drop a+1..b, keep b+1..L-1.

    python tools/build_surrogate.py --load-dir Llama-3.1-70B-Instruct --save-dir llama-70b-T40-78 \\
        --translator-start 40 --translator-end 78
    python tools/build_surrogate.py --load-dir ... --save-dir ... --from-trajectory outputs/trajectory.json

Input: an HF Llama checkpoint directory (output: HF, streamed tensor by tensor, tokenizer files carried) or a
megatron_zero sharded checkpoint (output: sharded, re-partitioned over ``--target-pipeline-parallel-size`` stages;
only the kept layers are read). The output config records the provenance (``surrogate`` in the config) that
training (the translator index) and grafting (the target) rely on. Prints target/surrogate parameter counts and
the expected compute ratio.
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
    p.add_argument("--target-pipeline-parallel-size", type=int, default=1, help="(sharded input) output PP size")
    p.add_argument("--max-shard-size", default="5GB")
    p.add_argument("--overwrite", action="store_true")
    return p.parse_args(argv)


def resolve_span(args, num_layers: int) -> tuple[int, int]:
    a = args.translator_start
    if args.from_trajectory:
        with open(args.from_trajectory) as f:
            a_traj = int(json.load(f)["transition_layer"])
        if a is not None and a != a_traj:
            raise SystemExit(f"{PROG}: error: --translator-start {a} contradicts --from-trajectory's transition layer "
                             f"{a_traj}; give one of them")
        a = a_traj
    if a is None:
        raise SystemExit(f"{PROG}: error: give --translator-start or --from-trajectory")
    b = args.translator_end if args.translator_end is not None else num_layers - 2
    if not 0 <= a < b < num_layers:
        raise SystemExit(f"{PROG}: error: T({a},{b}) needs 0 <= --translator-start < --translator-end < "
                         f"{num_layers} (the target's layer count)")
    return a, b


def report(cfg, scfg) -> None:
    from megatron_zero.surrogate import compute_ratio

    n_t, n_s = cfg.num_parameters(), scfg.num_parameters()
    print(f"[{PROG}] target {cfg.name}: {cfg.num_layers} layers, {n_t / 1e9:.3f}B parameters")
    print(f"[{PROG}] surrogate {scfg.name}: {scfg.num_layers} layers, {n_s / 1e9:.3f}B parameters "
          f"({100 * n_s / n_t:.1f}% of the target); decoder compute per token: {100 * compute_ratio(cfg, scfg):.1f}% "
          f"of the target's")
    print(f"[{PROG}] stage 1 trains layers {scfg.surrogate['stage1_trainable_layers']} (translator at "
          f"{scfg.surrogate['translator_index']})")


def build_hf(args) -> None:
    from tqdm import tqdm

    from megatron_zero.checkpointing import hf_llama
    from megatron_zero.checkpointing.hf_reader import HFCheckpoint
    from megatron_zero.checkpointing.hf_writer import (ShardedSafetensorsWriter, atomic_directory, check_save_dir,
                                                       copy_tokenizer_files, parse_size, write_config)
    from megatron_zero.models.llama_config import LlamaConfig
    from megatron_zero.surrogate import iter_surrogate, surrogate_config

    check_save_dir(args.save_dir, args.overwrite)
    reader = HFCheckpoint(args.load_dir)
    cfg = LlamaConfig.from_hf_config(reader.config, name=os.path.basename(os.path.normpath(args.load_dir)))
    a, b = resolve_span(args, cfg.num_layers)
    scfg = surrogate_config(cfg, a, b, os.path.abspath(args.load_dir), args.control_unfreeze_early)
    report(cfg, scfg)
    keys = hf_llama.canonical_keys(scfg)
    getter = hf_llama.canonical_getter(reader.get, cfg)
    with atomic_directory(args.save_dir, args.overwrite) as tmp:
        writer = ShardedSafetensorsWriter(tmp, parse_size(args.max_shard_size), log=lambda m: print(f"[{PROG}] {m}"))
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
    """Sharded -> sharded, the pipeline-stage pruner: dropped layers are never read, and the surrogate is
    re-partitioned over ``--target-pipeline-parallel-size`` stages. Run under torchrun with that many processes;
    each keeps only its own stage's tensors (the reads are collective, one layer at a time)."""
    import torch.distributed as dist

    from megatron_zero.checkpointing import mcore_checkpoint
    from megatron_zero.models.llama import RuntimeOptions, build_llama_model
    from megatron_zero.parallel import sharding
    from megatron_zero.parallel.initialize import initialize_parallel
    from megatron_zero.surrogate import surrogate_config, surrogate_key

    cfg = mcore_checkpoint.load_model_config(args.load_dir)
    a, b = resolve_span(args, cfg.num_layers)
    scfg = surrogate_config(cfg, a, b, os.path.abspath(args.load_dir), args.control_unfreeze_early)
    pp = args.target_pipeline_parallel_size
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != pp:
        raise SystemExit(f"{PROG}: error: run under torchrun with --nproc-per-node {pp} (= "
                         f"--target-pipeline-parallel-size); this launch has {world} process(es)")
    initialize_parallel(1, pp)
    if dist.get_rank() == 0:
        report(cfg, scfg)
    model = build_llama_model(scfg, RuntimeOptions(pipeline_model_parallel_size=pp))
    mapping = scfg.surrogate["layer_map"]
    mine = {surrogate_key(sharding.canonical_key(k, sharding.layer_index_map(model)), mapping)
            for k in model.state_dict() if not k.endswith("_extra_state")}
    target = {}
    for ckey, t in mcore_checkpoint.iter_llama_canonical(args.load_dir, cfg, layers=sorted(set(mapping))):
        if ckey in mine or (scfg.tie_word_embeddings and ckey == "embedding.word_embeddings.weight"):
            target[ckey] = t
    sharding.load_canonical(model, lambda k: target[surrogate_key(k, mapping)], source=args.load_dir)
    mcore_checkpoint.save_model([model], args.save_dir, scfg, overwrite=args.overwrite, copy_files_from=args.load_dir)
    print(f"[{PROG}] wrote {args.save_dir} (PP={pp})")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    from megatron_zero.checkpointing.hf_reader import CheckpointFormatError
    from megatron_zero.checkpointing.hf_writer import SaveDirError

    try:
        if os.path.isfile(os.path.join(args.load_dir, "config.json")):
            build_hf(args)
        elif os.path.isfile(os.path.join(args.load_dir, "checkpoint_meta.json")):
            build_mcore(args)
        else:
            raise SystemExit(f"{PROG}: error: --load-dir {args.load_dir}: neither an HF checkpoint (config.json) "
                             f"nor a megatron_zero checkpoint (checkpoint_meta.json)")
    except (CheckpointFormatError, SaveDirError, ValueError, KeyError) as e:
        raise SystemExit(f"{PROG}: error: {e}") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
