"""CLIP image preprocessing (Table A.4): decode, pad to square with the mean pixel, resize to 336, normalise.

Every image becomes a float32 ``[3, 336, 336]`` tensor, as LLaVA-1.5 feeds CLIP ViT-L/14-336:

1. decode to RGB (EXIF orientation is *not* applied, as in LLaVA);
2. pad to a square with the per-channel mean pixel ``PAD_COLOR = int(255 * CLIP_MEAN) = (122, 116, 104)``, the
   image centred as in LLaVA's ``expand2square``: offset ``(side - w) // 2``, ``(side - h) // 2`` (an odd margin
   puts the extra pixel after the image);
3. resize to 336 x 336, bicubic with antialiasing (Pillow's ``BICUBIC``);
4. normalise: ``(x / 255 - CLIP_MEAN) / CLIP_STD``, channels first.

Two paths with these semantics:

* :class:`PillowImageLoader` (and :func:`load_image` for one file): the reference, works everywhere;
* :class:`DaliImageLoader`: an NVIDIA DALI pipeline (``fn.decoders.image`` on ``"cpu"``, or ``"mixed"`` on a GPU;
  ``fn.crop`` with ``out_of_bounds_policy="pad"`` for the centred square; ``fn.resize``;
  ``fn.crop_mirror_normalize``) delivered by ``DALIGenericIterator``.

Agreement (tests/test_images.py, real photos from ``skimage.data`` and a synthetic non-square image): the two
paths differ by at most ``DALI_MAX_ABS_DIFF = 0.1`` and on average by at most ``DALI_MEAN_ABS_DIFF = 0.005``
(normalised units; 0.1 is about 7 grey levels). The padding and centring are identical; the residue comes from the
two bicubic resamplers and JPEG decoders.

Bad images: a missing, unreadable, empty, truncated (a JPEG without its end-of-image marker, a PNG without
``IEND``) or undecodable file is skipped with a warning and counted in the loader's ``skipped``
(:class:`SkippedImages`); the next images fill its place in the batch, so both loaders yield the same batches.
With ``strict=True`` the loader raises :class:`ImageLoadError` naming the file instead. If DALI fails on a batch
that passed the checks, that batch is decoded with Pillow (which pins down the bad file, and tops the batch up
with the next images), and the pipeline is rebuilt; training never stops on a bad image.

:func:`make_image_loader` picks DALI when it is installed (``platform.HAVE_DALI``), on the GPU when there is one.
"""
from __future__ import annotations

import collections
import io
import logging
import os
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from PIL import Image

from megatron_zero import platform
from megatron_zero.errors import UserError

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "DALI_MAX_ABS_DIFF",
    "DALI_MEAN_ABS_DIFF",
    "IMAGE_SIZE",
    "PAD_COLOR",
    "DaliImageLoader",
    "ImageBatch",
    "ImageLoadError",
    "PillowImageLoader",
    "SkippedImages",
    "check_image_bytes",
    "decode_image",
    "expand_to_square",
    "load_image",
    "make_image_loader",
    "preprocess_pil",
    "read_image_bytes",
]

log = logging.getLogger(__name__)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_SIZE = 336
PAD_COLOR = tuple(int(255 * m) for m in CLIP_MEAN)  # LLaVA's expand2square background: (122, 116, 104)
DALI_MAX_ABS_DIFF = 0.1
DALI_MEAN_ABS_DIFF = 0.005

_SIGNATURES = (
    (b"\xff\xd8\xff", "jpeg"),
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"GIF87a", "gif"),
    (b"GIF89a", "gif"),
    (b"BM", "bmp"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
)
_TAIL_BYTES = 1024  # where a complete file's end marker must be (trailing padding allowed)

PathLike = str | os.PathLike


class ImageLoadError(UserError, RuntimeError):
    """An image that cannot be used: the file and why."""

    def __init__(self, path: PathLike, reason: str):
        super().__init__(path, reason)
        self.path, self.reason = str(path), reason

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


@dataclass
class SkippedImages:
    """Counts the images a loader skipped (or, with ``strict``, raises on the first one)."""

    strict: bool = False
    count: int = 0
    reasons: collections.Counter = field(default_factory=collections.Counter)

    def record(self, error: ImageLoadError) -> None:
        if self.strict:
            raise error
        self.count += 1
        self.reasons[error.reason.split(":")[0]] += 1
        log.warning("skipping image %s (%d skipped so far)", error, self.count)


