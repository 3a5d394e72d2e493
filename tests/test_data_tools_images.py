"""Image normalisation: modes, EXIF orientation, resizing, the paper's filters, bad images."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from kosmos.data_tools.images import ImageOptions, normalize_image
from kosmos.data_tools.records import Skip
from kosmos.data_tools.writer import sanitize_key
from tests.helpers import BAD_REASONS, bad_image, image_size, photo


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _decode(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def _textured(mode: str, size=(100, 80)) -> Image.Image:
    rgb = Image.open(io.BytesIO(photo(0, size))).convert("RGB")
    return rgb.convert(mode)


@pytest.mark.parametrize("mode", ["L", "P", "CMYK", "1", "RGB", "YCbCr"])
def test_any_mode_becomes_rgb_jpeg(mode):
    fmt = "TIFF" if mode == "CMYK" else "PNG"
    if mode == "YCbCr":
        fmt = "JPEG"
    out, size, orig = normalize_image(_encode(_textured(mode), fmt), ImageOptions())
    img = _decode(out)
    assert img.format == "JPEG" and img.mode == "RGB"
    assert size == orig == (100, 80)


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_transparency_goes_over_white(mode):
    img = _textured("RGB").convert("RGBA")
    alpha = Image.new("L", img.size, 255)
    alpha.paste(0, (0, 0, 50, 80))  # left half fully transparent
    img.putalpha(alpha)
    if mode == "LA":
        img = img.convert("LA")
    out = _decode(normalize_image(_encode(img, "PNG"), ImageOptions(jpeg_quality=95))[0])
    left = np.asarray(out)[:, :40]
    assert left.min() > 240  # white, not black


def test_palette_with_transparency_over_white():
    img = _textured("RGB").convert("P")
    img.info["transparency"] = img.getpixel((0, 0))
    data = _encode(img, "PNG", transparency=img.getpixel((0, 0)))
    out = _decode(normalize_image(data, ImageOptions())[0])
    assert out.mode == "RGB"


def test_16_bit_greyscale_is_scaled_not_clipped():
    arr = (np.linspace(0, 65535, 100 * 80).reshape(80, 100)).astype(np.uint16)
    img = Image.fromarray(arr)
    assert img.mode.startswith("I")
    out = np.asarray(_decode(normalize_image(_encode(img, "PNG"), ImageOptions(jpeg_quality=100))[0]))
    assert out.shape == (80, 100, 3)
    assert 100 < out.mean() < 155  # a ramp over the whole range, not saturated white


def test_exif_orientation_is_applied():
    img = _textured("RGB", (120, 80))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    out, size, orig = normalize_image(_encode(img, "JPEG", exif=exif.tobytes()), ImageOptions())
    assert orig == (120, 80)
    assert size == (80, 120) == image_size(out)


@pytest.mark.parametrize(("src", "limit", "want"), [
    ((600, 400), 256, (384, 256)),
    ((400, 600), 256, (256, 384)),
    ((300, 300), 256, (256, 256)),
    ((200, 100), 256, (200, 100)),  # never upscaled
    ((600, 400), 0, (600, 400)),    # 0 keeps the size
])
def test_resize_shorter_side_aspect_kept(src, limit, want):
    out, size, _ = normalize_image(photo(1, src), ImageOptions(image_size=limit))
    assert size == want == image_size(out)


@pytest.mark.parametrize("src", [(600, 400), (400, 601), (2000, 1001), (300, 224), (200, 100), (224, 224)])
def test_center_crop_presizes_to_the_tower(src):
    """`--image-size 224 --crop center`: every image (a smaller one upscaled) becomes the 224 x 224 centre
    that CLIP's preprocessing cuts, so the loader only decodes it."""
    data = photo(5, src)
    out, size, orig = normalize_image(data, ImageOptions(image_size=224, crop="center", jpeg_quality=95))
    assert size == (224, 224) == image_size(out) and orig == src
    w, h = src  # the same pixels as the loader's own resize and crop of the original, up to JPEG's loss
    expected = np.asarray(_decode(data).convert("RGB").resize(
        (224, int(224 * h / w)) if w <= h else (int(224 * w / h), 224), Image.Resampling.BICUBIC))
    top, left = round((expected.shape[0] - 224) / 2), round((expected.shape[1] - 224) / 2)
    diff = np.abs(np.asarray(_decode(out), dtype=np.float32) - expected[top:top + 224, left:left + 224])
    assert diff.mean() < 3.0, diff.mean()


def test_center_crop_follows_exif_orientation():
    img = Image.open(io.BytesIO(photo(6, (400, 300)))).convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: shown as 300x400
    out, size, _ = normalize_image(_encode(img, "JPEG", exif=exif.tobytes()), ImageOptions(image_size=224,
                                                                                            crop="center"))
    assert size == (224, 224) == image_size(out)


def test_large_jpeg_uses_reduced_decode_but_exact_size():
    out, size, orig = normalize_image(photo(2, (2000, 1000)), ImageOptions(image_size=100))
    assert orig == (2000, 1000) and size == (200, 100) == image_size(out)


@pytest.mark.parametrize("reason", BAD_REASONS)
def test_bad_images_skip_with_reason(reason):
    with pytest.raises(Skip) as e:
        normalize_image(bad_image(reason), ImageOptions())
    assert e.value.reason == reason


def test_filters_can_be_disabled():
    opts = ImageOptions(min_image_size=0, drop_single_colour=False)
    normalize_image(bad_image("image_too_small"), opts)
    normalize_image(bad_image("single_colour_image"), opts)


def test_max_pixels_option():
    with pytest.raises(Skip) as e:
        normalize_image(photo(0, (300, 300)), ImageOptions(max_pixels=300 * 300 - 1))
    assert e.value.reason == "decompression_bomb"


def test_options_are_checked():
    with pytest.raises(ValueError, match="jpeg_quality"):
        ImageOptions(jpeg_quality=0)
    with pytest.raises(ValueError, match="crop must be 'none' or 'center', got 'middle'"):
        ImageOptions(crop="middle")
    with pytest.raises(ValueError, match="crop 'center' needs an image_size"):
        ImageOptions(image_size=0, crop="center")


def test_sanitize_key():
    assert sanitize_key("a/b.c d") == "a_b_c_d"
    assert sanitize_key("000000123") == "000000123"
    assert sanitize_key("..") == "_"


def test_reduced_scale_jpeg_decode_stays_close_to_exact_resize():
    src = photo(0, (1024, 1024))  # astronaut
    fast = np.asarray(_decode(normalize_image(src, ImageOptions(jpeg_quality=95))[0]), dtype=np.float32)
    exact = np.asarray(_decode(normalize_image(src, ImageOptions(jpeg_quality=95, jpeg_draft_gap=0))[0]),
                       dtype=np.float32)
    assert fast.shape == exact.shape == (256, 256, 3)
    assert np.abs(fast - exact).mean() < 3.0  # out of 255
