"""CLIP image preprocessing: bicubic resize of the shorter side, centre crop, CLIP mean/std.

Split in two so that data workers ship uint8 pixels (4x less to copy between processes) and the
normalisation runs on the accelerator: `clip_resize_crop` in the worker, `clip_normalize` on the device.
"""

from __future__ import annotations

import torch

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


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


def clip_normalize(pixels: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 (..., 3, H, W) -> float, scaled to [0, 1] and normalised with CLIP's mean and std."""
    mean = torch.tensor(CLIP_MEAN, device=pixels.device, dtype=dtype).view(3, 1, 1)
    std = torch.tensor(CLIP_STD, device=pixels.device, dtype=dtype).view(3, 1, 1)
    return (pixels.to(dtype) / 255.0 - mean) / std


def clip_preprocess(image, size: int = 224) -> torch.Tensor:
    """PIL image -> (3, size, size) float tensor, normalised as CLIP was trained."""
    return clip_normalize(clip_resize_crop(image, size))


def load_image(path, size: int = 224) -> torch.Tensor:
    from PIL import Image

    with Image.open(path) as im:
        return clip_preprocess(im, size)
