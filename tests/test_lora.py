"""LoRA on the decoder: trainable-parameter formula and frozen base, TP=2 == TP=1 (in tests/test_qwen.py's
torchrun launch), merged export equal to the LoRA model, and the training CLI end to end."""
import dataclasses
import json

import pytest
import torch

from megatron_zero.checkpointing import hf_llama
from megatron_zero.checkpointing.lora_merge import merge_canonical
from megatron_zero.models.lora import LoraConfig, LoraError, is_lora_key, num_trainable_parameters
from megatron_zero.models.llama_config import get_preset
from megatron_zero.parallel import sharding


def lora_cfg(targets=("q", "k", "v", "o", "gate", "up", "down"), rank=4, preset="tiny-qwen3"):
    cfg = dataclasses.replace(get_preset(preset), vocab_size=250)
    return dataclasses.replace(cfg, lora=LoraConfig(rank, alpha=8.0, dropout=0.0, targets=targets).to_dict())


def random_canonical(cfg, seed=0):
    """Base weights and adapters (B non-zero, so the adapters change the output) for ``cfg``."""
    from tests.tiny_models import hf_model

    base = dataclasses.replace(cfg, lora=None)
    ref = hf_model(base, seed=seed)
    get = hf_llama.canonical_getter(ref.state_dict().__getitem__, base)
    g = torch.Generator().manual_seed(seed + 1)
    canonical = {}
    from megatron_zero.models.lora import target_shapes

    for k in hf_llama.canonical_keys(cfg):
        if is_lora_key(k):
            t = k.rsplit("_", 1)[1]
            shape = target_shapes(cfg, t)[0 if k.rsplit(".", 1)[1].startswith("A") else 1]
            canonical[k] = torch.randn(shape, generator=g) * 0.3
        else:
            canonical[k] = get(k)
    return canonical


def write_lora_reference(path, seed=0):
    """TP=1 logits and LoRA gradients of a tiny Qwen3 with adapters on every target, for the TP=2 comparison."""
    from tests.workers.lora_reference import lora_logits_and_grads
    from megatron_zero.parallel.initialize import initialize_parallel

    cfg = lora_cfg()
    tokens = torch.randint(0, 250, (2, 12), generator=torch.Generator().manual_seed(seed))
    ref = {"cfg": cfg.to_dict(), "canonical": random_canonical(cfg, seed), "tokens": tokens,
           "probe": torch.randn(2, 12, 250, generator=torch.Generator().manual_seed(seed + 2))}
    initialize_parallel(1, 1, seed=3)
    ref["logits"], ref["grads"] = lora_logits_and_grads(ref, tensor_parallel_size=1)
    assert all(is_lora_key(k) for k in ref["grads"]) and len(ref["grads"]) == 2 * 7 * cfg.num_layers
    torch.save(ref, path)


@pytest.fixture(scope="module")
def single_process():
    from megatron_zero.parallel.initialize import initialize_parallel

    initialize_parallel(1, 1, seed=3)
    yield


@pytest.mark.parametrize("targets,rank", [(("q", "v"), 8), (("q", "k", "v", "o", "gate", "up", "down"), 3)])
def test_trainable_parameter_count_and_frozen_base(single_process, targets, rank):
    from megatron_zero.models.llama import build_llama_model

    cfg = lora_cfg(targets, rank)
    d, f, hd, nq, nkv, L = 64, 128, cfg.head_dim, 4, 2, cfg.num_layers
    per_target = {"q": rank * (d + nq * hd), "k": rank * (d + nkv * hd), "v": rank * (d + nkv * hd),
                  "o": rank * (nq * hd + d), "gate": rank * (d + f), "up": rank * (d + f), "down": rank * (f + d)}
    expected = L * sum(per_target[t] for t in targets)
    assert num_trainable_parameters(cfg) == expected
    model = build_llama_model(cfg)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert sum(p.numel() for p in trainable.values()) == expected
    assert all("_lora." in n for n in trainable)
    # a fresh adapter (B = 0) leaves the model's function unchanged
    base = build_llama_model(dataclasses.replace(cfg, lora=None))
    base.load_state_dict({k: v for k, v in model.state_dict().items() if "_lora." not in k}, strict=False)
    tokens = torch.randint(0, 250, (1, 8))
    pos = torch.arange(8).unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens, pos, None), base(tokens, pos, None), rtol=0, atol=0)


def test_bad_lora_flags():
    with pytest.raises(LoraError, match="--lora-targets: unknown target"):
        LoraConfig(8, targets=("q", "query"))
    with pytest.raises(LoraError, match="--lora-rank must be >= 1"):
        LoraConfig(0)


