"""Tiny models for tests: configs/tiny.yaml with overrides, randomly initialised, CPU, fp32."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from kosmos.config import Config, load_config
from kosmos.model import Kosmos

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"


def tiny_config(*overrides: str) -> Config:
    return load_config(TINY, list(overrides))


def tiny_model(*overrides: str, seed: int = 0) -> Kosmos:
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "randomly initialised" is expected here
        return Kosmos(tiny_config(*overrides))


def random_images(model: Kosmos, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    s = model.vision.image_size
    return torch.randint(0, 256, (n, 3, s, s), generator=g, dtype=torch.uint8)  # the model normalises pixels


def make_row(model: Kosmos, text_before: int, n_images: int, text_after: int, seed: int = 0,
             image_id: int = 4, image_end_id: int = 5, pad_id: int = 0):
    """ids and image mask for `<s> text <image> slots </image> ... text`: a single row (1, L)."""
    g = torch.Generator().manual_seed(seed)
    V = model.cfg.decoder.vocab_size
    n = model.num_latents

    def text(k):
        return torch.randint(10, V, (k,), generator=g).tolist()

    ids, mask = [2] + text(text_before), [False] * (1 + text_before)
    for _ in range(n_images):
        ids += [image_id] + [pad_id] * n + [image_end_id]
        mask += [False] + [True] * n + [False]
    ids += text(text_after)
    mask += [False] * text_after
    return torch.tensor([ids]), torch.tensor([mask])


def checkpoint_dir(run: Path, tokenizer_dir: Path, model: Kosmos, step: int = 7) -> Path:
    """A checkpoint as the trainer writes it, for inference: weights, the resolved config, the tokenizer."""
    import shutil

    from safetensors.torch import save_model

    from kosmos.config import save_config

    ckpt = run / "checkpoints" / f"step_{step:08d}"
    (ckpt / "tokenizer").mkdir(parents=True)
    save_model(model, str(ckpt / "model.safetensors"))
    save_config(model.cfg, ckpt / "config.yaml")
    (ckpt / "trainer_state.json").write_text("{}")
    for f in Path(tokenizer_dir).iterdir():
        shutil.copy(f, ckpt / "tokenizer" / f.name)
    return ckpt
