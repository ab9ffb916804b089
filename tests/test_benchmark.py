"""tools/benchmark.py runs on CPU with a tiny preset and reports consistent numbers."""
import json

from tests.conftest import run_cli


def test_benchmark_tiny_target_vs_surrogate(tmp_path):
    out_json = tmp_path / "bench.json"
    p = run_cli(["tools/benchmark.py", "--model", "tiny", "--surrogate", "1,2", "--lora-rank", "4", "--iters", "3",
                 "--warmup", "1", "--seq-length", "64", "--micro-batch-size", "2", "--global-batch-size", "4",
                 "--output-json", str(out_json)], timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    results = json.loads(out_json.read_text())
    assert [(r["model"], r["mode"]) for r in results] == [
        ("tiny", "full"), ("tiny", "frozen"), ("tiny", "lora"), ("tiny-T(1,2)", "translator"),
        ("tiny-T(1,2)", "frozen")]
    for r in results:
        assert r["forward_ms"] > 0 and r["step_s"] > 0
        # throughput is tokens of the global batch over the step time
        assert abs(r["tokens_per_s_per_device"] - 4 * 64 / r["step_s"]) < 1e-6 * r["tokens_per_s_per_device"]
    assert results[3]["layers"] == 3  # T(1,2) of a 4-layer model keeps 4 - 1 layers
    assert "lora" in p.stdout
    # the LoRA row next to full fine-tuning: the adapters' parameters only (rank 4 on q, v), timed and measured
    import dataclasses

    from megatron_zero.models.llama_config import get_preset
    from megatron_zero.models.lora import LoraConfig, num_trainable_parameters

    lora_cfg = dataclasses.replace(get_preset("tiny"), lora=LoraConfig(4, targets=("q", "v")).to_dict())
    full, lora = results[0], results[2]
    assert lora["trainable_params_this_rank"] == num_trainable_parameters(lora_cfg)
    assert lora["trainable_params_this_rank"] < full["trainable_params_this_rank"] / 10
    assert lora["step_s"] > 0 and lora["peak_memory_gb"] > 0
    # training state measured from the live tensors: full fine-tuning holds weights + gradients + Adam's two
    # moments (>= 16 bytes per trainable fp32 parameter); LoRA holds the frozen weights and the adapters' state
    n_full = full["trainable_params_this_rank"]
    assert full["model_state_gb"] * 2**30 >= 16 * n_full
    assert 4 * n_full <= lora["model_state_gb"] * 2**30 < 0.5 * full["model_state_gb"] * 2**30
    assert "state " in p.stdout
    assert "Projected training hours" in p.stdout and "baseline" in p.stdout and "ours" in p.stdout


def test_benchmark_surrogate_follows_the_library_rule():
    """T(a, b) is megatron_zero.surrogate's: the last layer is always kept, so T(1,3) of a 4-layer model is refused
    (tools/benchmark.py once had its own looser rule)."""
    p = run_cli(["tools/benchmark.py", "--model", "tiny", "--surrogate", "1,3"], timeout=300)
    assert p.returncode != 0
    assert "--surrogate 1,3" in p.stderr and "0 <= a < b < L-1 = 3" in p.stderr and "Traceback" not in p.stderr
