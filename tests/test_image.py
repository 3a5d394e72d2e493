"""CLIP preprocessing (kosmos.image): pixels against open_clip's own transform, decoders, fast paths."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

import kosmos.image as kimage
from bench.preprocess import differences, reference
from kosmos.data.format import BadSample
from kosmos.data.samples import _image
from kosmos.data_tools.images import ImageOptions, normalize_image
from kosmos.image import clip_resize_crop, decode_image, jpeg_header
from tests.helpers import PHOTOS, photo

LOADER_BOUND = (1, 0.01)
"""(max, worst photo's mean) |loader - open_clip| in uint8 levels on the shipped photos: the same geometry
and PIL's filter in torch's uint8 kernel, off by one level at most (measured 1, 0.006)."""
PRESIZED_BOUND = (80, 2.5, 4.5)
"""(max, mean, worst photo's mean) for shards made with `--image-size 224 --crop center` (JPEG q90, 4:2:0),
decoded only: JPEG's loss (measured 59, 1.90, 3.36; the reference itself saved as q90 JPEG: the same)."""
SHARD256_BOUND = (3.0, 7.0)
"""(mean, worst photo's mean) for the converters' default 256 px shards resized by the loader: two
resamplings and JPEG (measured 1.93, 4.86; the largest difference, 144, is an edge moved by a fraction of
a pixel)."""


@pytest.fixture(scope="module")
def ref():
    return reference(224)


def _jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", **kw)
    return buf.getvalue()


def test_loader_matches_open_clip_on_the_shipped_photos(ref):
    """Shorter sides 172 to 872 (upscaled and downscaled, landscape and portrait, odd crop margins)."""
    mx, _, worst_mean = differences(PHOTOS, 224, ref)
    assert mx <= LOADER_BOUND[0] and worst_mean <= LOADER_BOUND[1], (mx, worst_mean)


def test_presized_shards_stay_within_jpeg_loss_of_open_clip(ref):
    opts = ImageOptions(image_size=224, crop="center")
    mx, mean, worst_mean = differences(PHOTOS, 224, ref, lambda d: normalize_image(d, opts)[0])
    assert mx <= PRESIZED_BOUND[0] and mean <= PRESIZED_BOUND[1] and worst_mean <= PRESIZED_BOUND[2], (
        mx, mean, worst_mean)
    opts = ImageOptions(image_size=256)
    _, mean, worst_mean = differences(PHOTOS, 224, ref, lambda d: normalize_image(d, opts)[0])
    assert mean <= SHARD256_BOUND[0] and worst_mean <= SHARD256_BOUND[1], (mean, worst_mean)


def test_a_large_jpeg_decoded_at_reduced_scale_keeps_the_geometry(ref):
    """1481x999 decodes at 1/2 (741x500, rounded up): the resize and crop still follow the original size
    (from 741x500 every edge moves by a fraction of a pixel: max 168, mean 8.7). What remains is libjpeg's
    DCT scaling against a full decode (measured max 40, mean 2.44; at 1/4, `DRAFT_GAP` 1: 100, 5.43)."""
    with Image.open(PHOTOS[14]) as im:
        big = im.convert("RGB").resize((1481, 999), Image.Resampling.BICUBIC)
    data = _jpeg(big, quality=95)
    with Image.open(io.BytesIO(data)) as im:
        im.draft("RGB", (2 * 224, 2 * 224))
        assert im.size == (741, 500)  # the reduced decode is what is measured here
        r = ref(Image.open(io.BytesIO(data)))
    d = (decode_image(data).int() - r).abs()
    assert d.float().mean() < 3.0 and d.max() < 64, (d.max(), d.float().mean())


def test_an_image_at_the_towers_size_is_only_converted(monkeypatch):
    data = photo(2, (224, 224))
    expected = torch.from_numpy(np.array(Image.open(io.BytesIO(data)).convert("RGB"))).permute(2, 0, 1)

    def no_resize(*a, **k):
        raise AssertionError("resized an image already at the tower's size")

    monkeypatch.setattr(torch.nn.functional, "interpolate", no_resize)
    out = decode_image(data)
    assert out.is_contiguous() and out.dtype == torch.uint8 and torch.equal(out, expected)
    monkeypatch.setattr(kimage, "_torchvision_decode_jpeg", lambda: None)  # PIL's path too
    assert torch.equal(decode_image(data), expected)
    assert torch.equal(clip_resize_crop(Image.open(io.BytesIO(data))), expected)


def test_torchvision_and_pil_decode_the_same_pixels(monkeypatch):
    datas = [p.read_bytes() for p in PHOTOS]
    fast = [decode_image(d) for d in datas]
    monkeypatch.setattr(kimage, "_torchvision_decode_jpeg", lambda: None)
    for d, f in zip(datas, fast, strict=True):
        assert torch.equal(f, decode_image(d))


def _in_mode(mode: str) -> tuple[bytes, str]:
    """A 451x300 photo in PIL mode `mode` (with a varying alpha, a palette with a transparent entry, 16-bit
    values, an EXIF orientation), encoded in a format that keeps the mode; (bytes, suffix)."""
    with Image.open(PHOTOS[3]) as im:
        rgb = im.convert("RGB")
    alpha = Image.linear_gradient("L").resize(rgb.size)
    buf, fmt = io.BytesIO(), "PNG"
    if mode in ("RGBA", "LA"):
        img = rgb.convert(mode[:-1])
        img.putalpha(alpha)
    elif mode == "P":
        img = rgb.quantize(64)
        img.info["transparency"] = 0
    elif mode == "I;16":
        img = Image.fromarray(np.asarray(rgb.convert("L"), dtype=np.uint16) * 257)  # 16-bit grey, 0..65535
    elif mode in ("I", "F"):
        img, fmt = rgb.convert("L").convert(mode), "TIFF"
    elif mode == "CMYK":
        img, fmt = rgb.convert("CMYK"), "JPEG"
    elif mode == "EXIF":
        exif = Image.Exif()
        exif[0x0112] = 6  # orientation: rotate 90
        rgb.save(buf, format="JPEG", exif=exif.tobytes())
        return buf.getvalue(), ".jpg"
    else:  # 1, L, RGB
        img = rgb.convert(mode)
    img.save(buf, format=fmt)
    return buf.getvalue(), {"PNG": ".png", "TIFF": ".tif", "JPEG": ".jpg"}[fmt]


MODES = ["RGB", "L", "1", "P", "RGBA", "LA", "I;16", "I", "F", "CMYK", "EXIF"]


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_is_what_open_clip_gives(mode, tmp_path):
    """Training's decode_image and the load_image of generation and evaluation give open_clip's eval pixels
    for every mode PIL opens (kosmos.image.TORCH_MODES says what each mode does): exactly for the modes PIL
    resizes in their own mode, within a level for RGB and grey (torch's uint8 kernel)."""
    from kosmos.image import TORCH_MODES, load_image

    size = 224  # a 451x300 photo: decoded whole (no reduced JPEG decode, which costs detail: see below)
    data, suffix = _in_mode(mode)
    path = tmp_path / f"image{suffix}"
    path.write_bytes(data)
    with Image.open(io.BytesIO(data)) as im:
        assert mode in ("EXIF", im.mode) or (mode, im.mode) == ("I;16", "I;16"), (mode, im.mode)
        want = reference(size)(im)
        opened = im.mode
        convert_first = clip_resize_crop(im.convert("RGB"), size).int()
    bound = 1 if opened in TORCH_MODES else 0
    for got in (decode_image(data, size), load_image(path, size)):
        assert got.shape == (3, size, size)
        assert (got.int() - want).abs().max() <= bound, (mode, (got.int() - want).abs().max())
    if mode in ("P", "1", "RGBA", "LA"):  # the order matters here: converting first is not open_clip's
        assert (convert_first - want).abs().max() > 10, mode


def test_jpeg_header():
    for p in PHOTOS:
        data = p.read_bytes()
        with Image.open(p) as im:
            assert jpeg_header(data) == (*im.size, 3)
    with Image.open(PHOTOS[0]) as im:
        progressive = _jpeg(im.convert("RGB").resize((300, 200)), progressive=True)
    assert jpeg_header(progressive) == (300, 200, 3)
    data = PHOTOS[0].read_bytes()
    for junk in (b"", b"\xff\xd8", data[:20], b"GIF89a" + data, b"\xff\xd8\x00\x00" + data[4:]):
        assert jpeg_header(junk) is None


def test_bad_jpegs_are_counted_not_decoded():
    data = photo(1, (300, 200))
    for cut in (data[: len(data) // 2], data[:200], data[:-30]):
        with pytest.raises(BadSample, match="bad_image"):
            _image(cut, 224)


def test_a_decompression_bomb_is_refused_before_decoding(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # a 300x200 JPEG is then > 2x the limit
    with pytest.raises(BadSample, match="image_too_large"):
        _image(photo(1, (300, 200)), 224)
