"""Training data at HPC scale: a LLaVA-1.5 JSON + image folder as a megatron-energon WebDataset, and its reader.

Millions of small image files are a burden on a parallel filesystem's metadata servers; a training run over this
layout opens a handful of tar shards once and reads every image at an indexed byte offset.

Layout (:func:`prepare_shards` writes it, tools/prepare_data.py is its command line)::

    <out>/
      conversations-000000.tar ...   one member per record, in the JSON's order: <000000000>.json, the record
                                     with its "image" renamed to the image's member name in images/
      .nv-meta/                      Energon's own prepare step: dataset.yaml (CrudeWebdataset), split.yaml,
                                     index.sqlite, index.uuid, .info.json
      images/images-000000.tar ...   every distinct image once (a picture shared by many records is stored once):
                                     <img000000000>.<ext>, the original file's bytes
      images/.nv-meta/               Energon's index of the images (each member addressable by name)
      metadataset.yaml               Energon MetadatasetV2: the conversations with the images as auxiliary dataset
                                     (Energon's polylithic layout); Energon's loader opens it with a cooker
                                     (:func:`energon_cooker`)
      prepare_state.json             the plan (inputs, shard boundaries) that lets an interrupted run resume

Shards are bounded by ``max_shard_bytes`` (a larger single image gets a shard of its own). Each shard is written to
a temporary name and renamed when complete, so an interrupted preparation resumes at the first missing shard.

Training (``pretrain_vlm --data-path <out>``) reads it with :class:`ShardDataset`: the conversations in the JSON's
order (so dataset index ``i`` is the JSON's record ``i``, and the project's resumable sampler, DP sharding,
packing and bad-image replacement work unchanged) and images through Energon's indexed tar reader
(``SqliteITarEntryReader``), decoded by the same code as the JSON path (:func:`~megatron_zero.data.images.decode_image`
on the same bytes: identical pixels).
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tarfile
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

from megatron_zero.data.datasets import (
    Conversation,
    llava_conversation,
    read_llava_json,
    read_llava_records,
)
from megatron_zero.data.images import (
    IMAGE_SIZE,
    ImageLoadError,
    check_image_bytes,
    decode_image,
    load_image,
)
from megatron_zero.errors import DataError

__all__ = [
    "DEFAULT_MAX_SHARD_BYTES",
    "LlavaSource",
    "ShardDataset",
    "ShardDatasetError",
    "energon_cooker",
    "is_shard_dataset",
    "open_llava_data",
    "prepare_shards",
]

log = logging.getLogger(__name__)

DEFAULT_MAX_SHARD_BYTES = 1 << 30  # 1 GiB: a few hundred shards for LLaVA-1.5's 665K samples
META = ".nv-meta"  # Energon's metadata folder (megatron.energon.flavors.webdataset.config.MAIN_FOLDER_NAME)
IMAGES = "images"
STATE_FILE = "prepare_state.json"
METADATASET = "metadataset.yaml"
_TAR_BLOCK = 512
_PREPARE_HINT = "python tools/prepare_data.py --data-path <llava.json> --image-root <images/> --output-dir {path}"


class ShardDatasetError(DataError):
    """A shard dataset that cannot be used or prepared: what and where."""


# ------------------------------------------------------------------------------------------------------ writing


@dataclass
class _Shard:
    name: str
    members: list = field(default_factory=list)  # [member name, source file or None, size]
    size: int = 0


def _tar_size(size: int) -> int:
    return _TAR_BLOCK + -(-size // _TAR_BLOCK) * _TAR_BLOCK


def _bound(items, prefix: str, max_bytes: int) -> list[_Shard]:
    """``(member, source, size)`` items cut into shards of at most ``max_bytes`` (one item may exceed it alone)."""
    shards: list[_Shard] = []
    for member, source, size in items:
        if not shards or (shards[-1].members and shards[-1].size + _tar_size(size) > max_bytes):
            shards.append(_Shard(f"{prefix}-{len(shards):06d}.tar"))
        shards[-1].members.append([member, source, size])
        shards[-1].size += _tar_size(size)
    return shards


def _plan(data_path: Path, image_root: Path, max_bytes: int):
    """Check every record and image (one-line errors), map images to members, cut both into shards."""
    records = read_llava_records(data_path)
    image_member: dict[str, str] = {}  # normalised relative path -> member name
    image_items, texts = [], []
    for i, rec in enumerate(tqdm(records, desc="checking records", unit="rec", disable=len(records) < 10_000)):
        conv = llava_conversation(rec, f"{data_path}: record {i}", default_id=str(i))
        members = []
        for rel in conv.image_paths:
            key = os.path.normpath(rel)
            if key not in image_member:
                src = image_root / rel
                try:
                    size = src.stat().st_size
                except OSError as err:
                    raise ShardDatasetError(f"{data_path}: record {i} (id {conv.id!r}): image {src}: "
                                            f"{err.strerror or err} (check --image-root)") from None
                ext = Path(rel).suffix.lower().lstrip(".") or "img"
                image_member[key] = f"img{len(image_member):09d}.{ext}"
                image_items.append((image_member[key], str(src), size))
            members.append(image_member[key])
        out = dict(rec)
        if "image" in rec:
            out["image"] = members[0] if isinstance(rec["image"], str) else members
            out["source_image"] = rec["image"]
        texts.append(json.dumps(out, ensure_ascii=False).encode())
    conv_items = [(f"{i:09d}.json", None, len(t)) for i, t in enumerate(texts)]
    return texts, _bound(conv_items, "conversations", max_bytes), _bound(image_items, "images", max_bytes)


def _fingerprint(data_path: Path, shards: list[_Shard]) -> str:
    st = data_path.stat()
    plan = [str(data_path.resolve()), st.st_size, st.st_mtime_ns, [(s.name, s.members) for s in shards]]
    return hashlib.sha256(json.dumps(plan).encode()).hexdigest()


def _write_tar(path: Path, shard: _Shard, texts: list[bytes], progress: tqdm) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for member, source, size in shard.members:
            if source is None:
                data = texts[int(member.split(".")[0])]
            else:
                with open(source, "rb") as f:
                    data = f.read()
                if len(data) != size:
                    raise ShardDatasetError(f"{source}: changed while being prepared ({size} -> {len(data)} bytes)")
            info = tarfile.TarInfo(member)
            info.size, info.mode = len(data), 0o444
            tar.addfile(info, io.BytesIO(data))
            progress.update(len(data))
    os.replace(tmp, path)


def _energon_prepare(path: Path, tars: list[str], workers: int) -> None:
    """Energon's own preparation (``energon prepare``'s API): index, split.yaml, info; dataset.yaml as its CLI
    writes it for a crude dataset."""
    from megatron.energon.epathlib import EPath
    from megatron.energon.flavors import BaseWebdatasetFactory

    def progress(items, length=None):
        yield from tqdm(items, total=length, desc=f"energon prepare {path.name}", unit="shard")

    BaseWebdatasetFactory.prepare_dataset(EPath(path), tars, split_parts_ratio=[("train", 1.0)], shuffle_seed=None,
                                          progress_fn=progress, workers=max(1, min(workers, len(tars))))
    with open(path / META / "dataset.yaml", "w") as f:
        yaml.safe_dump({"__module__": "megatron.energon", "__class__": "CrudeWebdataset"}, f)


def prepare_shards(data_path: str | os.PathLike, image_root: str | os.PathLike | None, output_dir: str | os.PathLike,
                   max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, workers: int = 4) -> dict:
    """Convert a LLaVA-1.5 JSON + image folder to the layout of the module docstring; resumes an interrupted run.

    Returns a summary (records, images, shards, bytes). Raises :class:`DataError` naming the record or file.
    """
    data_path, out = Path(data_path), Path(output_dir)
    root = Path(image_root) if image_root is not None else data_path.parent
    if max_shard_bytes < 1:
        raise ShardDatasetError(f"--max-shard-bytes must be >= 1, got {max_shard_bytes}")
    texts, conv_shards, image_shards = _plan(data_path, root, max_shard_bytes)
    if not texts:
        raise ShardDatasetError(f"{data_path}: no records")
    fingerprint = _fingerprint(data_path, conv_shards + image_shards)
    state_path = out / STATE_FILE
    if state_path.exists():
        state = json.loads(state_path.read_text())
        if state.get("fingerprint") != fingerprint:
            raise ShardDatasetError(f"--output-dir {out}: holds a preparation of other data or other settings "
                                    f"({state.get('data_path')}); give a new --output-dir or remove this one")
    elif out.exists() and any(out.iterdir()):
        raise ShardDatasetError(f"--output-dir {out}: exists and is not empty; give a new or empty directory")
    state = {"data_path": str(data_path), "fingerprint": fingerprint, "complete": False}
    (out / IMAGES).mkdir(parents=True, exist_ok=True)
    if not state_path.exists():
        state_path.write_text(json.dumps(state))
    todo = [(out, s) for s in conv_shards] + [(out / IMAGES, s) for s in image_shards]
    todo = [(d, s) for d, s in todo if not (d / s.name).exists()]
    total = sum(size for _, s in todo for _, _, size in s.members)
    resumed = len(conv_shards) + len(image_shards) - len(todo)
    with tqdm(total=total, unit="B", unit_scale=True, desc="writing shards" + (f" ({resumed} done before)"
                                                                               if resumed else "")) as bar:
        for d, shard in todo:
            _write_tar(d / shard.name, shard, texts, bar)
    _energon_prepare(out, [s.name for s in conv_shards], workers)
    _energon_prepare(out / IMAGES, [s.name for s in image_shards], workers)
    with open(out / METADATASET, "w") as f:
        yaml.safe_dump({"__module__": "megatron.energon", "__class__": "MetadatasetV2", "splits": {"train": {
            "path": ".", "aux": {"images": f"./{IMAGES}"}, "subflavors": {"megatron_zero": "llava"}}}}, f,
            sort_keys=False)
    state["complete"] = True
    state_path.write_text(json.dumps(state))
    return {"records": len(texts), "images": sum(len(s.members) for s in image_shards),
            "conversation_shards": len(conv_shards), "image_shards": len(image_shards),
            "bytes": sum(s.size for s in conv_shards + image_shards)}


# ------------------------------------------------------------------------------------------------------ reading


def is_shard_dataset(data_path: str | os.PathLike) -> bool:
    """Whether ``--data-path`` names a shard dataset (a directory) rather than a LLaVA JSON file."""
    return os.path.isdir(data_path)


class ShardDataset:
    """A prepared shard dataset: its conversations (JSON order) and images by member name.

    ``skipped_records`` counts conversation members that could not be read (each dropped with a warning; with
    ``strict`` the first one raises); a bad image raises :class:`ImageLoadError` for the training loop to count
    (or refuse under ``--strict-images``), as a bad file of the JSON path does.
    """

    def __init__(self, path: str | os.PathLike, strict: bool = False):
        self.path = Path(path)
        self.strict = strict
        for part in (Path(META) / "dataset.yaml", Path(META) / "split.yaml", Path(META) / "index.sqlite",
                     Path(IMAGES) / META / "index.sqlite"):
            if not (self.path / part).is_file():
                raise ShardDatasetError(f"--data-path {self.path}: {part} is missing (not a prepared shard dataset, "
                                        f"or its preparation was interrupted); run: "
                                        + _PREPARE_HINT.format(path=self.path))
        self.skipped_records = 0
        self._images = None

    def _shard_names(self, path: Path) -> list[str]:
        from megatron.energon.epathlib import EPath
        from megatron.energon.flavors.webdataset.metadata import get_info_shard_files

        return sorted(get_info_shard_files(EPath(path)))

    def conversations(self) -> list[Conversation]:
        """Every readable conversation, in the order of the JSON it was prepared from (one open per shard)."""
        out = []
        for name in tqdm(self._shard_names(self.path), desc="reading conversation shards", unit="shard",
                         disable=None):
            try:
                with tarfile.open(self.path / name, "r:") as tar:
                    for info in tar:
                        if info.isfile() and info.name.endswith(".json"):
                            self._read_record(tar, info, f"{self.path / name}:{info.name}", out)
            except (OSError, tarfile.TarError) as err:
                raise ShardDatasetError(f"{self.path / name}: unreadable shard ({err}); prepare the dataset again: "
                                        + _PREPARE_HINT.format(path=self.path)) from None
        return out

    def _read_record(self, tar: tarfile.TarFile, info: tarfile.TarInfo, where: str, out: list) -> None:
        try:
            rec = json.loads(tar.extractfile(info).read())
        except ValueError as err:  # not UTF-8 / not JSON: a corrupt member
            self._bad_record(f"{where}: not a JSON record ({err})")
            return
        try:
            out.append(llava_conversation(rec, where, default_id=info.name.split(".")[0]))
        except DataError as err:
            self._bad_record(str(err))

    def _bad_record(self, message: str) -> None:
        if self.strict:
            raise ShardDatasetError(f"{message} (--strict-images refuses a corrupt shard member)")
        self.skipped_records += 1
        log.warning("skipping %s (%d conversation(s) skipped so far)", message, self.skipped_records)

    def _reader(self):
        if self._images is None:
            from megatron.energon.epathlib import EPath
            from megatron.energon.flavors.webdataset.itar_reader import (
                SqliteITarEntryReader,
            )

            self._images = SqliteITarEntryReader(EPath(self.path / IMAGES), key_is_full_entryname=True)
            # every shard stays open: random access over shuffled samples opens each image shard once
            self._images.itar_cache_size = max(1, len(self._images.tar_filenames))
            weakref.finalize(self, self._images.close)  # closed before interpreter teardown
        return self._images

    def read_image(self, member: str) -> bytes:
        """The encoded bytes of image ``member``, checked like a file of the JSON path."""
        name = f"{self.path / IMAGES}:{member}"
        try:
            data, source = self._reader()[member]
        except (KeyError, ValueError, AssertionError) as err:
            raise ImageLoadError(name, f"not in the shard index: {err}") from None
        except OSError as err:
            raise ImageLoadError(name, f"unreadable: {err.strerror or err}") from None
        return check_image_bytes(data, f"{self.path / IMAGES / source.shard_name}:{member}")

    def load_image(self, member: str, size: int = IMAGE_SIZE) -> torch.Tensor:
        """Image ``member`` decoded and preprocessed exactly as :func:`~megatron_zero.data.images.load_image`."""
        return decode_image(self.read_image(member), f"{self.path / IMAGES}:{member}", size)


@dataclass
class LlavaSource:
    """The conversations of ``--data-path`` and how to load their images (``load_image(path, size)``)."""

    conversations: list[Conversation]
    load_image: Callable[[str, int], torch.Tensor]


def open_llava_data(data_path: str, image_root: str | None = None, strict: bool = False) -> LlavaSource:
    """A LLaVA JSON (images from ``image_root``) or a prepared shard dataset (no ``image_root``)."""
    if not is_shard_dataset(data_path):
        return LlavaSource(read_llava_json(data_path, image_root), load_image)
    if image_root is not None:
        raise ShardDatasetError(f"--image-root {image_root}: --data-path {data_path} is a shard dataset, which holds "
                                f"its images; drop --image-root")
    shards = ShardDataset(data_path, strict=strict)
    return LlavaSource(shards.conversations(), shards.load_image)


def energon_cooker():
    """An Energon ``Cooker`` for :data:`METADATASET` (Energon's own loader): each crude sample becomes a dict with
    the record (``"record"``) and its images (``"images"``) from the auxiliary dataset: encoded bytes with a task
    encoder whose ``decoder`` is None, else as the task encoder's decoder makes them."""
    from megatron.energon import Cooker, cooker, stateless

    @stateless
    @cooker
    def cook(sample: dict, images) -> dict:
        rec = json.loads(sample["json"]) if isinstance(sample["json"], bytes) else sample["json"]
        names = [] if "image" not in rec else [rec["image"]] if isinstance(rec["image"], str) else rec["image"]
        return {"__key__": sample["__key__"], "record": rec, "images": [images[n][0] for n in names]}

    return Cooker(cook, has_subflavors={"megatron_zero": "llava"})
