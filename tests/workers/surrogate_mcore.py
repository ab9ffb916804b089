"""Worker for tests/test_surrogate.py: the sharded pipeline-stage pruner (2 processes: a PP=2 target, the
surrogate re-partitioned over 2 stages of 3 + 1 layers, each rank reading only its kept layers; then a two-range
surrogate over 2 + 2)."""
import sys

import torch

if __name__ == "__main__":
    hf_dir, target_dir, out_dir = sys.argv[1:4]
    import torch.distributed as dist

    from megatron_zero.checkpointing import hf_llama, mcore_checkpoint
    from megatron_zero.parallel.initialize import initialize_parallel
    from megatron_zero.checkpointing import convert_llama
    from tools import build_surrogate

    initialize_parallel(1, 2)
    convert_llama.hf_to_mcore(hf_dir, target_dir, tp=1, pp=2)
    build_surrogate.main(["--load-dir", target_dir, "--save-dir", out_dir, "--translator-start", "2",
                          "--translator-end", "4", "--target-pipeline-parallel-size", "2",
                          "--target-pipeline-stage-layers", "3", "1"])

    cfg = mcore_checkpoint.load_model_config(out_dir)
    meta = mcore_checkpoint.read_meta(out_dir)
    got = dict(mcore_checkpoint.iter_llama_canonical(out_dir, cfg))
    want = dict(mcore_checkpoint.iter_llama_canonical(target_dir, mcore_checkpoint.load_model_config(target_dir)))
    failures = []
    if cfg.num_layers != 4 or cfg.surrogate["layer_map"] != [0, 1, 2, 5] or cfg.surrogate["translator_index"] != 2:
        failures.append(f"surrogate config {cfg.num_layers} layers, provenance {cfg.surrogate}")
    if meta["pipeline_parallel_size"] != 2 or meta["pipeline_stage_layers"] != [3, 1]:
        failures.append(f"checkpoint meta {meta}")
    if sorted(got) != sorted(hf_llama.canonical_keys(cfg)):
        failures.append(f"surrogate tensors {sorted(got)}")
    for k, v in got.items():
        src = k
        if k.startswith("decoder.layers."):
            i, rest = k[len("decoder.layers."):].split(".", 1)
            src = f"decoder.layers.{cfg.surrogate['layer_map'][int(i)]}.{rest}"
        if not torch.equal(v, want[src]):
            failures.append(f"{k} differs from the target's {src}")
    # a multi-range surrogate (the authors' translators_range with two ranges) through the same pruner
    multi_dir = out_dir + "-multi"
    build_surrogate.main(["--load-dir", target_dir, "--save-dir", multi_dir, "--translator-range", "1:2",
                          "--translator-range", "3:4", "--target-pipeline-parallel-size", "2",
                          "--target-pipeline-stage-layers", "2", "2"])
    mcfg = mcore_checkpoint.load_model_config(multi_dir)
    if mcfg.surrogate["layer_map"] != [0, 1, 3, 5] or mcfg.surrogate["translator_indices"] != [1, 2]:
        failures.append(f"multi-range provenance {mcfg.surrogate}")
    for k, v in mcore_checkpoint.iter_llama_canonical(multi_dir, mcfg):
        src = k
        if k.startswith("decoder.layers."):
            i, rest = k[len("decoder.layers."):].split(".", 1)
            src = f"decoder.layers.{mcfg.surrogate['layer_map'][int(i)]}.{rest}"
        if not torch.equal(v, want[src]):
            failures.append(f"multi-range {k} differs from the target's {src}")
    if dist.get_rank() == 0:
        print("\n".join(failures) or "SURROGATE MCORE MATCH", flush=True)
    sys.exit(1 if failures else 0)
