"""A small contrastive image-text model (CLIP-style), the reranker of sampling.

The paper draws N samples per caption and keeps the ones a contrastive model (CLIP) scores highest
(Section 3, N = 512; gains flatten beyond ~32). This is a CLIP at the scale of the built-in data: a
convolutional image encoder (its last feature map flattened, so positions survive for "above" and
"left of"), a small transformer over the SAME BPE tokens as the stage-2 model, both projected to a
shared unit sphere; trained (dalle_fast.training.clip) with the symmetric InfoNCE loss (cross-entropy
over the batch's image-text similarities, in both directions) with a learned temperature.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dalle_fast.models.tokens import PAD


@dataclass
class CLIPConfig:
    text_vocab: int = 512  # BPE vocabulary size (the stage-2 tokenizer's)
    text_len: int = 20  # text positions (the stage-2 tokenizer's)
    image_size: int = 32  # side of the input images (the dVAE's)
    width: int = 128  # width of the text transformer and of the last image feature map
    text_layers: int = 2  # text transformer layers
    heads: int = 4  # text attention heads
    embed_dim: int = 64  # the shared embedding

    def __post_init__(self):
        for name in ("text_vocab", "text_len", "width", "text_layers", "heads", "embed_dim"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an int >= 1, got {getattr(self, name)!r}")
        if not isinstance(self.image_size, int) or self.image_size < 8 or self.image_size % 8:
            raise ValueError(f"image_size must be a multiple of 8, got {self.image_size!r}")
        if self.width % self.heads:
            raise ValueError(f"width ({self.width}) must be a multiple of heads ({self.heads})")


class CLIP(nn.Module):
    """encode_image (B, 3, S, S) in [0, 1] -> (B, embed_dim) unit vectors; encode_text (B, text_len) BPE ids
    with PAD -> (B, embed_dim) unit vectors; forward -> the symmetric InfoNCE loss."""

    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        self.image_encoder = nn.Sequential(
            nn.Conv2d(3, w // 4, 3, padding=1), nn.GELU(),
            nn.Conv2d(w // 4, w // 2, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(w // 2, w, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(w, w, 3, stride=2, padding=1), nn.GELU(),  # (B, w, S/8, S/8)
            nn.AdaptiveAvgPool2d(4), nn.Flatten(),  # (B, 16 w): where things are is kept
            nn.Linear(16 * w, cfg.embed_dim),
        )  # fmt: skip
        self.token_emb = nn.Embedding(cfg.text_vocab + 1, w)  # the last id is PAD
        self.pos_emb = nn.Parameter(torch.randn(cfg.text_len, w) * 0.02)
        layer = nn.TransformerEncoderLayer(w, cfg.heads, 4 * w, dropout=0.0, batch_first=True, norm_first=True)
        self.text_encoder = nn.TransformerEncoder(layer, cfg.text_layers, enable_nested_tensor=False)
        self.text_norm = nn.LayerNorm(w)
        self.text_proj = nn.Linear(w, cfg.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's initial temperature

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [batch, 3, H, W], got {tuple(images.shape)}")
        S = self.cfg.image_size
        if images.shape[-2:] != (S, S):
            images = F.interpolate(images, size=(S, S), mode="bilinear", antialias=True, align_corners=False)
        return F.normalize(self.image_encoder(images * 2 - 1), dim=-1)

    def encode_text(self, text: torch.Tensor) -> torch.Tensor:
        if text.dim() != 2 or text.shape[1] != self.cfg.text_len:
            raise ValueError(f"text must be [batch, {self.cfg.text_len}], got {tuple(text.shape)}")
        real = text != PAD
        h = self.token_emb(torch.where(real, text, self.cfg.text_vocab)) + self.pos_emb  # (B, T, w)
        h = self.text_norm(self.text_encoder(h))
        # Mean over the caption's own tokens (pad slots only carry the length).
        h = (h * real.unsqueeze(-1)).sum(1) / real.sum(1, keepdim=True).clamp(min=1)
        return F.normalize(self.text_proj(h), dim=-1)

    def similarity(self, images: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Cosine similarity of each image with its own caption: (B,)."""
        return (self.encode_image(images) * self.encode_text(text)).sum(-1)

    def forward(self, images: torch.Tensor, text: torch.Tensor) -> dict[str, torch.Tensor]:
        """Symmetric InfoNCE over the batch: image i's caption is text i, every other text a negative."""
        logits = self.logit_scale.exp().clamp(max=100) * self.encode_image(images) @ self.encode_text(text).t()
        target = torch.arange(len(images), device=images.device)
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2
        acc = (logits.argmax(1) == target).float().mean()
        return {"loss": loss, "accuracy": acc.detach()}
