"""Reading one image: the paper's preprocessing, and skipping (and counting) what cannot be read.

Every source yields (image, caption) with image a float tensor [3, S, S] in [0, 1] and caption a str.
Bad items (unreadable or corrupt images, empty or missing captions) come back as None from the
map-style sources and are dropped by `collate_skip`, which counts them; `SkipCounter` reports the count
with one warning at the end of an epoch. A run never dies on one bad file.

Preprocessing follows the paper: a random square crop near the centre, resized to the target size, no flip.
"""

from __future__ import annotations

import io
import random
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


# ---- preprocessing ---------------------------------------------------------------------------------


def _to_8bit(img: Image.Image) -> Image.Image:
    """16-bit and float grey images as 8-bit ones (Pillow's RGB conversion clips them: a 16-bit ramp
    would turn white). 16-bit modes span 0..65535; a 32-bit integer image that stays within 0..255 is
    taken as 8-bit data, else as 16-bit; a float image within 0..1 as fractions, else as 0..255."""
    if img.mode not in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        return img
    arr = np.asarray(img, dtype=np.float32)
    if img.mode.startswith("I;16"):
        arr = arr / 65535
    elif img.mode == "I":
        arr = arr / (65535 if arr.max(initial=0) > 255 else 255)
    elif arr.max(initial=0) > 1:
        arr = arr / 255
    return Image.fromarray((np.clip(arr, 0, 1) * 255 + 0.5).astype(np.uint8), "L")


def preprocess(img: Image.Image, size: int, rng: random.Random | None = None) -> torch.Tensor:
    """Square crop (random near the centre when rng is given, else centred), resize, to [3, size, size] in [0, 1]."""
    return square_uint8(img, size, rng).float().div_(255.0)


def square_uint8(img: Image.Image, size: int, rng: random.Random | None = None) -> torch.Tensor:
    """preprocess's 8-bit pixels: uint8 [3, size, size] (the evaluation reads image files through it)."""
    img = _to_8bit(img).convert("RGB")
    w, h = img.size
    side = min(w, h)
    slack_x, slack_y = w - side, h - side
    # Jitter the crop by up to a quarter of the slack around the centre: random, but near the centre.
    jx = rng.uniform(-0.25, 0.25) if rng else 0.0
    jy = rng.uniform(-0.25, 0.25) if rng else 0.0
    x0 = round(slack_x / 2 + jx * slack_x)
    y0 = round(slack_y / 2 + jy * slack_y)
    img = img.crop((x0, y0, x0 + side, y0 + side)).resize((size, size), Image.Resampling.BICUBIC)
    return torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(size, size, 3).permute(2, 0, 1)


def _load_image(data: bytes | Path, size: int, rng: random.Random | None) -> torch.Tensor | None:
    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as img:
            img.load()
            return preprocess(img, size, rng)
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError):
        return None


def _pick_caption(lines: Sequence[str], rng: random.Random) -> str | None:
    lines = [c.strip() for c in lines if c.strip()]
    return rng.choice(lines) if lines else None


# ---- skipping bad items ----------------------------------------------------------------------------


def collate_skip(items: list) -> tuple[torch.Tensor, list[str], int]:
    """DataLoader collate_fn: drops bad items; returns (images [B, 3, S, S], captions, number skipped)."""
    good = [it for it in items if it]  # None (map-style sources) or () (streamed sources) mark bad items
    skipped = len(items) - len(good)
    if not good:
        return torch.empty(0), [], skipped
    return torch.stack([g[0] for g in good]), [g[1] for g in good], skipped


class SkipCounter:
    """Counts skipped items over an epoch and warns once at its end."""

    def __init__(self, name: str = "data"):
        self.name = name
        self.skipped = 0
        self.seen = 0

    def add(self, seen: int, skipped: int) -> None:
        self.seen += seen
        self.skipped += skipped

    def end_epoch(self) -> int:
        n = self.skipped
        if n:
            warnings.warn(
                f"{self.name}: skipped {n} of {self.seen} items this epoch (unreadable or corrupt images, "
                "empty or missing captions)",
                stacklevel=2,
            )
        self.skipped = self.seen = 0
        return n
