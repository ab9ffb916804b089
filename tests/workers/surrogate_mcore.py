"""Worker for tests/test_surrogate.py: the sharded pipeline-stage pruner (2 processes, PP=2 in and out)."""
import sys

import torch

if __name__ == "__main__":
    hf_dir, target_dir, out_dir = sys.argv[1:4]
    import torch.distributed as dist

    from megatron_zero.parallel.initialize import initialize_parallel
    from tools import build_surrogate, convert_checkpoint

    initialize_parallel(1, 2)
    convert_checkpoint.hf_to_mcore(hf_dir, target_dir, tp=1, pp=2)
    build_surrogate.main(["--load-dir", target_dir, "--save-dir", out_dir, "--translator-start", "2",
                          "--translator-end", "4", "--target-pipeline-parallel-size", "2"])
    from megatron_zero.checkpointing import mcore_checkpoint

    cfg = mcore_checkpoint.load_model_config(out_dir)
    got = dict(mcore_checkpoint.iter_llama_canonical(out_dir, cfg))
    want = dict(mcore_checkpoint.iter_llama_canonical(target_dir, mcore_checkpoint.load_model_config(target_dir)))
    ok = cfg.num_layers == 4 and cfg.surrogate["layer_map"] == [0, 1, 2, 5]
    for k, v in got.items():
        src = k
        if k.startswith("decoder.layers."):
            i, rest = k[len("decoder.layers."):].split(".", 1)
            src = f"decoder.layers.{cfg.surrogate['layer_map'][int(i)]}.{rest}"
        ok = ok and torch.equal(v, want[src])
    if dist.get_rank() == 0:
        print("SURROGATE MCORE " + ("MATCH" if ok else "MISMATCH"), flush=True)
    sys.exit(0 if ok else 1)
