"""Trainable-only VLM checkpoints (issue 23), through the CLIs: a stage-2 run (decoder frozen, the encoder's lower
layer frozen) with the distributed optimizer at DP=1 saves every --save-interval steps what trains and references
its bases; an ``iter_*`` of it -- or the run directory before its export exists -- is read by the HF LLaVA export,
grafting, generation and evaluation from the bases + the trainable part, bit-identical to what the same tools read
from a full (--save-frozen) checkpoint of the same iteration; a changed or missing base is refused in one line
naming it."""
import json
import shutil

import pytest
import torch

from tests.conftest import run_cli, run_cli_ok
from tests.test_pretrain_vlm import _world


def _tensors(directory):
    from safetensors.torch import load_file

    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _assert_same_tensors(a, b):
    assert a and sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("frozen_vlm")
    _world(root)
    common = ["-m", "megatron_zero.training.pretrain_vlm", "--tokenizer", root / "tok", "--data-path", root / "llava.json", "--image-root",
              root / "images", "--seq-length", "48", "--micro-batch-size", "2", "--global-batch-size", "4",
              "--log-interval", "1", "--feature-convention", "llava", "--lr", "1e-2"]
    run_cli_ok([*common, "--stage", "1", "--decoder-load", root / "decoder", "--vision-model", "tiny-clip",
                "--translator-layer", "2", "--train-iters", "1", "--save", root / "s1"], timeout=400)
    stage2 = [*common, "--stage", "2", "--decoder-load", root / "decoder", "--encoder-load", root / "s1",
              "--encoder-trainable-layers", "1", "--train-iters", "3", "--save-interval", "2", "--no-export",
              "--use-distributed-optimizer"]
    run_cli_ok([*stage2, "--save", root / "only", "--metrics-file", root / "only.jsonl"], timeout=400)
    run_cli_ok([*stage2, "--save", root / "full", "--save-frozen", "--metrics-file", root / "full.jsonl"],
               timeout=400)
    image = sorted((root / "images").iterdir())[0]
    (root / "prompts.jsonl").write_text(json.dumps({"id": "q", "prompt": "what shape is it", "images": [str(image)]})
                                        + "\n")
    return root


def test_stage2_with_distributed_optimizer_saves_trainable_only_and_resumes_exactly(runs):
    """The distributed optimizer at DP=1 with a partly-frozen stacked key (the encoder's layers) saves (it failed
    with megatron-core's "Invalid access pattern") in the DP-reshardable format, and resumes exactly."""
    from torch.distributed.checkpoint import FileSystemReader

    from megatron_zero.checkpointing import run_dir

    only, full = run_dir.iter_dir(str(runs / "only"), 2), run_dir.iter_dir(str(runs / "full"), 2)
    manifest = run_dir.read_manifest(only)
    assert manifest["layout"]["optimizer"] == "distributed:dp_reshardable"
    assert manifest["frozen_base"]["path"] == {"--decoder-load": str(runs / "decoder"),
                                               "--encoder-load": str(runs / "s1")}
    assert manifest["tokenizer"] == str(runs / "tok")
    assert "frozen_base" not in run_dir.read_manifest(full)
    saved = {k for k in FileSystemReader(only).read_metadata().state_dict_metadata
             if not k.startswith("optimizer") and "_extra_state" not in k}
    assert not any(k.startswith("language_model.") for k in saved), sorted(saved)[:5]
    assert "vision.vision_model.patch_embedding.weight" not in saved and any(k.startswith("vision.") for k in saved)
    full_keys = set(FileSystemReader(full).read_metadata().state_dict_metadata)
    assert "language_model.embedding.word_embeddings.weight" in full_keys

    # resume the trainable-only iteration 2 (its bases loaded by the run, fingerprints compared): step 3 as before
    resumed = runs / "resumed"
    shutil.copytree(runs / "only", resumed)
    shutil.rmtree(resumed / "iter_0000003")
    (resumed / run_dir.LATEST).write_text("2")
    run_cli_ok(["-m", "megatron_zero.training.pretrain_vlm", "--tokenizer", runs / "tok", "--data-path",
                runs / "llava.json", "--image-root",
                runs / "images", "--seq-length", "48", "--micro-batch-size", "2", "--global-batch-size", "4",
                "--feature-convention", "llava", "--lr", "1e-2", "--stage", "2", "--decoder-load", runs / "decoder",
                "--encoder-load", runs / "s1", "--encoder-trainable-layers", "1", "--train-iters", "3",
                "--save-interval", "2", "--no-export", "--use-distributed-optimizer", "--save", resumed, "--load",
                resumed, "--metrics-file", runs / "resumed.jsonl"], timeout=400)
    want = [json.loads(x) for x in open(runs / "only.jsonl")]
    got = [json.loads(x) for x in open(runs / "resumed.jsonl")]
    assert [m["iteration"] for m in got] == [3] and got[0]["loss"] == want[2]["loss"]
    full_losses = [json.loads(x)["loss"] for x in open(runs / "full.jsonl")]
    assert full_losses == [m["loss"] for m in want]  # saving trainable-only does not change training


