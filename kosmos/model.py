"""KOSMOS-1 (Huang et al., 2023, "Language Is Not All You Need", arXiv 2302.14045).

A decoder-only Transformer reads text in which every image is a span `<image> [n embeddings] </image>`:

    image (N, 3, 224, 224) uint8 pixels, normalised inside with the tower's mean/std
      -> CLIP ViT-L/14 patch tokens         (N, 256, 1024)   kosmos/vision.py, frozen but the last block
      -> Perceiver resampler (flamingo)     (N, 64, 1024)    pools 256 tokens to 64 latents (Sec. 2.2)
      -> linear projection                  (N, 64, 2048)    into the decoder's width
    token ids (B, L) -> embeddings (B, L, 2048); the image slots take the projected latents
      -> Magneto decoder with xPos          (B, L, 2048)     kosmos/decoder.py (Sec. 2.1)
      -> tied output projection             (B, L, 64007)
    loss: next-token cross entropy on discrete tokens only (never image slots or padding).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kosmos.config import Config, DecoderConfig
from kosmos.decoder import build_decoder
from kosmos.sequence import IGNORE_INDEX
from kosmos.sharding import is_sharded
from kosmos.vision import VisionEncoder


@dataclass
class KosmosOutput:
    logits: torch.Tensor
    """(B, L, V) next-token logits."""
    loss: torch.Tensor | None = None
    """Mean cross entropy over the `n_tokens` positions that carry a loss."""
    n_tokens: torch.Tensor | None = None
    """How many target tokens the loss averages over (for token-weighted accumulation)."""


class TokenEmbedding(nn.Embedding):
    """nn.Embedding whose lookup is multiplied by `scale` (fairseq's `embed_scale`, sqrt(dim) with
    `decoder.scale_embedding`). The scale lives in the lookup, not in the decoder's forward, so that every
    caller of `decoder.embed_tokens` (training, the KV-cache decoding step) gets it, while the image latents
    written into the image slots and the tied output projection (which reads `.weight`) do not."""

    def __init__(self, num_embeddings: int, embedding_dim: int, scale: float = 1.0):
        super().__init__(num_embeddings, embedding_dim)
        self.scale = scale

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = super().forward(input_ids)
        return x * self.scale if self.scale != 1.0 else x

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, scale={self.scale:g}"


def build_token_embedding(d: DecoderConfig) -> TokenEmbedding:
    """The token embedding, N(0, dim^-1/2) as fairseq/torchscale initialise it (the tied output projection
    then starts with logits of RMS ~1). With `decoder.scale_embedding` the lookup is scaled by sqrt(dim),
    so tokens enter the decoder at RMS 1 (fairseq's default, `no_scale_embedding=False`); without, at
    dim^-1/2 (0.022 for dim 2048), 50x below the image latents."""
    scale = math.sqrt(d.dim) if d.scale_embedding else 1.0
    embed = TokenEmbedding(d.vocab_size, d.dim, scale=scale)
    nn.init.normal_(embed.weight, mean=0.0, std=d.dim**-0.5)
    return embed


def build_connector(cfg: Config, vision_width: int) -> tuple[nn.Module, nn.Linear]:
    """Perceiver resampler (flamingo-pytorch, one image per call: each image is its own span in the
    sequence) and the linear projection into the decoder's width. The resampler ends in a LayerNorm, so its
    latents have RMS ~1; the projection's PyTorch default init (U(+-1/sqrt(fan_in)), std 1/sqrt(3 fan_in))
    times Magneto's gain sqrt(log 2N) (as torchscale gives v_proj/out_proj/fc1/fc2) puts the image
    embeddings at RMS ~ gain/sqrt(3): 1.14 for the paper's 24 layers."""
    from flamingo_pytorch import PerceiverResampler

    c, d = cfg.connector, cfg.decoder
    resampler = PerceiverResampler(dim=vision_width, depth=c.depth, dim_head=c.dim_head, heads=c.heads,
                                   num_latents=c.num_latents, num_media_embeds=1, ff_mult=c.ff_mult)
    proj = nn.Linear(vision_width, d.dim)
    with torch.no_grad():
        proj.weight.mul_(d.magneto_init_scale)
    return resampler, proj


class Kosmos(nn.Module):
    def __init__(self, cfg: Config):
        """A randomly initialised model of `cfg` (no file is read: `kosmos.weights.load_model` loads a
        checkpoint, `kosmos.weights.load_clip_weights` CLIP's weights)."""
        super().__init__()
        self.cfg = cfg
        d = cfg.decoder
        self.vision = VisionEncoder(cfg.vision)
        self.resampler, self.proj = build_connector(cfg, self.vision.width)
        # torchscale applies Magneto's initialisation in this constructor (its gain times PyTorch's default
        # init of each nn.Linear); we never re-initialise after it.
        self.decoder = build_decoder(d, build_token_embedding(d))
        self.num_latents = cfg.connector.num_latents

    # ------------------------------------------------------------------ pieces

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """images: uint8 pixels (N, 3, S, S) -> image embeddings (N, num_latents, dim)."""
        patches = self.vision(images)  # (N, P, Wv)
        latents = self.resampler(patches)  # (N, 1, num_latents, Wv)
        return self.proj(latents.squeeze(1))  # (N, num_latents, dim)

    def embed(self, input_ids: torch.Tensor, images: torch.Tensor | None = None,
              image_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings (B, L, dim) with the image slots (image_mask True, row-major order, num_latents
        per image) filled with the images' embeddings."""
        x = self.decoder.embed_tokens(input_ids)  # (B, L, D)
        n_images = 0 if images is None else images.shape[0]
        if not n_images and image_mask is not None:
            if not _on_host(image_mask):
                torch._assert_async(~image_mask.any(),
                                    "image_mask marks image slots but no images were given")
            elif bool(image_mask.any()):
                raise ValueError("image_mask marks image slots but no images were given")
        if n_images:
            if image_mask is None:
                raise ValueError("images were given without image_mask (where their slots are)")
            # A wrong count would misplace images silently: checked on the host where the mask is (CPU), on
            # the device otherwise (no device-to-host read per micro-batch; the pipeline counts on the host).
            need = n_images * self.num_latents
            if _on_host(image_mask):
                n_slots = int(image_mask.sum())
                if n_slots != need:
                    raise ValueError(f"image_mask marks {n_slots} slots but {n_images} images need {need} "
                                     f"({self.num_latents} each)")
            else:
                torch._assert_async(image_mask.sum() == need, "image_mask marks another number of slots than "
                                    "the images need")
            feats = self.encode_images(images).to(x.dtype)  # (N, n, D)
            x = x.masked_scatter(image_mask.unsqueeze(-1), feats)
        elif is_sharded(self):
            # Sharded (kosmos.sharding.shard_model makes the model an FSDP2 module): every unit's forward and
            # backward is a collective, so every rank runs the image pathway in every micro-batch: one blank
            # image, its output times zero.
            blank = torch.zeros(1, 3, self.vision.image_size, self.vision.image_size, dtype=torch.uint8,
                                device=input_ids.device)
            x = x + 0.0 * self.encode_images(blank).sum().to(x.dtype)
        elif self.training:
            # A text-only batch leaves the image pathway without gradients, which DDP rejects; touch every
            # trainable image parameter with a zero so all ranks reduce the same set.
            x = x + 0.0 * sum(p.sum() for p in self.image_parameters() if p.requires_grad).to(x.dtype)
        return x

    def image_parameters(self):
        yield from self.vision.parameters()
        yield from self.resampler.parameters()
        yield from self.proj.parameters()

    # ------------------------------------------------------------------ forward

    def forward(self, input_ids: torch.Tensor, images: torch.Tensor | None = None,
                image_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                padding_mask: torch.Tensor | None = None,
                doc_ids: torch.Tensor | None = None) -> KosmosOutput:
        """input_ids (B, L); images uint8 (N, 3, S, S); image_mask (B, L) True at image slots; labels (B, L)
        aligned with input_ids (the model shifts them), IGNORE_INDEX where no loss; padding_mask (B, L)
        True at padding. Rows are right-padded: the causal mask already keeps padding out of attention.
        doc_ids (B, L) int, the packer's document of each token: used only with `decoder.document_mask`
        (otherwise ignored, so the same batches serve both settings)."""
        x = self.embed(input_ids, images, image_mask)
        logits = self.decoder(x, doc_ids=doc_ids if self.cfg.decoder.document_mask else None)  # (B, L, V)
        if labels is None:
            return KosmosOutput(logits=logits)
        # Loss on discrete tokens only, whatever the caller put at image slots or padding.
        no_loss = torch.zeros_like(labels, dtype=torch.bool)
        if image_mask is not None:
            no_loss |= image_mask
        if padding_mask is not None:
            no_loss |= padding_mask
        labels = labels.masked_fill(no_loss, IGNORE_INDEX)
        targets = labels[:, 1:]  # position t predicts token t + 1
        n_tokens = (targets != IGNORE_INDEX).sum()
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(),
                               ignore_index=IGNORE_INDEX, reduction="sum") / n_tokens.clamp(min=1)
        return KosmosOutput(logits=logits, loss=loss, n_tokens=n_tokens)


def _on_host(t: torch.Tensor) -> bool:
    """Whether reading `t`'s values costs no device-to-host copy (a real CPU tensor; not a GPU's, not a fake
    tensor of a trace, whose values do not exist)."""
    from torch._subclasses.fake_tensor import is_fake

    return t.device.type == "cpu" and not is_fake(t)


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """`model` in eval mode (no dropout) for the block, then back in the mode it was in: evaluation, ranking
    and generation in the middle of training leave the model training."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def count_parameters(model: Kosmos) -> dict[str, int]:
    """Parameters per component; the tied embedding is counted once, under `embeddings`."""
    emb = model.decoder.embed_tokens.weight
    seen = {id(emb)}
    decoder = sum(p.numel() for p in model.decoder.parameters() if id(p) not in seen)
    if model.decoder.output_projection is not None and model.decoder.output_projection.weight is not emb:
        decoder -= model.decoder.output_projection.weight.numel()
        emb_count = emb.numel() + model.decoder.output_projection.weight.numel()
    else:
        emb_count = emb.numel()
    counts = {
        "vision": sum(p.numel() for p in model.vision.parameters()),
        "resampler": sum(p.numel() for p in model.resampler.parameters()),
        "projection": sum(p.numel() for p in model.proj.parameters()),
        "decoder": decoder,
        "embeddings": emb_count,
    }
    counts["total"] = sum(counts.values())
    counts["trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return counts
