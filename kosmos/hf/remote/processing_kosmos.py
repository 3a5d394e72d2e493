"""KOSMOS-1 processor for `transformers` (remote code, written by `kosmos-export-hf`): prompts and images in,
`input_ids`, `attention_mask` and `pixel_values` out, as kosmos-pretrain builds them.

A prompt is `<s>`, then its text and images in order: `{image}` in the text marks where each image goes
(without it the images come first); an image is `<image>`, `num_latents` slots (the pad id; the model
fills them) and `</image>`. Text is never split into control tokens (`<image>` typed in a prompt stays
text). Images are resized as open_clip's eval transform does (shorter side to `image_size`, bicubic,
antialiased, on uint8 in torch for RGB and grey images, by PIL in their own mode for the others; centre
crop), then normalised with the tower's mean and std in fp32. Imports torch, numpy, PIL, transformers.
"""

import torch
from transformers import BatchFeature, ProcessorMixin

TORCH_MODES = ("RGB", "L")


def _resized_size(width, height, size):
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(size * long / short)
    return (size, new_long) if width <= height else (new_long, size)


def _crop_origin(width, height, size):
    return int(round((height - size) / 2.0)), int(round((width - size) / 2.0))


def resize_crop(image, size):
    """A PIL image -> (3, size, size) uint8 pixels."""
    import numpy as np
    from PIL import Image

    if image.mode not in TORCH_MODES:
        w, h = image.size
        if (w, h) != (size, size):
            image = image.resize(_resized_size(w, h, size), Image.Resampling.BICUBIC)
        top, left = _crop_origin(*image.size, size)
        image = image.crop((left, top, left + size, top + size)).convert("RGB")
    elif image.mode != "RGB":
        image = image.convert("RGB")
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8))
    h, w = pixels.shape[0], pixels.shape[1]
    x = pixels.permute(2, 0, 1)
    if (h, w) != (size, size):
        nw, nh = _resized_size(w, h, size)
        x = torch.nn.functional.interpolate(x[None], size=(nh, nw), mode="bicubic", antialias=True)[0]
        top, left = _crop_origin(nw, nh, size)
        x = x[:, top:top + size, left:left + size]
    return x.contiguous()


class KosmosProcessor(ProcessorMixin):
    """`processor(text="{image} An image of", images=[pil_image], return_tensors="pt")` -> input_ids,
    attention_mask (left-padded for several prompts), pixel_values (N, 3, S, S) fp32."""

    tokenizer_class = "AutoTokenizer"

    def __init__(self, tokenizer=None, num_latents=64, image_size=224, image_mean=None, image_std=None,
                 **kwargs):
        self.num_latents = num_latents
        self.image_size = image_size
        self.image_mean = list(image_mean or (0.48145466, 0.4578275, 0.40821073))
        self.image_std = list(image_std or (0.26862954, 0.26130258, 0.27577711))
        super().__init__(tokenizer)

    def pixels(self, images):
        """uint8 (N, 3, S, S) of PIL images (or of uint8 tensors already (3, S, S))."""
        out = [im if isinstance(im, torch.Tensor) else resize_crop(im, self.image_size) for im in images]
        return torch.stack(out) if out else None

    def normalize(self, pixels):
        mean = torch.tensor(self.image_mean, dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(self.image_std, dtype=torch.float32).view(1, -1, 1, 1)
        return (pixels.float() / 255.0 - mean) / std

    def prompt_ids(self, text, n_images):
        tok = self.tokenizer
        image_id, end_id = tok.convert_tokens_to_ids("<image>"), tok.convert_tokens_to_ids("</image>")
        span = [image_id] + [tok.pad_token_id] * self.num_latents + [end_id]
        parts = text.split("{image}")
        if len(parts) == 1:
            segments = [None] * n_images + ([text] if text else [])
        else:
            if len(parts) - 1 != n_images:
                raise ValueError(f"the prompt has {len(parts) - 1} {{image}} markers but {n_images} images "
                                 "were given")
            segments = []
            for i, part in enumerate(parts):
                if part:
                    segments.append(part)
                if i < n_images:
                    segments.append(None)
        ids = [tok.bos_token_id]
        for seg in segments:
            ids += span if seg is None else tok(seg, add_special_tokens=False)["input_ids"]
        return ids

    def __call__(self, text=None, images=None, return_tensors="pt", **kwargs):
        """One prompt (str) with its images, or a list of prompts, each with all the images (as
        kosmos-generate's repeated --prompt)."""
        texts = [text or ""] if text is None or isinstance(text, str) else list(text)
        images = [] if images is None else (list(images) if isinstance(images, list | tuple) else [images])
        rows = [self.prompt_ids(t, len(images)) for t in texts]
        L = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (L - len(r)) + r for r in rows], dtype=torch.long)
        attention_mask = torch.tensor([[0] * (L - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)
        data = {"input_ids": input_ids, "attention_mask": attention_mask}
        if images:
            pixels = self.pixels(images)
            data["pixel_values"] = self.normalize(pixels.repeat(len(texts), 1, 1, 1))
        return BatchFeature(data=data, tensor_type=return_tensors)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)
