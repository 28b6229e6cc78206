"""Sampling image tokens from a trained transformer, and the captioned PNG grids samples are shown in.

`sample_tokens` draws the image tokens one at a time (temperature, top-k, top-p, a seeded generator).
By default it decodes through a key/value cache (`dalle_fast.kv_cache`: the prompt runs once, then each
new token attends only to the cached keys its layer's mask allows); cache=False recomputes the whole
sequence for every token, the plain reference the cache is tested against. Both draw the same random
numbers in the same order, so for a seed they give the same tokens (up to fp32 rounding of the logits).
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import torch

from dalle_fast.checkpoint import atomic_write
from dalle_fast.kv_cache import decode_step, prefill
from dalle_fast.transformer import DALLE


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Keeps the top_k largest logits (0: all) and the smallest set whose probability reaches top_p
    (1.0: all); the rest become -inf. logits: (B, V)."""
    if top_k < 0 or not 0.0 < top_p <= 1.0:
        raise ValueError(f"need top_k >= 0 and 0 < top_p <= 1, got top_k={top_k}, top_p={top_p}")
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # keep every token until the mass reaches top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


@torch.no_grad()
def sample_tokens(
    model: DALLE,
    text: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    prime: torch.Tensor | None = None,
    cache: bool = True,
) -> torch.Tensor:
    """Image tokens (B, image_size**2) for text (B, text_len). prime: (B, P) first image tokens to keep.
    cache=False: recompute the whole sequence per token (the reference path)."""
    cfg = model.cfg
    n = cfg.image_size**2
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    image = torch.zeros(text.shape[0], n, dtype=torch.long, device=text.device)
    start = 0
    if prime is not None:
        model.check_tokens(text, prime, image_len=prime.shape[1] if prime.dim() == 2 else None)
        start = prime.shape[1]
        image[:, :start] = prime
    model.check_tokens(text, image)
    if start == n:
        return image
    if cache:
        kv, logits = prefill(model, text, image, start)
    for j in range(start, n):
        if not cache:
            logits = model.image_logits(model.hidden(text, image)[:, cfg.text_len - 1 + j])  # (B, image_vocab)
        elif j > start:
            logits = decode_step(model, kv, image[:, j - 1])
        probs = filter_logits(logits / temperature, top_k, top_p).softmax(-1)
        image[:, j] = torch.multinomial(probs, 1, generator=generator).squeeze(1)
    return image


def save_captioned_grid(
    path: str | Path, images: torch.Tensor, captions: list[str], columns: int = 8, cell: int = 128
) -> Path:
    """A PNG grid of images (B, 3, H, W) in [0, 1], each upscaled to `cell` pixels with its caption under it."""
    from PIL import Image, ImageDraw, ImageFont

    if images.dim() != 4 or images.shape[1] != 3 or len(captions) != images.shape[0]:
        raise ValueError(
            f"images must be [B, 3, H, W] with one caption each, got {tuple(images.shape)} and {len(captions)} captions"
        )
    font = ImageFont.load_default()
    wrap = max(8, cell // 7)
    lines = [textwrap.wrap(c, wrap)[:4] for c in captions]
    text_h = 12 * max((len(ls) for ls in lines), default=0) + 6
    cols = max(1, min(columns, len(captions)))
    rows = (len(captions) + cols - 1) // cols
    grid = Image.new("RGB", (cols * (cell + 4) + 4, rows * (cell + text_h + 4) + 4), "white")
    draw = ImageDraw.Draw(grid)
    arr = (images.detach().float().clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    for i, (a, ls) in enumerate(zip(arr, lines, strict=True)):
        x = 4 + (i % cols) * (cell + 4)
        y = 4 + (i // cols) * (cell + text_h + 4)
        grid.paste(Image.fromarray(a).resize((cell, cell), Image.Resampling.NEAREST), (x, y))
        for k, line in enumerate(ls):
            draw.text((x, y + cell + 2 + 12 * k), line, fill=(0, 0, 0), font=font)
    path = Path(path)
    atomic_write(path, lambda p: grid.save(p, format="PNG"))
    return path
