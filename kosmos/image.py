"""CLIP preprocessing: bicubic resize of the shorter side and centre crop, to uint8 pixels.

The geometry is open_clip's (torchvision `Resize(size, bicubic)` + `CenterCrop(size)`: the longer side
becomes `int(size * long / short)`, the crop starts at `round((side - size) / 2)`); the resampling runs on
uint8 pixels in torch's antialiased bicubic kernel (PIL's filter, vectorised: within one uint8 level of
PIL's result). An image already `size` x `size` (shards pre-sized at conversion, `--image-size 224 --crop
center`) is only converted. Measured against open_clip's own preprocessing on the shipped photos:
docs/data.md, "Image preprocessing".

Data workers ship uint8 pixels (4x less to copy between processes than floats); the model normalises
them itself with its tower's mean and std (`VisionEncoder.normalize`), so nothing outside the model needs
to know them.
"""

from __future__ import annotations

import io
from functools import cache
from pathlib import Path

import torch

from kosmos.untrusted import ImageError, image_errors, open_image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
"""OpenAI CLIP's pixel statistics (open_clip's default; a pretrained tag may bring its own)."""

DRAFT_GAP = 2
"""A JPEG whose shorter side is at least `DRAFT_GAP * size` is decoded at a reduced scale (libjpeg's DCT
scaling: 1/2, 1/4, 1/8) that keeps the shorter side at least that, then resized exactly. 2 is what
`Image.thumbnail` does; against a full decode it cost a detailed 1481x999 photo a mean of 2.4 uint8 levels
(1 would be faster: 5.4)."""


def resized_size(width: int, height: int, size: int) -> tuple[int, int]:
    """open_clip's `Resize(size)` geometry (torchvision's): the shorter side becomes `size`, the longer
    `int(size * long / short)`; (new width, new height)."""
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(size * long / short)
    return (size, new_long) if width <= height else (new_long, size)


def crop_origin(width: int, height: int, size: int) -> tuple[int, int]:
    """open_clip's `CenterCrop(size)` origin (top, left): `round((side - size) / 2)`."""
    return int(round((height - size) / 2.0)), int(round((width - size) / 2.0))


def resize_crop(pixels: torch.Tensor, size: int = 224,
                original: tuple[int, int] | None = None, contiguous: bool = True) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, size, size) uint8, contiguous: shorter side resized to `size` (bicubic,
    antialiased), centre crop; a `size` x `size` image is only transposed. `original`: (width, height) the
    geometry is computed from, when `pixels` is a reduced decode of a larger image. With `contiguous=False`
    nothing is copied out: a `size` x `size` image comes back as a (3, size, size) view of `pixels` (channels
    last in memory), a resized one as the crop view of the resized image (channels first); the data
    loader's collate copies either into the micro-batch."""
    import numpy as np

    h, w = pixels.shape[0], pixels.shape[1]
    x = pixels.permute(2, 0, 1)  # (3, H, W) over channels-last memory: what the fast uint8 kernel reads
    if (h, w) != (size, size):
        nw, nh = resized_size(*(original or (w, h)), size)
        x = torch.nn.functional.interpolate(x[None], size=(nh, nw), mode="bicubic", antialias=True)[0]
        top, left = crop_origin(nw, nh, size)
        x = x[:, top:top + size, left:left + size]
        return x.contiguous() if contiguous else x
    if not contiguous:
        return x
    return torch.from_numpy(np.ascontiguousarray(x.numpy()))  # numpy transposes uint8 ~4x faster than torch


TORCH_MODES = ("RGB", "L")
"""PIL modes whose resampling gives the same pixels before and after the conversion to RGB (grey is one
channel copied three times): converted first, then resized in torch on uint8. Every other mode is resized by
PIL in its own mode, then converted, as open_clip's eval transform does (`Resize`, `CenterCrop`, then
`_convert_to_rgb`; OpenAI's CLIP the same), so that the pixels are open_clip's exactly:

    mode            what the conversion does (PIL's convert("RGB"), after the resize)
    RGBA, LA, PA    alpha dropped: the colour stored under a transparent pixel shows (often black); the
                    resize, in RGBA, mixes colours weighted by alpha (PIL premultiplies)
    P               palette looked up; resized with NEAREST (PIL resizes palette images so), transparency
                    ignored
    1               bilevel: NEAREST resize, then 0 -> black, 1 -> white
    I;16, I, F      16/32-bit and float: resized in their own range, then clipped to 0..255, so a 16-bit
                    photo (values up to 65535) comes out nearly white, as it does for open_clip
    CMYK            PIL's naive conversion (no colour profile): R = 255 - C - K, ...
    YCbCr, LAB, HSV PIL's conversion
    EXIF            the orientation tag is not applied (open_clip does not apply it): a photo stored
                    sideways is seen sideways; rotate such files at conversion if that matters

Checked mode by mode against open_clip's transform in tests/test_image.py (every loader: training's
`decode_image`, generation's and evaluation's `load_image`)."""