def test_export_graft_generate_evaluate_read_iteration_from_its_bases(runs, tmp_path):
    from megatron_zero.checkpointing.resolve import resolve_checkpoint

    for name in ("only", "full"):  # the tokenizer the run recorded
        ckpt = resolve_checkpoint(str(runs / name / "iter_0000002"))
        assert ckpt.is_vlm and ckpt.iteration == 2 and ckpt.tokenizer_dir == str(runs / "tok")

    # HF LLaVA export: the trainable-only iter_2 (bases + trainable part) == the full iter_2, tensor for tensor.
    # (The word tokenizer has no HF chat template, which the export refuses: it is moved away here, and the
    # export holds the weights and config.json, as from the run's export/.)
    shutil.move(runs / "tok", tmp_path / "tok")
    try:
        for name in ("only", "full"):
            out = run_cli_ok(["tools/convert_checkpoint.py", "--source-format", "vlm", "--model-type", "vlm",
                              "--target-format", "hf", "--load-dir", runs / name / "iter_0000002", "--save-dir",
                              tmp_path / f"hf_{name}"], timeout=300)
            assert "config.json only" in out
    finally:
        shutil.move(tmp_path / "tok", runs / "tok")
    _assert_same_tensors(_tensors(tmp_path / "hf_only"), _tensors(tmp_path / "hf_full"))
    assert json.loads((tmp_path / "hf_only" / "config.json").read_text()) == json.loads(
        (tmp_path / "hf_full" / "config.json").read_text())

    # grafting from an iter_* (the encoder never saw a surrogate: --force)
    for name in ("only", "full"):
        run_cli_ok(["tools/graft.py", "--encoder", runs / name / "iter_0000002", "--target", runs / "decoder",
                    "--output", tmp_path / f"vlm_{name}", "--force"], timeout=300)
    _assert_same_tensors(_tensors(tmp_path / "vlm_only"), _tensors(tmp_path / "vlm_full"))
    meta = [json.loads((tmp_path / f"vlm_{n}" / "image_encoder.json").read_text()) for n in ("only", "full")]
    assert meta[0] == meta[1]
    record = json.loads((tmp_path / "vlm_only" / "vlm_config.json").read_text())["graft"]
    assert record["encoder"] == str(runs / "only" / "iter_0000002")
    assert not list(tmp_path.glob(".graft-encoder-*"))

    # generation from the run directory before its export exists (its newest iteration, 3) and from iter_3 full
    answers = {}
    for name, path in (("only", runs / "only"), ("full", runs / "full" / "iter_0000003")):
        out = tmp_path / f"answers_{name}.jsonl"
        run_cli_ok(["tools/generate.py", "--pretrained-checkpoint", path, "--prompts", runs / "prompts.jsonl",
                    "--max-new-tokens", "4", "--binary", "--yes-words", "circle", "--no-words", "square",
                    "--output", out], timeout=300)
        answers[name] = [json.loads(x) for x in open(out)]
    assert answers["only"] == answers["full"] and "logprob_yes" in answers["only"][0]

    # evaluation's loaders read the iteration the same way: the VLM (tools/evaluate.py --suite vlm) and its
    # decoder alone (--suite text)
    from megatron_zero.checkpointing.sources import resolve_decoder
    from megatron_zero.evaluation.vlm_adapter import VLMEvaluator
    from megatron_zero.models.llama import build_llama_model

    def same(a, b):
        for k, t in b.items():
            if isinstance(t, torch.Tensor) and not k.endswith("_extra_state"):
                assert torch.equal(a[k], t), k

    only, full = (VLMEvaluator(str(runs / n / "iter_0000002")).model for n in ("only", "full"))
    same(only.state_dict(), full.state_dict())
    decoders = []
    for name in ("only", "full"):
        src = resolve_decoder(str(runs / name / "iter_0000002"))
        decoders.append(build_llama_model(src.cfg))
        src.load_into(decoders[-1:])
    same(decoders[0].state_dict(), decoders[1].state_dict())
    same(decoders[0].state_dict(), only.language_model.state_dict())

    # the next stage starts from an iteration (--decoder-load/--encoder-load, the tokenizer the run recorded)
    losses = []
    for name in ("only", "full"):
        it = runs / name / "iter_0000002"
        run_cli_ok(["-m", "megatron_zero.training.pretrain_vlm", "--data-path", runs / "llava.json", "--image-root",
                    runs / "images", "--seq-length", "48", "--micro-batch-size", "2", "--global-batch-size", "4",
                    "--lr", "1e-2", "--stage", "3", "--decoder-load", it, "--encoder-load", it, "--train-iters", "1",
                    "--metrics-file", tmp_path / f"s3_{name}.jsonl"], timeout=400)
        losses.append([json.loads(x)["loss"] for x in open(tmp_path / f"s3_{name}.jsonl")])
    assert losses[0] == losses[1] and len(losses[0]) == 1


