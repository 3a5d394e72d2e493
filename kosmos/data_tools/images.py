"""Image normalisation for the converters.

``normalize_image`` decodes any image (EXIF orientation applied, every mode converted to RGB, transparency
over white, 16-bit scaled), applies the paper's filters, resizes so the shorter side is at most
``image_size`` (never upscaled; with ``crop="center"`` exactly, then the centre square is kept) and encodes
it as JPEG; a bad image raises ``Skip`` with its reason.
``ImageRef`` says where an input image's bytes are (a file or a byte range of a tar).
"""

from __future__ import annotations

import hashlib
import io
import math
import re
from dataclasses import dataclass

from kosmos.data.format import IMAGE_SUFFIXES  # noqa: F401 - the converters' image files, imported from here
from kosmos.data_tools.records import Skip
from kosmos.data_tools.tables import open_regular
from kosmos.untrusted import ImageError, image_errors, open_image

JPEG_MAX_SIDE = 65_500
"""The longest side libjpeg can encode: an image longer than this after resizing is skipped
(``too_large_for_jpeg``)."""


@dataclass
class ImageOptions:
    """How images are normalised and filtered."""

    image_size: int = 256
    """Resize so the shorter side is at most this (aspect kept, never upscaled); 0 keeps the size."""
    crop: str = "none"
    """``center``: resize the shorter side to ``image_size`` (a smaller image too) and keep the centre
    square, as CLIP's preprocessing does: with ``--image-size 224 --crop center`` shards hold the tower's
    input and the loader only decodes. ``none`` keeps the whole image."""
    jpeg_quality: int = 90
    """JPEG quality of the re-encoded image."""
    min_image_size: int = 64
    """Drop images whose width or height is under this (the paper's 64x64 filter); 0 disables."""
    drop_single_colour: bool = True
    """Drop images of one single colour (the paper's filter)."""
    max_pixels: int = 89_478_485
    """Images with more pixels than this are decompression bombs and are skipped undecoded."""
    jpeg_draft_gap: float = 1.0
    """JPEGs are decoded at a reduced scale (libjpeg DCT scaling: 1/2, 1/4, 1/8) that leaves the shorter
    side at least ``jpeg_draft_gap * image_size``, then resized exactly. 1.0 is fastest (the DCT scaling is
    itself a proper low-pass); 2.0 is what ``Image.thumbnail`` does, a little closer to exact resampling at
    some cost in speed; 0 decodes at full size. With ``crop="center"`` at least 2.0 (pixels for the tower:
    within JPEG's loss of CLIP's own preprocessing)."""

    def __post_init__(self) -> None:
        if self.image_size < 0:
            raise ValueError(f"image_size must be >= 0, got {self.image_size}")
        if self.crop not in ("none", "center"):
            raise ValueError(f"crop must be 'none' or 'center', got {self.crop!r}")
        if self.crop == "center" and not self.image_size:
            raise ValueError("crop 'center' needs an image_size > 0")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be in 1..100, got {self.jpeg_quality}")
        if self.min_image_size < 0:
            raise ValueError(f"min_image_size must be >= 0, got {self.min_image_size}")
        if self.max_pixels <= 0:
            raise ValueError(f"max_pixels must be > 0, got {self.max_pixels}")


_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\x00-\x20\x7f]+")


def url_problem(url: str) -> str | None:
    """``no_url`` for an empty URL, ``bad_url`` for one img2dataset cannot fetch (not ``scheme://...``, or
    with spaces or control characters), None for a good one. The same names in ``data_tools.urls`` (a URL
    left out of the list) and the interleaved converter (an image reference that is no usable URL and no
    file under the images roots); ``missing_image`` there is a usable reference whose image was not found."""
    if not url:
        return "no_url"
    return None if _URL.fullmatch(url) else "bad_url"


def url_hashes(url: str) -> list[str]:
    """File stems under which an image downloaded from ``url`` may be stored (sha256, sha1, md5)."""
    b = url.encode("utf-8")
    return [hashlib.sha256(b).hexdigest(), hashlib.sha1(b).hexdigest(), hashlib.md5(b).hexdigest()]


def _to_rgb(img):  # PIL.Image -> PIL.Image (RGB)
    from PIL import Image

    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I", "F") or mode.startswith("I;16"):
        import numpy as np

        arr = np.asarray(img).astype(np.float64)
        if mode.startswith("I;16") or (arr.size and arr.max() > 255):
            arr = arr / 257.0  # 16-bit range -> 8-bit
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")
        return img.convert("RGB")
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        if img.mode == "RGB":
            return img
        mode = "RGBA"
    if mode in ("LA", "PA", "La", "RGBa"):
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode == "L" and "transparency" in img.info:
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode == "RGBA":
        background = Image.new("RGB", img.size, (255, 255, 255))
        background.paste(img, mask=img.getchannel("A"))
        return background
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV, RGBX ...