@dataclass
class ImageBatch:
    """Preprocessed images ``[B, 3, S, S]`` and their positions ``[B]`` in the loader's path list."""

    images: torch.Tensor
    indices: torch.Tensor


def _image_format(data: bytes) -> str | None:
    for signature, name in _SIGNATURES:
        if data.startswith(signature):
            return name
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def read_image_bytes(path: PathLike) -> bytes:
    """The encoded file, after cheap checks that it exists, is a known image format and is not truncated.

    Raises:
        ImageLoadError: missing, unreadable, empty, unknown format, or a JPEG/PNG cut short.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise ImageLoadError(path, "file not found") from None
    except OSError as err:
        raise ImageLoadError(path, f"unreadable: {err.strerror or err}") from None
    return check_image_bytes(data, path)


def check_image_bytes(data: bytes, path: PathLike) -> bytes:
    """``data`` (the encoded image ``path`` names in errors) after the cheap checks of :func:`read_image_bytes`."""
    if not data:
        raise ImageLoadError(path, "empty file")
    fmt = _image_format(data)
    if fmt is None:
        raise ImageLoadError(path, "unknown format: not a JPEG, PNG, GIF, BMP, TIFF or WebP file")
    tail = data[-_TAIL_BYTES:]
    if (fmt == "jpeg" and b"\xff\xd9" not in tail) or (fmt == "png" and b"IEND" not in tail):
        raise ImageLoadError(path, f"truncated: {fmt.upper()} file without its end marker")
    return data


def expand_to_square(image: Image.Image, fill: tuple[int, int, int] = PAD_COLOR) -> Image.Image:
    """LLaVA's ``expand2square``: the image centred on a ``fill``-coloured square of side ``max(w, h)``."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    square = Image.new(image.mode, (side, side), fill)
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    return square


def preprocess_pil(image: Image.Image, size: int = IMAGE_SIZE) -> torch.Tensor:
    """Pad to square, resize (bicubic) and CLIP-normalise an RGB image -> float32 ``[3, size, size]``."""
    square = expand_to_square(image.convert("RGB")).resize((size, size), Image.BICUBIC)
    pixels = torch.from_numpy(np.asarray(square, dtype=np.float32) / 255.0)
    mean, std = torch.tensor(CLIP_MEAN), torch.tensor(CLIP_STD)
    return ((pixels - mean) / std).permute(2, 0, 1).contiguous()


def load_image(path: PathLike, size: int = IMAGE_SIZE) -> torch.Tensor:
    """Read, decode and preprocess one image with Pillow (the reference path).

    Raises:
        ImageLoadError: the file is missing, unreadable, truncated or cannot be decoded.
    """
    return decode_image(read_image_bytes(path), path, size)