def clip_resize_crop(image, size: int = 224, original: tuple[int, int] | None = None,
                     contiguous: bool = True) -> torch.Tensor:
    """PIL image (any mode) -> (3, size, size) uint8: shorter side resized to `size` (bicubic), centre crop
    (`original`, `contiguous`: as in `resize_crop`). A mode outside `TORCH_MODES` is resized by PIL in its
    own mode and converted after, as open_clip does."""
    import numpy as np

    if image.mode not in TORCH_MODES:
        image = _pil_resize_crop(image, size, original).convert("RGB")
    elif image.mode != "RGB":
        image = image.convert("RGB")
    return resize_crop(torch.from_numpy(np.array(image, dtype=np.uint8)), size, original, contiguous)


def _pil_resize_crop(image, size: int, original: tuple[int, int] | None = None):
    """open_clip's eval geometry done by PIL in the image's own mode (torchvision's `Resize(size, bicubic)`
    on a PIL image is `image.resize(..., BICUBIC)`, which PIL turns into NEAREST for modes 1 and P), then
    `CenterCrop(size)`. `original`: the (width, height) the geometry is computed from (a reduced decode)."""
    from PIL import Image

    w, h = original or image.size
    if (w, h) != (size, size) or image.size != (size, size):
        image = image.resize(resized_size(w, h, size), Image.Resampling.BICUBIC)
    top, left = crop_origin(*image.size, size)
    return image.crop((left, top, left + size, top + size))


def jpeg_header(data: bytes) -> tuple[int, int, int] | None:
    """(width, height, components) from a JPEG's frame header; None when `data` is no JPEG or the header is
    not found before the image data."""
    if data[:2] != b"\xff\xd8":
        return None
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # markers without a length
            i += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image, start of scan: no frame header before them
            return None
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # SOF0..SOF15
            if i + 10 > n:
                return None
            height, width = int.from_bytes(data[i + 5:i + 7], "big"), int.from_bytes(data[i + 7:i + 9], "big")
            return (width, height, data[i + 9]) if width and height else None
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return None


@cache
def _torchvision_decode_jpeg():
    """torchvision's JPEG decoder (libjpeg-turbo, the pixels PIL decodes, without PIL's Python around it),
    or None where its image extension does not load. It calls the operator behind
    `torchvision.io.decode_jpeg` (RGB, no EXIF rotation, as PIL decodes here) directly: the Python function
    around it costs as much as a tenth of a 224 px decode (a deprecation warning per call, usage logging).
    Checked on a probe image against PIL's pixels; anything else falls back to PIL."""
    import numpy as np
    from PIL import Image

    try:
        from torchvision.io import ImageReadMode

        op, rgb = torch.ops.image.decode_jpeg, ImageReadMode.RGB.value
        probe = io.BytesIO()
        Image.effect_noise((16, 16), 64).convert("RGB").save(probe, format="JPEG")
        got = op(torch.frombuffer(bytearray(probe.getvalue()), dtype=torch.uint8), rgb, False)
        with Image.open(probe) as im:
            want = torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)
        if got.shape != want.shape or (got.int() - want.int()).abs().max() > 1:
            return None
    except Exception:  # noqa: BLE001 - no extension, a broken build, another signature: PIL decodes everything
        return None
    return lambda data: op(torch.frombuffer(bytearray(data), dtype=torch.uint8), rgb, False)


def decode_image(data: bytes, size: int = 224, contiguous: bool = True) -> torch.Tensor:
    """Encoded image bytes -> (3, size, size) uint8 (`contiguous`: as in `resize_crop`; the data loader asks
    for views and copies them into its micro-batch). A grey or colour JPEG that needs no reduced decode is
    decoded by torchvision (PIL's pixels, without PIL's Python around the decode); everything else by PIL,
    a large JPEG at a reduced scale (`DRAFT_GAP`). Bad data raises `kosmos.untrusted.ImageError` with its
    reason (``decompression_bomb`` for an image over PIL's `Image.MAX_IMAGE_PIXELS`, refused from its
    header)."""
    from PIL import Image

    header = jpeg_header(data)
    if header is not None:
        w, h, components = header
        limit = Image.MAX_IMAGE_PIXELS
        decode = _torchvision_decode_jpeg()
        if (decode is not None and components in (1, 3) and (limit is None or w * h <= limit)
                and min(w, h) < 2 * DRAFT_GAP * size):  # PIL's draft would not reduce it
            try:
                pixels = decode(data)  # (3, H, W) over (H, W, 3) memory
            except Exception:  # noqa: BLE001 - a bad JPEG: PIL below says what is wrong with it
                pass
            else:
                return resize_crop(pixels.permute(1, 2, 0), size, contiguous=contiguous)
    with open_image(data) as im, image_errors():
        original = im.size
        im.draft("RGB", (DRAFT_GAP * size, DRAFT_GAP * size))
        return clip_resize_crop(im, size, original, contiguous)


def load_image(path: str | Path, size: int = 224) -> torch.Tensor:
    """An image file -> (3, size, size) uint8 pixels. A file that is missing or no usable image raises
    `kosmos.untrusted.ImageError` naming its reason (``missing_image``, ``decompression_bomb``,
    ``corrupt_image``, ...) and the path."""
    try:
        with open_image(path) as im, image_errors():
            return clip_resize_crop(im, size)
    except ImageError as e:
        if str(path) in e.detail:
            raise
        raise ImageError(e.reason, f"{path}: {e.detail}" if e.detail else str(path)) from None