def normalize_image(data: bytes, opts: ImageOptions) -> tuple[bytes, tuple[int, int], tuple[int, int]]:
    """Decode, filter, resize and re-encode one image.

    Returns ``(jpeg_bytes, (width, height) after resizing, (width, height) of the original)``.
    Raises ``Skip`` with reason ``empty_image``, ``corrupt_image``, ``truncated_image``,
    ``decompression_bomb``, ``image_too_small``, ``single_colour_image``, ``unsupported_image``,
    ``too_large_for_jpeg`` (a side over ``JPEG_MAX_SIDE`` after resizing, e.g. a 70000x80 banner) or
    ``unencodable_image``.
    """
    from PIL import Image, ImageOps

    if not data:
        raise Skip("empty_image")
    try:
        img = open_image(data, opts.max_pixels)  # reads the header only; refuses a bomb before decoding
        width, height = img.size
        if opts.min_image_size and min(width, height) < opts.min_image_size:
            raise Skip("image_too_small", f"{width}x{height}")
        with image_errors():
            gap = max(opts.jpeg_draft_gap, 2.0) if opts.crop == "center" and opts.jpeg_draft_gap else (
                opts.jpeg_draft_gap)
            if opts.image_size and gap and img.format == "JPEG":
                # Let libjpeg decode at a reduced scale that still leaves at least the target size
                # (times the gap): decoding and resizing get several times faster.
                scale = gap * opts.image_size / min(width, height)
                if scale < 1:
                    img.draft(None, (math.ceil(width * scale), math.ceil(height * scale)))
            img.load()
            try:
                ImageOps.exif_transpose(img, in_place=True)
            except Exception:  # noqa: BLE001 - a broken EXIF block is no reason to drop the image
                pass
            img = _to_rgb(img)
    except ImageError as e:  # a decoder failure drops this image, never the whole conversion
        raise Skip(e.reason, e.detail) from None

    w, h = img.size
    if opts.crop == "center":  # open_clip's geometry (from the size before a reduced decode), then its crop
        ow, oh = (width, height) if (w >= h) == (width >= height) else (height, width)  # EXIF turns
        new = tuple(int(opts.image_size * v / min(ow, oh)) for v in (ow, oh))
        if new != (w, h):
            img = img.resize(new, Image.Resampling.BICUBIC, reducing_gap=3.0)
        left, top = int(round((new[0] - opts.image_size) / 2.0)), int(round((new[1] - opts.image_size) / 2.0))
        img = img.crop((left, top, left + opts.image_size, top + opts.image_size))
    elif opts.image_size and min(w, h) > opts.image_size:
        s = opts.image_size / min(w, h)
        new = (max(opts.image_size, round(w * s)), opts.image_size) if w >= h else (
            opts.image_size, max(opts.image_size, round(h * s)))
        img = img.resize(new, Image.Resampling.BICUBIC, reducing_gap=3.0)
    if opts.drop_single_colour:
        lo_hi = img.getextrema()
        if all(lo == hi for lo, hi in lo_hi):
            raise Skip("single_colour_image")
    if max(img.size) > JPEG_MAX_SIDE:
        raise Skip("too_large_for_jpeg", f"{img.width}x{img.height}")
    buf = io.BytesIO()
    try:
        img.save(buf, format="JPEG", quality=opts.jpeg_quality)
    except (OSError, ValueError) as e:  # an encoder failure drops this image, not its whole document
        raise Skip("unencodable_image", f"{type(e).__name__}: {e}") from None
    return buf.getvalue(), img.size, (width, height)


@dataclass(frozen=True)
class ImageRef:
    """Where an image's bytes are: a file, or a byte range of a tar member."""

    path: str
    offset: int = -1
    size: int = -1

    def read(self) -> bytes:
        """The image bytes; ``Skip('missing_image')`` when the file is gone, ``Skip('unreadable_image')``
        when it cannot be read, ``Skip('not_a_regular_file')`` for a FIFO, socket or device."""
        try:
            with open_regular(self.path) as f:
                if self.offset < 0:
                    return f.read()
                f.seek(self.offset)
                return f.read(self.size)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise Skip("missing_image", self.path) from None
        except ValueError as e:  # a path the OS refuses (a NUL character in it)
            raise Skip("bad_image_path", f"{self.path!r}: {e}") from None
        except OSError as e:
            raise Skip("unreadable_image", f"{self.path}: {e}") from None