def decode_image(data: bytes, name: PathLike, size: int = IMAGE_SIZE) -> torch.Tensor:
    """Decode and preprocess checked encoded bytes (from :func:`read_image_bytes` or :func:`check_image_bytes`).

    Raises:
        ImageLoadError: the bytes cannot be decoded (``name`` says which image).
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            rgb = image.convert("RGB")  # forces the full decode
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ImageLoadError(name, f"cannot decode: {err}") from None
    return preprocess_pil(rgb, size)


def _make_batch(items: Sequence[tuple[int, torch.Tensor]]) -> ImageBatch:
    return ImageBatch(torch.stack([image for _, image in items]), torch.tensor([i for i, _ in items]))


class _PillowDataset(torch.utils.data.Dataset):
    """``(index, tensor)``, or ``(index, ImageLoadError)`` so the main process can count and warn."""

    def __init__(self, paths: Sequence[PathLike], size: int):
        self.paths, self.size = list(paths), size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        try:
            return index, load_image(self.paths[index], self.size)
        except ImageLoadError as err:
            return index, err


class PillowImageLoader:
    """Batches of preprocessed images with Pillow, decoded by ``num_workers`` DataLoader workers.

    Iterating yields :class:`ImageBatch` es of ``batch_size`` images (the last may be shorter), in path order,
    bad images skipped (see the module docstring). ``skipped`` counts them over the loader's life.
    """

    def __init__(
        self,
        paths: Sequence[PathLike],
        batch_size: int,
        image_size: int = IMAGE_SIZE,
        num_workers: int = 0,
        strict: bool = False,
    ):
        if batch_size < 1:
            raise ValueError(f"PillowImageLoader: batch_size must be >= 1, got {batch_size}")
        self.dataset = _PillowDataset(paths, image_size)
        self.batch_size, self.num_workers = batch_size, num_workers
        self.skipped = SkippedImages(strict=strict)

    def __iter__(self) -> Iterator[ImageBatch]:
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_size=self.batch_size, num_workers=self.num_workers, collate_fn=list
        )
        ready: list[tuple[int, torch.Tensor]] = []
        for items in loader:
            for index, result in items:
                if isinstance(result, ImageLoadError):
                    self.skipped.record(result)
                else:
                    ready.append((index, result))
            while len(ready) >= self.batch_size:
                yield _make_batch(ready[: self.batch_size])
                ready = ready[self.batch_size :]
        if ready:
            yield _make_batch(ready)


class _EncodedBatchSource:
    """DALI external source: batches of ``(encoded bytes, index)``, unreadable files skipped before decoding.

    Keeps the batches DALI has pulled but not yet delivered (``in_flight``: DALI prefetches), so that after a
    pipeline failure the failed batch can be taken out and the images pulled after it replayed, in order.
    """

    def __init__(self, paths: Sequence[PathLike], batch_size: int, skipped: SkippedImages):
        self.paths, self.batch_size, self.skipped = list(paths), batch_size, skipped
        self.next_path = 0
        self.replay: deque[tuple[int, bytes]] = deque()
        self.in_flight: deque[list[tuple[int, bytes]]] = deque()

    def take(self, count: int) -> list[tuple[int, bytes]]:
        """The next ``count`` readable images (fewer at the end): replayed ones first, then new paths."""
        items = []
        while len(items) < count and self.replay:
            items.append(self.replay.popleft())
        while len(items) < count and self.next_path < len(self.paths):
            index, self.next_path = self.next_path, self.next_path + 1
            try:
                items.append((index, read_image_bytes(self.paths[index])))
            except ImageLoadError as err:
                self.skipped.record(err)
        return items

    def has_next(self) -> bool:
        """Whether a readable image is left (reads ahead to the first one)."""
        if not self.replay:
            self.replay.extend(self.take(1))
        return bool(self.replay)

    def __call__(self):
        batch = self.take(self.batch_size)
        if not batch:
            raise StopIteration
        self.in_flight.append(batch)
        encoded = [np.frombuffer(data, dtype=np.uint8) for _, data in batch]
        indices = [np.array([index], dtype=np.int64) for index, _ in batch]
        return encoded, indices

    def delivered(self) -> None:
        self.in_flight.popleft()

    def take_failed(self) -> list[tuple[int, bytes]]:
        """The oldest undelivered batch (the one DALI failed on); the later ones go back to be replayed."""
        failed = self.in_flight.popleft()
        self.replay.extendleft(reversed([item for batch in self.in_flight for item in batch]))
        self.in_flight.clear()
        return failed


def _build_dali_pipeline(source, batch_size: int, image_size: int, device: str, num_threads: int):
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali import math as dmath

    @pipeline_def(
        batch_size=batch_size,
        num_threads=num_threads,
        device_id=torch.cuda.current_device() if device == "gpu" else None,
    )
    def pipeline():
        encoded, index = fn.external_source(
            source=source, num_outputs=2, batch=True, dtype=[types.UINT8, types.INT64]
        )
        shape = fn.peek_image_shape(encoded, adjust_orientation=False, dtype=types.INT32)  # [H, W, C]
        height, width = shape[0], shape[1]
        side = dmath.max(height, width)
        # crop window start = pos * (extent - side); choosing pos = floor(margin / 2) / margin makes it exactly
        # -floor(margin / 2), expand2square's offset (DALI rounds pos = 0.5 the other way for odd margins)
        pos_y = ((side - height) // 2) / dmath.max(side - height, 1)
        pos_x = ((side - width) // 2) / dmath.max(side - width, 1)
        image = fn.decoders.image(
            encoded, device="mixed" if device == "gpu" else "cpu", output_type=types.RGB, adjust_orientation=False
        )
        side = fn.cast(side, dtype=types.FLOAT)
        image = fn.crop(
            image,
            crop_h=side,
            crop_w=side,
            crop_pos_x=pos_x,
            crop_pos_y=pos_y,
            out_of_bounds_policy="pad",
            fill_values=list(PAD_COLOR),
        )
        image = fn.resize(
            image, resize_x=image_size, resize_y=image_size, interp_type=types.INTERP_CUBIC, antialias=True
        )
        image = fn.crop_mirror_normalize(
            image,
            dtype=types.FLOAT,
            output_layout="CHW",
            mean=[255 * m for m in CLIP_MEAN],
            std=[255 * s for s in CLIP_STD],
        )
        return image, index

    pipe = pipeline()
    pipe.build()
    return pipe


class DaliImageLoader:
    """Batches of preprocessed images from an NVIDIA DALI pipeline, through ``DALIGenericIterator``.

    Same batches as :class:`PillowImageLoader` (see the module docstring for the tolerance). ``device`` is
    ``"cpu"`` (DALI's CPU operators, ``device_id=None``) or ``"gpu"`` (nvJPEG ``"mixed"`` decoding on the current
    CUDA device; the images then arrive on that device).
    """

    def __init__(
        self,
        paths: Sequence[PathLike],
        batch_size: int,
        image_size: int = IMAGE_SIZE,
        device: Literal["cpu", "gpu"] = "cpu",
        num_threads: int = 2,
        strict: bool = False,
    ):
        if not platform.HAVE_DALI:
            raise RuntimeError("DaliImageLoader: nvidia.dali is not installed; use PillowImageLoader")
        if device not in ("cpu", "gpu"):
            raise ValueError(f"DaliImageLoader: device must be 'cpu' or 'gpu', got {device!r}")
        if device == "gpu" and not platform.HAVE_CUDA:
            raise ValueError("DaliImageLoader: device='gpu' needs CUDA")
        if batch_size < 1:
            raise ValueError(f"DaliImageLoader: batch_size must be >= 1, got {batch_size}")
        self.paths, self.batch_size, self.image_size = list(paths), batch_size, image_size
        self.device, self.num_threads = device, num_threads
        self.skipped = SkippedImages(strict=strict)

    def _iterator(self, source: _EncodedBatchSource):
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        pipe = _build_dali_pipeline(source, self.batch_size, self.image_size, self.device, self.num_threads)
        return DALIGenericIterator([pipe], ["images", "indices"], last_batch_policy=LastBatchPolicy.PARTIAL)

    def _decode_with_pillow(self, items: list[tuple[int, bytes]]) -> list[tuple[int, torch.Tensor]]:
        decoded = []
        for index, _ in items:
            try:
                decoded.append((index, load_image(self.paths[index], self.image_size)))
            except ImageLoadError as err:
                self.skipped.record(err)
        return decoded

    def _recover(self, source: _EncodedBatchSource) -> ImageBatch | None:
        """Decode the batch DALI failed on with Pillow, topped up to a full batch like the Pillow loader's."""
        failed = source.take_failed()
        log.warning(
            "DALI failed on the batch of %s; decoding it with Pillow", ", ".join(str(self.paths[i]) for i, _ in failed)
        )
        decoded = self._decode_with_pillow(failed)
        while len(decoded) < self.batch_size:
            more = source.take(self.batch_size - len(decoded))
            if not more:
                break
            decoded += self._decode_with_pillow(more)
        if not decoded:
            return None
        batch = _make_batch(decoded)
        return ImageBatch(batch.images.to(self._output_device()), batch.indices)

    def __iter__(self) -> Iterator[ImageBatch]:
        source = _EncodedBatchSource(self.paths, self.batch_size, self.skipped)
        while source.has_next():
            try:
                for outputs in self._iterator(source):
                    source.delivered()
                    yield ImageBatch(outputs[0]["images"], outputs[0]["indices"].reshape(-1).cpu())
                return
            except ImageLoadError:  # strict mode
                raise
            except RuntimeError:
                if not source.in_flight:
                    raise
                recovered = self._recover(source)
                if recovered is not None:
                    yield recovered

    def _output_device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if self.device == "gpu" else torch.device("cpu")


def make_image_loader(
    paths: Sequence[PathLike],
    batch_size: int,
    backend: Literal["auto", "dali", "pillow"] = "auto",
    image_size: int = IMAGE_SIZE,
    num_workers: int = 2,
    strict: bool = False,
) -> PillowImageLoader | DaliImageLoader:
    """DALI (on the GPU when CUDA is present) if installed and ``backend`` allows, else Pillow.

    ``num_workers`` is DALI's thread count, or the Pillow DataLoader's worker processes.
    """
    if backend not in ("auto", "dali", "pillow"):
        raise ValueError(f"make_image_loader: backend must be auto, dali or pillow, got {backend!r}")
    if backend == "dali" or (backend == "auto" and platform.HAVE_DALI):
        device = "gpu" if platform.HAVE_CUDA else "cpu"
        return DaliImageLoader(paths, batch_size, image_size, device, max(1, num_workers), strict)
    return PillowImageLoader(paths, batch_size, image_size, num_workers, strict)
