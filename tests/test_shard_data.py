"""Sharded training data (megatron_zero/data/shards.py, tools/prepare_data.py): a real megatron-energon dataset made
with Energon's own prepare API trains with the JSON path's losses and resumes exactly; Energon's loader opens it;
a corrupt member is skipped and counted (refused under --strict-images); bad input gives one line."""
import json
import subprocess
import sys
import tarfile

import pytest
import torch

from tests.conftest import REPO, subprocess_env
from tests.test_pretrain_vlm import _metrics, _run, _world


def _prepare(tmp_path, out="shards", **kw):
    from megatron_zero.data.shards import prepare_shards

    # a second record sharing sample 0's picture: the image is stored once
    records = json.loads((tmp_path / "llava.json").read_text())
    if records[-1]["id"] != "shared":
        records.append({**records[0], "id": "shared"})
        (tmp_path / "llava.json").write_text(json.dumps(records))
    return prepare_shards(tmp_path / "llava.json", tmp_path / "images", tmp_path / out, max_shard_bytes=2048, **kw)


def _cli(*args):
    p = subprocess.run([sys.executable, *args], cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                       timeout=300, check=False)
    return p.returncode, p.stdout, p.stderr


@pytest.mark.timeout(900)
def test_shards_train_with_the_json_losses_and_resume_exactly(tmp_path):
    _world(tmp_path)
    summary = _prepare(tmp_path)
    assert summary["records"] == 17 and summary["images"] == 16 and summary["image_shards"] > 1
    common = ["--stage", "3", "--decoder-load", str(tmp_path / "decoder"), "--vision-model", "tiny-clip",
              "--tokenizer", str(tmp_path / "tok"), "--seq-length", "96", "--micro-batch-size", "2",
              "--global-batch-size", "4", "--train-iters", "4", "--log-interval", "1", "--lr", "1e-3",
              "--no-export", "--encoder-trainable-layers", "1"]
    _run([*common, "--data-path", str(tmp_path / "llava.json"), "--image-root", str(tmp_path / "images"),
          "--metrics-file", str(tmp_path / "json.jsonl")])
    shards = ["--data-path", str(tmp_path / "shards"), "--metrics-file", str(tmp_path / "shards.jsonl")]
    _run([*common, *shards, "--save", str(tmp_path / "run"), "--exit-after-iters", "2"])
    _run([*common, *shards, "--load", str(tmp_path / "run"), "--save", str(tmp_path / "run")])
    want, got = _metrics(tmp_path / "json.jsonl"), _metrics(tmp_path / "shards.jsonl")
    assert [m["iteration"] for m in got] == [1, 2, 3, 4]
    # same samples, same pixels: the interrupted shard run reproduces the JSON run's losses step for step
    assert [m["loss"] for m in got] == [m["loss"] for m in want]
    assert [m["real_tokens"] for m in got] == [m["real_tokens"] for m in want]


def test_shards_hold_the_json_bytes_and_energon_loader_opens_them(tmp_path):
    from megatron.energon import (
        DefaultTaskEncoder,
        WorkerConfig,
        get_loader,
        get_train_dataset,
    )

    from megatron_zero.data.images import load_image
    from megatron_zero.data.shards import ShardDataset, energon_cooker

    _world(tmp_path)
    _prepare(tmp_path)
    records = json.loads((tmp_path / "llava.json").read_text())
    shards = ShardDataset(tmp_path / "shards")
    convs = shards.conversations()
    assert [c.id for c in convs] == [r["id"] for r in records]
    assert convs[-1].image_paths == convs[0].image_paths  # the shared picture is one member
    for conv, rec in zip(convs, records):
        assert torch.equal(shards.load_image(conv.image_paths[0], 16), load_image(tmp_path / "images" / rec["image"], 16))

    class LlavaEncoder(DefaultTaskEncoder):
        cookers = (energon_cooker(),)
        decoder = None  # raw bytes, to compare with the files

    ds = get_train_dataset(tmp_path / "shards" / "metadataset.yaml", batch_size=None, shuffle_buffer_size=None,
                           max_samples_per_sequence=None, worker_config=WorkerConfig(rank=0, world_size=1, num_workers=0),
                           task_encoder=LlavaEncoder(), repeat=False)
    seen = {}
    for sample in get_loader(ds):
        seen[sample["record"]["id"]] = sample["images"][0]
    assert sorted(seen) == sorted(r["id"] for r in records)
    for rec in records:
        assert seen[rec["id"]] == (tmp_path / "images" / rec["image"]).read_bytes()


