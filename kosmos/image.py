"""CLIP image preprocessing: bicubic resize of the shorter side, centre crop, CLIP mean/std."""

from __future__ import annotations

import torch

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_preprocess(image, size: int = 224) -> torch.Tensor:
    """PIL image (any mode) -> (3, size, size) float tensor, normalised as CLIP was trained."""
    import numpy as np
    from PIL import Image

    image = image.convert("RGB")
    w, h = image.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    image = image.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    image = image.crop((left, top, left + size, top + size))
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)  # (3, H, W)
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    return (x - mean) / std


def load_image(path, size: int = 224) -> torch.Tensor:
    from PIL import Image

    with Image.open(path) as im:
        return clip_preprocess(im, size)
