"""CLIP preprocessing: bicubic resize of the shorter side and centre crop, to uint8 pixels.

Data workers ship uint8 pixels (4x less to copy between processes than floats); the model normalises
them itself with its tower's mean and std (`VisionEncoder.normalize`), so nothing outside the model needs
to know them.
"""

from __future__ import annotations

from pathlib import Path

import torch

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
"""OpenAI CLIP's pixel statistics (open_clip's default; a pretrained tag may bring its own)."""


def clip_resize_crop(image, size: int = 224) -> torch.Tensor:
    """PIL image (any mode) -> (3, size, size) uint8: shorter side resized to `size` (bicubic), centre crop."""
    import numpy as np
    from PIL import Image

    image = image.convert("RGB")
    w, h = image.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    image = image.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    image = image.crop((left, top, left + size, top + size))
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).contiguous()  # (3, S, S)


def load_image(path: str | Path, size: int = 224) -> torch.Tensor:
    """An image file -> (3, size, size) uint8 pixels."""
    from PIL import Image

    with Image.open(path) as im:
        return clip_resize_crop(im, size)