@pytest.mark.parametrize("preset", ["tiny-qwen3", "tiny-qwen2", "tiny"])
def test_merged_weights_give_the_lora_logits(single_process, preset):
    """merge_canonical folds B A into the base weights: a plain model with the merged weights gives the LoRA
    model's logits, and the merged canonical tensors map to HF names (what --merge-lora exports)."""
    from megatron_zero.models.llama import build_llama_model

    cfg = lora_cfg(preset=preset)
    canonical = random_canonical(cfg, seed=7)
    lora_model = build_llama_model(cfg).eval()
    sharding.load_canonical(lora_model, canonical.__getitem__)
    merged = dict(merge_canonical(iter(canonical.items()), cfg))
    plain_cfg = dataclasses.replace(cfg, lora=None)
    assert sorted(merged) == sorted(hf_llama.canonical_keys(plain_cfg))
    plain = build_llama_model(plain_cfg).eval()
    sharding.load_canonical(plain, merged.__getitem__)
    tokens = torch.randint(0, 250, (2, 10), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(10).unsqueeze(0).expand(2, -1)
    with torch.no_grad():
        with_lora, with_merged = lora_model(tokens, pos, None), plain(tokens, pos, None)
        base_only = build_llama_model(plain_cfg).eval()
        sharding.load_canonical(base_only, canonical.__getitem__)
        assert (with_lora - base_only(tokens, pos, None)).abs().max() > 1e-2  # the adapters matter
    torch.testing.assert_close(with_merged, with_lora, rtol=1e-4, atol=1e-4)


def test_lora_training_cli_end_to_end(single_process, tmp_path):
    """What a user runs: pretrain_lm --pretrained <HF Qwen3 dir> --lora-* trains the adapters only (base frozen),
    --export-model writes the model with its adapters; convert_checkpoint refuses it without --merge-lora and with
    it writes an HF Qwen3 whose transformers logits equal the LoRA model's. The same run at TP=2 with sequence
    parallelism (torchrun) logs the TP=1 run's losses and gradient norms."""

    import transformers

    from megatron_zero.checkpointing import mcore_checkpoint
    from megatron_zero.models.llama import build_llama_model
    from tests.conftest import run_cli
    from tests.tiny_models import hf_model

    cfg = get_preset("tiny-qwen3")
    target = hf_model(cfg, seed=11)
    target.save_pretrained(tmp_path / "hf")
    save = tmp_path / "run"
    # dropout 0: sequence parallelism splits the adapters' inputs, so their dropout masks cannot match TP=1's
    args = ["-m", "megatron_zero.training.pretrain_lm", "--pretrained", str(tmp_path / "hf"), "--lora-rank", "4",
            "--lora-alpha", "8", "--lora-dropout", "0", "--lora-targets", "q,k,v,o,gate,up,down", "--mock-data",
            "--train-iters", "3", "--seq-length", "16", "--micro-batch-size", "2", "--lr", "1e-2",
            "--lr-warmup-fraction", "0"]
    train = run_cli([*args, "--save", save, "--export-model", "--metrics-file", tmp_path / "tp1.jsonl"], timeout=300)
    assert train.returncode == 0, train.stdout[-2000:] + train.stderr[-3000:]
    assert f"{num_trainable_parameters(lora_cfg()):,} trainable parameters" in train.stdout
    sp = run_cli([*args, "--tensor-model-parallel-size", "2", "--sequence-parallel", "--metrics-file",
                  tmp_path / "sp.jsonl"], nproc=2, timeout=300)
    assert sp.returncode == 0, sp.stdout[-2000:] + sp.stderr[-3000:]
    tp1, tp2 = ([json.loads(line) for line in open(tmp_path / f)] for f in ("tp1.jsonl", "sp.jsonl"))
    assert len(tp1) == len(tp2) == 3
    for a, b in zip(tp1, tp2):  # a gradient summed over the wrong ranks changes the norm by ~5% (and later losses)
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5) and a["grad_norm"] == pytest.approx(b["grad_norm"],
                                                                                                   rel=1e-5), (a, b)

    export = str(save / "export")
    lcfg = mcore_checkpoint.load_model_config(export)
    assert lcfg.lora == LoraConfig(4, 8.0, 0.0, ("q", "k", "v", "o", "gate", "up", "down")).to_dict()
    stored = dict(mcore_checkpoint.iter_llama_canonical(export, lcfg))
    original = hf_llama.canonical_getter(target.state_dict().__getitem__, cfg)
    for k, t in stored.items():  # frozen base: bit-identical; adapters: B trained away from zero
        if is_lora_key(k):
            assert not k.rsplit(".", 1)[1].startswith("B") or t.abs().max() > 0, k
        else:
            assert torch.equal(t, original(k)), k

    convert = ["tools/convert_checkpoint.py", "--source-format", "mcore", "--target-format", "hf",
               "--load-dir", export, "--save-dir", str(tmp_path / "merged")]
    refused = run_cli(convert, timeout=300)
    assert refused.returncode == 2 and "--merge-lora" in refused.stderr and "Traceback" not in refused.stderr
    merged = run_cli(convert + ["--merge-lora"], timeout=300)
    assert merged.returncode == 0, merged.stderr[-3000:]

    model = build_llama_model(lcfg).eval()
    mcore_checkpoint.load_model([model], export)
    hf = transformers.Qwen3ForCausalLM.from_pretrained(str(tmp_path / "merged"), attn_implementation="eager").eval()
    tokens = torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = model(tokens, torch.arange(12).unsqueeze(0).expand(2, -1), None)[..., : cfg.vocab_size]
        base = target(tokens).logits
        theirs = hf(tokens).logits
    assert (ours - base).abs().max() > 1e-3  # training moved the model
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)
