"""JSON + image folder vs prepared shards: the training loader's samples/s and files opened per 1,000 samples,
side by side in one run on the same data (tools/benchmark_data_loading.py is the command line).

The data: ``num_images`` synthetic JPEG photos-like images (noise over gradients, ``min_side``..``max_side``
pixels), one LLaVA record each, prepared into shards by :func:`megatron_zero.data.shards.prepare_shards`. Each
path builds the real training loader (:class:`~megatron_zero.training.vlm_batches.VLMBatches` over the
conversations of :func:`~megatron_zero.data.shards.open_llava_data`, images preprocessed to 336 px) and the two
alternate, ``samples_per_round`` samples at a time, for ``rounds`` rounds (both see the same sample order).

Files opened are counted for real: a ``sys.addaudithook`` hook counts every ``open`` event (Python's ``open``,
``io.open``, ``os.open``, so every file Pillow, tarfile or Energon opens by name) and every ``sqlite3.connect``,
not Python's own module files: while loading samples, and separately for the setup (creating the data source:
reading the JSON, or the conversation shards and the indexes). Throughput is over the loading rounds only.
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

__all__ = ["DataLoadingConfig", "run"]

_OPENS = {"count": 0, "on": False}


_CODE = (".py", ".pyc", ".so", ".pth")
_PREFIXES = tuple({sys.prefix, sys.base_prefix, sys.exec_prefix})


def _audit(event: str, args) -> None:
    """Count data files opened: not Python's own (modules imported on first use, under the interpreter's prefix)."""
    if not _OPENS["on"] or event not in ("open", "sqlite3.connect"):
        return
    path = args[0] if args else None
    if isinstance(path, bytes):
        path = path.decode(errors="replace")
    if isinstance(path, str) and (path.endswith(_CODE) or path.startswith(_PREFIXES)):
        return
    _OPENS["count"] += 1


@dataclass
class DataLoadingConfig:
    num_images: int = 2000
    min_side: int = 200
    max_side: int = 500
    samples_per_round: int = 250
    rounds: int = 4
    image_size: int = 336
    seed: int = 0


def _make_data(cfg: DataLoadingConfig, root: Path) -> Path:
    from PIL import Image

    rng = np.random.default_rng(cfg.seed)
    (root / "images").mkdir(parents=True)
    records = []
    for i in range(cfg.num_images):
        h, w = rng.integers(cfg.min_side, cfg.max_side + 1, size=2)
        base = np.linspace(0, 255, w)[None, :, None] * rng.random(3) + rng.normal(0, 20, (h, w, 3))
        Image.fromarray(np.clip(base, 0, 255).astype(np.uint8)).save(root / "images" / f"{i:07d}.jpg", quality=90)
        records.append({"id": str(i), "image": f"{i:07d}.jpg", "conversations": [
            {"from": "human", "value": "<image>\nwhat is this ?"}, {"from": "gpt", "value": f"picture {i}"}]})
    (root / "llava.json").write_text(json.dumps(records))
    return root / "llava.json"


class _Path:
    """One side: its source, loader and running totals."""

    def __init__(self, name: str, data_path: str, image_root, cfg: DataLoadingConfig):
        from megatron_zero.data.datasets import Sample
        from megatron_zero.data.shards import open_llava_data
        from megatron_zero.training.vlm_batches import VLMBatches

        self.name, self.samples, self.seconds, self.opens, self.round_opens = name, 0, 0.0, 0, []
        _OPENS["count"], _OPENS["on"] = 0, True
        start = time.perf_counter()  # setup: reading the JSON, or the conversation shards and the indexes
        source = open_llava_data(data_path, image_root)
        token = 99  # stand-in tokens: the benchmark is about images
        samples = [Sample(np.array([1, token, 5, 2]), np.array([False, False, True, True]), c.image_paths, id=c.id)
                   for c in source.conversations]
        self.batches = VLMBatches(samples, image_token_id=token, num_image_embeddings=2, seq_length=8, pad_id=0,
                                  global_batch_size=cfg.samples_per_round, micro_batch_size=cfg.samples_per_round,
                                  dp_rank=0, dp_size=1, seed=cfg.seed,
                                  load_image=lambda p: source.load_image(p, cfg.image_size))
        self.setup_seconds = time.perf_counter() - start
        _OPENS["on"] = False
        self.setup_opens = _OPENS["count"]

    def round(self, iteration: int, per_round: int) -> None:
        _OPENS["count"], _OPENS["on"] = 0, True
        start = time.perf_counter()
        for batch in self.batches.iteration(iteration):
            assert batch["images"].shape[0] == per_round
        self.seconds += time.perf_counter() - start
        _OPENS["on"] = False
        self.opens += _OPENS["count"]
        self.round_opens.append(_OPENS["count"])
        self.samples += per_round

    def result(self) -> dict:
        total = self.opens + self.setup_opens
        return {"samples": self.samples, "seconds": round(self.seconds, 3),
                "samples_per_s": round(self.samples / self.seconds, 2),
                "setup_seconds": round(self.setup_seconds, 2), "setup_files_opened": self.setup_opens,
                "files_opened_loading": self.opens, "files_opened_per_round": self.round_opens,
                "files_opened_per_1000_samples_loading": round(1000 * self.opens / self.samples, 2),
                "files_opened_per_1000_samples_with_setup": round(1000 * total / self.samples, 2)}


def run(cfg: DataLoadingConfig, workdir: str | None = None, log=print) -> dict:
    from megatron_zero.data.shards import prepare_shards

    sys.addaudithook(_audit)
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        root = Path(tmp)
        log(f"making {cfg.num_images} JPEG images and their LLaVA JSON in {root}")
        data = _make_data(cfg, root)
        start = time.perf_counter()
        summary = prepare_shards(data, root / "images", root / "shards")
        prepare_s = time.perf_counter() - start
        paths = [_Path("json+folder", str(data), str(root / "images"), cfg), _Path("shards", str(root / "shards"), None, cfg)]
        for r in range(cfg.rounds):  # alternating, same iterations (same samples) for both
            for p in paths if r % 2 == 0 else paths[::-1]:
                p.round(r, cfg.samples_per_round)
            log(f"round {r + 1}/{cfg.rounds}: " + ", ".join(f"{p.name} {p.samples / p.seconds:.1f} samples/s"
                                                            for p in paths))
        json_path, shards = (p.result() for p in paths)
    return {"config": asdict(cfg), "prepare": {**summary, "seconds": round(prepare_s, 1)}, "json+folder": json_path,
            "shards": shards, "throughput_ratio_shards_over_json": round(shards["samples_per_s"]
                                                                          / json_path["samples_per_s"], 3)}
