"""Trainable-only checkpoints (issue 23), through the CLI: a LoRA run (base frozen) saves the adapters + optimizer
state only and references its base; resume is exact; a changed or missing base is refused in one line naming it;
the resolver reads the run (base + trainable) as the run's own export holds it."""
import shutil

import pytest
import torch

from tests.test_reliability import metrics, ok, run, single

LORA = ["-m", "megatron_zero.training.pretrain_lm", "--lora-rank", "4", "--lora-alpha", "8", "--lora-dropout", "0",
        "--lora-targets", "q,v", "--mock-data", "--train-iters", "4", "--seq-length", "16", "--micro-batch-size", "2",
        "--lr", "1e-2", "--lr-warmup-fraction", "0", "--use-distributed-optimizer"]


def test_lora_run_saves_what_trains_and_resumes_from_its_base(tmp_path):
    from torch.distributed.checkpoint import FileSystemReader

    from megatron_zero.checkpointing import run_dir
    from megatron_zero.models.llama_config import get_preset
    from tests.tiny_models import hf_model

    base = tmp_path / "hf"
    hf_model(get_preset("tiny-qwen3"), seed=11).save_pretrained(base)
    args = single() + LORA + ["--pretrained", str(base)]
    ref = tmp_path / "ref.jsonl"
    ok(args + ["--metrics-file", str(ref)])
    want = {m["iteration"]: m["loss"] for m in metrics(ref)}

    save, got = tmp_path / "run", tmp_path / "got.jsonl"
    common = ["--save", str(save), "--load", str(save), "--metrics-file", str(got)]
    ok(args + common + ["--exit-after-iters", "2"])
    path = run_dir.iter_dir(str(save), 2)
    manifest = run_dir.read_manifest(path)
    assert manifest["frozen_base"]["path"] == {"--pretrained": str(base)}
    assert manifest["frozen_base"]["architecture_hash"] and manifest["frozen_base"]["tensors"]
    saved = [k for k in FileSystemReader(path).read_metadata().state_dict_metadata
             if not k.startswith("optimizer") and "_extra_state" not in k]
    assert saved and all("lora" in k for k in saved if k.startswith("decoder") or k.startswith("embedding")), saved

    # the base changed under the run: refused in one line naming it, nothing trained
    shutil.move(base, tmp_path / "hf_orig")
    hf_model(get_preset("tiny-qwen3"), seed=12).save_pretrained(base)
    rc, out, err = run(args + common)
    assert rc == 2 and "Traceback" not in err, (out + err)[-3000:]
    assert "frozen base --pretrained " + str(base) in err and "frozen tensors differ" in err, err[-2000:]
    shutil.rmtree(base)
    rc, out, err = run(args + common)
    assert rc == 2 and "Traceback" not in err and str(base) in err.strip().splitlines()[-1], (out + err)[-3000:]
    shutil.move(tmp_path / "hf_orig", base)

    ok(args + common + ["--export-model"])
    losses = {m["iteration"]: m["loss"] for m in metrics(got)}
    assert sorted(losses) == [1, 2, 3, 4]
    for it, loss in losses.items():
        assert loss == pytest.approx(want[it], abs=1e-6), (it, loss, want[it])

    # the resolver reads the run from its base + trainable part: the weights of the run's export
    from megatron_zero.checkpointing import mcore_checkpoint
    from megatron_zero.checkpointing.sources import resolve_decoder
    from megatron_zero.models.llama import build_llama_model
    from megatron_zero.parallel.initialize import initialize_parallel

    initialize_parallel(1, 1, seed=3)
    cfg = mcore_checkpoint.load_model_config(str(save / "export"))
    from_run, from_export = build_llama_model(cfg), build_llama_model(cfg)
    resolve_decoder(str(save)).load_into([from_run])
    mcore_checkpoint.load_model([from_export], str(save / "export"))
    a, b = from_run.state_dict(), from_export.state_dict()
    for k, t in b.items():
        if isinstance(t, torch.Tensor) and not k.endswith("_extra_state"):
            assert torch.equal(a[k], t), k
