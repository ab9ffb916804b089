"""CLIP image preprocessing: the Pillow reference against an independent numpy computation, DALI against Pillow,
and bad images (missing, truncated, undecodable) skipped or raised."""
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata

from megatron_zero import platform
from megatron_zero.data import images
from megatron_zero.data.images import (
    CLIP_MEAN,
    CLIP_STD,
    DALI_MAX_ABS_DIFF,
    DALI_MEAN_ABS_DIFF,
    DaliImageLoader,
    ImageLoadError,
    PillowImageLoader,
    load_image,
)

needs_dali = pytest.mark.skipif(not platform.HAVE_DALI, reason="nvidia.dali is not installed")


def _synthetic() -> np.ndarray:
    """A smooth non-square test card: portrait 200 x 301, so an odd horizontal margin of 101."""
    yy, xx = np.mgrid[0:301, 0:200]
    return np.stack([xx * 255 // 200, yy * 255 // 301, ((xx + yy) % 64) * 4], -1).astype(np.uint8)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Real photos (square astronaut, landscape coffee and cat with an odd margin) and a synthetic portrait."""
    root = tmp_path_factory.mktemp("photos")
    arrays = {
        "astronaut": skdata.astronaut(),
        "coffee": skdata.coffee(),
        "chelsea": skdata.chelsea(),
        "synthetic": _synthetic(),
    }
    paths = []
    for name, array in arrays.items():
        path = root / f"{name}.jpg"
        Image.fromarray(array).save(path, quality=95)
        paths.append(str(path))
    return paths


@pytest.fixture(scope="module")
def bad_files(photos, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    good = Path(photos[0]).read_bytes()
    truncated = root / "truncated.jpg"
    truncated.write_bytes(good[: len(good) // 2])
    # passes the cheap end-marker check but cannot be decoded: DALI fails on it, Pillow too
    corrupt = root / "corrupt.jpg"
    corrupt.write_bytes(good[:600] + b"\x00" * 5000 + good[-2:])
    return {"missing": str(root / "missing.jpg"), "truncated": str(truncated), "corrupt": str(corrupt)}


def _reference(path: str) -> np.ndarray:
    """Independent LLaVA/CLIP preprocessing in numpy: pad-centre on the mean colour, bicubic resize, normalise."""
    rgb = np.asarray(Image.open(path).convert("RGB"))
    h, w, _ = rgb.shape
    side = max(h, w)
    canvas = np.empty((side, side, 3), dtype=np.uint8)
    canvas[:] = [int(m * 255) for m in CLIP_MEAN]
    top, left = (side - h) // 2, (side - w) // 2
    canvas[top : top + h, left : left + w] = rgb
    resized = np.asarray(Image.fromarray(canvas).resize((336, 336), Image.BICUBIC), dtype=np.float64) / 255
    return ((resized - np.array(CLIP_MEAN)) / np.array(CLIP_STD)).transpose(2, 0, 1)


def test_pillow_path_matches_independent_reference(photos):
    for path in photos:
        out = load_image(path)
        assert out.shape == (3, 336, 336) and out.dtype == torch.float32
        np.testing.assert_allclose(out.numpy(), _reference(path), atol=1e-5)


def test_padding_is_the_mean_colour_and_centred(tmp_path):
    # a white 40x20 (w x h) image: margins of 10 rows above and below, filled with the mean colour
    path = tmp_path / "white.png"
    Image.new("RGB", (40, 20), (255, 255, 255)).save(path)
    out = load_image(path, size=40)
    pad_normalised = (np.array([int(m * 255) for m in CLIP_MEAN]) / 255 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
    np.testing.assert_allclose(out[:, 0, 20].numpy(), pad_normalised, atol=1e-6)  # top row: padding
    np.testing.assert_allclose(out[:, 39, 20].numpy(), pad_normalised, atol=1e-6)  # bottom row: padding
    white = (1 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
    np.testing.assert_allclose(out[:, 20, 20].numpy(), white, atol=1e-6)  # centre: the image
    np.testing.assert_allclose(out[:, 12, :].numpy(), np.repeat(white[:, None], 40, 1), atol=1e-6)


@needs_dali
def test_dali_cpu_pipeline_matches_pillow_within_tolerance(photos):
    """Tolerance (normalised units): max |DALI - Pillow| <= 0.1 (about 7 grey levels), mean <= 0.005."""
    pillow = list(PillowImageLoader(photos, batch_size=3))
    dali = list(DaliImageLoader(photos, batch_size=3, device="cpu"))
    assert [b.indices.tolist() for b in dali] == [b.indices.tolist() for b in pillow] == [[0, 1, 2], [3]]
    for p, d in zip(pillow, dali):
        assert d.images.shape == p.images.shape and d.images.dtype == torch.float32
        diff = (d.images - p.images).abs()
        assert diff.max() <= DALI_MAX_ABS_DIFF, diff.amax(dim=(1, 2, 3))
        assert diff.mean(dim=(1, 2, 3)).max() <= DALI_MEAN_ABS_DIFF, diff.mean(dim=(1, 2, 3))


def _loaders(paths, **kwargs):
    made = [PillowImageLoader(paths, **kwargs)]
    if platform.HAVE_DALI:
        made.append(DaliImageLoader(paths, device="cpu", **kwargs))
    return made


def test_bad_images_are_skipped_with_warning_and_counted(photos, bad_files, caplog):
    paths = [photos[0], bad_files["missing"], photos[1], bad_files["truncated"], photos[2], bad_files["corrupt"],
             photos[3]]
    for loader in _loaders(paths, batch_size=2):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger=images.__name__):
            batches = list(loader)
        # the bad files leave no hole: the next images fill their places
        assert [b.indices.tolist() for b in batches] == [[0, 2], [4, 6]], type(loader).__name__
        assert loader.skipped.count == 3
        assert loader.skipped.reasons == {"file not found": 1, "truncated": 1, "cannot decode": 1}
        text = caplog.text
        for name in ("missing.jpg", "truncated.jpg", "corrupt.jpg"):
            assert name in text
        for batch in batches:  # the good images are the Pillow reference's (within DALI's tolerance)
            for index, image in zip(batch.indices.tolist(), batch.images):
                assert (image - load_image(paths[index])).abs().max() <= DALI_MAX_ABS_DIFF


@pytest.mark.parametrize("kind", ["missing", "truncated", "corrupt"])
def test_strict_mode_raises_with_the_file_name(photos, bad_files, kind):
    for loader in _loaders([photos[0], bad_files[kind], photos[1]], batch_size=2, strict=True):
        with pytest.raises(ImageLoadError) as err:
            list(loader)
        assert err.value.path == bad_files[kind] and bad_files[kind] in str(err.value)


def test_make_image_loader_picks_dali_when_installed(photos):
    loader = images.make_image_loader(photos, batch_size=2)
    assert isinstance(loader, DaliImageLoader if platform.HAVE_DALI else PillowImageLoader)
    assert isinstance(images.make_image_loader(photos, 2, backend="pillow"), PillowImageLoader)
    with pytest.raises(ValueError, match="backend"):
        images.make_image_loader(photos, 2, backend="opencv")
