"""The pictures a run writes: captioned sample grids, and held-out originals above their reconstructions."""

from __future__ import annotations

import textwrap
from pathlib import Path

import torch

from dalle_fast.files import atomic_write


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images (..., 3, H, W) in [0, 1] -> uint8 (..., H, W, 3) on the CPU, as PNG files hold them."""
    return (images.detach().float().clamp(0, 1) * 255).round().byte().movedim(-3, -1).cpu()


def save_png(path: str | Path, image: torch.Tensor) -> Path:
    """One image (3, H, W) in [0, 1] as a PNG."""
    from PIL import Image

    arr = to_uint8(image).numpy()
    return atomic_write(path, lambda p: Image.fromarray(arr).save(p, format="PNG"))


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
    arr = to_uint8(images).numpy()
    for i, (a, ls) in enumerate(zip(arr, lines, strict=True)):
        x = 4 + (i % cols) * (cell + 4)
        y = 4 + (i // cols) * (cell + text_h + 4)
        grid.paste(Image.fromarray(a).resize((cell, cell), Image.Resampling.NEAREST), (x, y))
        for k, line in enumerate(ls):
            draw.text((x, y + cell + 2 + 12 * k), line, fill=(0, 0, 0), font=font)
    return atomic_write(path, lambda p: grid.save(p, format="PNG"))


def save_recon_grid(path: Path, originals: torch.Tensor, recon: torch.Tensor, psnr: float | None = None) -> None:
    """Originals (B, 3, H, W) in a row above their reconstructions, each row labelled on its left ("held-out
    originals", "reconstructions", with the PSNR when given); small images doubled in size."""
    from PIL import Image, ImageDraw, ImageFont

    n = originals.shape[0]
    grid = torch.cat([torch.cat(list(originals), dim=2), torch.cat(list(recon), dim=2)], dim=1)  # [3, 2H, nW]
    img = Image.fromarray(to_uint8(grid).numpy())
    if n and originals.shape[-1] < 128:
        img = img.resize((img.width * 2, img.height * 2), Image.Resampling.NEAREST)
    labels = ["held-out", "originals"], ["dVAE", "reconstructions"] + ([f"{psnr:.1f} dB"] if psnr is not None else [])
    margin = 6 * max(len(w) for ls in labels for w in ls) + 12
    canvas = Image.new("RGB", (img.width + margin, img.height), "white")
    canvas.paste(img, (margin, 0))
    draw, font, half = ImageDraw.Draw(canvas), ImageFont.load_default(), img.height // 2
    for row, lines in enumerate(labels):
        top = row * half + max(0, (half - 12 * len(lines)) // 2)
        for k, line in enumerate(lines):
            draw.text((4, top + 12 * k), line, fill=(0, 0, 0), font=font)
    atomic_write(path, lambda p: canvas.save(p, format="PNG"))