def test_changed_or_missing_base_is_refused_in_one_line(runs, tmp_path):
    from safetensors.torch import load_file, save_file

    it = runs / "only" / "iter_0000002"
    export = ["tools/convert_checkpoint.py", "--source-format", "vlm", "--model-type", "vlm", "--target-format",
              "hf", "--load-dir", it, "--save-dir", tmp_path / "hf"]

    def refused(args, *words):
        p = run_cli(args, timeout=300)
        last = p.stderr.strip().splitlines()[-1]
        assert p.returncode == 2 and "Traceback" not in p.stderr, (p.stdout + p.stderr)[-3000:]
        assert all(w in last for w in words), last
        assert not (tmp_path / "hf").exists()

    # the encoder base changed (its frozen patch embedding): refused, naming the base
    enc = runs / "s1" / "export" / "image_encoder.safetensors"
    shutil.copy(enc, tmp_path / "enc.bak")
    tensors = load_file(enc)
    tensors["vision_model.patch_embedding.weight"] = tensors[
        "vision_model.patch_embedding.weight"] + 1e-3
    save_file(tensors, enc)
    try:
        refused(export, "frozen tensors differ", f"--encoder-load {runs / 's1'}")
        refused(["tools/generate.py", "--pretrained-checkpoint", it, "--prompts", runs / "prompts.jsonl"],
                "frozen tensors differ", str(runs / "s1"))
    finally:
        shutil.copy(tmp_path / "enc.bak", enc)
    # the decoder base moved away: refused, naming where it was
    shutil.move(runs / "decoder", tmp_path / "decoder")
    try:
        refused(export, "no longer exists", str(runs / "decoder"))
    finally:
        shutil.move(tmp_path / "decoder", runs / "decoder")