def test_corrupt_member_skipped_and_counted_or_refused(tmp_path):
    from megatron_zero.data.chat_template import chat_template_for
    from megatron_zero.data.datasets import ChatDataset, TokenizationConfig
    from megatron_zero.data.images import ImageLoadError
    from megatron_zero.data.shards import IMAGES, ShardDataset
    from megatron_zero.data.tokenizers import load_tokenizer
    from megatron_zero.errors import DataError
    from megatron_zero.training.vlm_batches import VLMBatches

    _world(tmp_path)
    _prepare(tmp_path)
    # cut the PNG end marker off member img000000000 (records 0 and "shared" use it), in place
    for shard in sorted((tmp_path / "shards" / IMAGES).glob("*.tar")):
        with tarfile.open(shard) as tar:
            info = next((m for m in tar if m.name == "img000000000.png"), None)
        if info is not None:
            with open(shard, "r+b") as f:
                f.seek(info.offset_data + info.size - 12)
                f.write(b"\0" * 12)
            break
    # and garble conversation member 000000005.json (record 5), same length
    for shard in sorted((tmp_path / "shards").glob("conversations-*.tar")):
        with tarfile.open(shard) as tar:
            info = next((m for m in tar if m.name == "000000005.json"), None)
        if info is not None:
            with open(shard, "r+b") as f:
                f.seek(info.offset_data)
                f.write(b"\xff" * info.size)
            break
    tok = load_tokenizer(str(tmp_path / "tok"))
    template = chat_template_for(tok, None, image_placeholder=None)

    def batches(shards, strict):
        convs = shards.conversations()
        ds = ChatDataset.build(convs, template, TokenizationConfig(96, 4))
        return VLMBatches(ds, image_token_id=template.image_placeholder_id, num_image_embeddings=4, seq_length=96,
                          pad_id=0, global_batch_size=16, micro_batch_size=1, dp_rank=0, dp_size=1, seed=0,
                          load_image=lambda p: shards.load_image(p, 16), strict_images=strict)

    shards = ShardDataset(tmp_path / "shards")
    b = batches(shards, strict=False)
    assert shards.skipped_records == 1 and "5" not in [c.id for c in shards.conversations()]
    micro = list(b.iteration(0))  # one epoch: every sample once
    # samples 0 and 15 ("shared") drop; 15's replacement is the next index, 0 (wrapping), which drops again
    assert b.skipped_samples == 3 and len(micro) == 16
    with pytest.raises(DataError, match=r"conversations-\d+\.tar:000000005\.json: not a JSON record"):
        ShardDataset(tmp_path / "shards", strict=True).conversations()
    with pytest.raises(ImageLoadError, match=r"images-\d+\.tar:img000000000\.png: truncated"):
        list(batches(shards, strict=True).iteration(0))


def _prepare_in_process(capsys, *argv):
    """tools/prepare_data.py's entry point behind the project's error boundary: (exit status, stderr)."""
    from megatron_zero.errors import run_main
    from tools.prepare_data import main

    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        run_main(main, prog="prepare_data.py", argv=argv)
    return exit_.value.code, capsys.readouterr().err


def test_prepare_resumes_and_bad_input_is_one_line(tmp_path, capsys):
    import megatron_zero.data.shards as shards_mod

    _world(tmp_path)
    fresh = _prepare(tmp_path, out="fresh")
    written = []
    real_write = shards_mod._write_tar

    def interrupted(path, *a):
        if len(written) == 3:
            raise KeyboardInterrupt
        written.append(path.name)
        real_write(path, *a)

    shards_mod._write_tar = interrupted
    try:
        with pytest.raises(KeyboardInterrupt):
            _prepare(tmp_path)
    finally:
        shards_mod._write_tar = real_write
    assert not (tmp_path / "shards" / ".nv-meta").exists()
    rc, _, err = _cli("tools/prepare_data.py", "--data-path", str(tmp_path / "llava.json"), "--image-root",
                      str(tmp_path / "images"), "--output-dir", str(tmp_path / "shards"), "--max-shard-bytes", "2048")
    assert rc == 0, err[-3000:]
    assert "(3 done before)" in err
    for tar in sorted((tmp_path / "fresh").rglob("*.tar")):
        assert tar.read_bytes() == (tmp_path / "shards" / tar.relative_to(tmp_path / "fresh")).read_bytes()
    assert fresh["records"] == 17

    records = json.loads((tmp_path / "llava.json").read_text())
    (tmp_path / "bad.json").write_text(json.dumps([records[0], {"id": "x", "image": "gone.png",
                                                                "conversations": records[0]["conversations"]}]))
    rc, err = _prepare_in_process(capsys, "--data-path", str(tmp_path / "bad.json"), "--image-root",
                                  str(tmp_path / "images"), "--output-dir", str(tmp_path / "bad"))
    assert rc == 2 and err.count("\n") == 1 and "record 1 (id 'x'): image" in err and "gone.png" in err, err
    assert not (tmp_path / "bad").exists()
    (tmp_path / "bad.json").write_text(json.dumps([{"id": "y", "conversations": "hello"}]))
    rc, err = _prepare_in_process(capsys, "--data-path", str(tmp_path / "bad.json"), "--output-dir",
                                  str(tmp_path / "bad"))
    assert rc == 2 and err.count("\n") == 1 and "record 0 (id 'y')" in err, err

    # a shard set without its metadata: refused in one line naming what to run
    (tmp_path / "shards" / ".nv-meta" / "index.sqlite").unlink()
    rc, _, err = _cli("-m", "megatron_zero.training.pretrain_vlm", "--stage", "3", "--decoder-load",
                        str(tmp_path / "decoder"), "--vision-model", "tiny-clip", "--tokenizer", str(tmp_path / "tok"),
                        "--data-path", str(tmp_path / "shards"), "--seq-length", "96", "--global-batch-size", "4",
                        "--train-iters", "1")
    assert rc == 2, err[-3000:]
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and ".nv-meta/index.sqlite is missing" in lines[0], err
    assert "python tools/prepare_data.py" in lines[0]
