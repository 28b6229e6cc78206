"""The one image convention of the evaluation, and folders of images read by it.

Every image, real or generated, is 8-bit RGB before any feature is computed (clean-fid's argument:
a metric must not see the difference between a PNG on disk and the float tensor it came from):

- a real image is made RGB (16-bit and float grey images scaled to 8 bits first), cropped to its centred
  square and resized with Pillow's bicubic filter (antialiased) from its 8-bit pixels, the trainers'
  preprocessing without their random jitter (dalle_fast.data.images.preprocess); a folder compared with
  `fid` keeps its images' own size unless a size is asked for;
- a generated image in [0, 1] is rounded to 8 bits (round(255 x)), as a PNG file would hold it;
- a blur of radius r is a Gaussian of standard deviation r pixels (taps out to 3r, edges replicated)
  applied to the 8-bit image and rounded back to 8 bits, on both sides of every comparison.

The extractors then get x / 255 as floats in [0, 1] (or the 8-bit tensor, for torch-fidelity's
InceptionV3, which resizes to 299 px itself).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from dalle_fast.data.images import IMAGE_EXTENSIONS, _to_8bit, square_uint8


def quantize(images: torch.Tensor) -> torch.Tensor:
    """Images [B, 3, H, W] in [0, 1] -> uint8 [B, 3, H, W] (round(255 x), clipped)."""
    if images.dtype == torch.uint8:
        return images
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)


def gaussian_blur(images: torch.Tensor, radius: float) -> torch.Tensor:
    """uint8 images [B, 3, H, W] blurred by a Gaussian of std `radius` px (0: unchanged), back to uint8."""
    if radius < 0:
        raise ValueError(f"blur radius must be >= 0, got {radius}")
    if radius == 0:
        return images
    half = max(1, math.ceil(3 * radius))
    t = torch.arange(-half, half + 1, dtype=torch.float32)
    w = torch.exp(-(t**2) / (2 * radius**2))
    w = (w / w.sum()).to(images.device)
    B, C, H, W = images.shape
    x = images.float().reshape(B * C, 1, H, W)
    x = F.conv2d(F.pad(x, (half, half, 0, 0), mode="replicate"), w.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, half, half), mode="replicate"), w.view(1, 1, -1, 1))
    return x.view(B, C, H, W).round().clamp(0, 255).to(torch.uint8)


def read_image(path: Path, size: int | None = None) -> torch.Tensor | None:
    """One image file as uint8 [3, H, W] (at `size` x `size` when given: centred square, bicubic); None
    when it cannot be read."""
    try:
        with Image.open(path) as img:
            img.load()
            if size is not None:
                return square_uint8(img, size)
            img = _to_8bit(img).convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError):
        return None
    w, h = img.size
    return torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(h, w, 3).permute(2, 0, 1)


class ImageFolder:
    """The images of a folder (searched recursively, sorted by path), read as uint8 batches.

    Unreadable files are skipped and counted (`skipped`, `skipped_files`). Without `size` every image must
    have the first readable one's size (a ValueError names the first that does not); with `size` each is
    brought to size x size (see the module docstring)."""

    def __init__(self, root: str | Path, size: int | None = None, limit: int = 0):
        self.root = Path(root)
        if not self.root.is_dir():
            raise ValueError(f"{root} is not a folder")
        self.files = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if limit:
            self.files = self.files[:limit]
        if not self.files:
            raise ValueError(f"{root} holds no images ({', '.join(IMAGE_EXTENSIONS)}, searched recursively)")
        self.size = size
        self.shape: tuple[int, int] | None = None if size is None else (size, size)
        self.skipped_files: list[str] = []

    def __len__(self) -> int:
        return len(self.files)

    @property
    def skipped(self) -> int:
        return len(self.skipped_files)

    def batches(self, batch_size: int, start: int = 0) -> Iterator[tuple[int, torch.Tensor]]:
        """(files consumed so far, uint8 batch [B, 3, H, W]) from file number `start` on."""
        batch = []
        for i in range(start, len(self.files)):
            x = read_image(self.files[i], self.size)
            if x is None:
                self.skipped_files.append(str(self.files[i]))
            else:
                if self.shape is None:
                    self.shape = tuple(x.shape[1:])
                elif tuple(x.shape[1:]) != self.shape:
                    h, w = self.shape
                    raise ValueError(
                        f"{self.files[i]} is {x.shape[2]}x{x.shape[1]}, the folder's first image {w}x{h}: images "
                        "of mixed sizes need a size to bring them all to (size)"
                    )
                batch.append(x)
            if len(batch) == batch_size or (batch and i == len(self.files) - 1):
                yield i + 1, torch.stack(batch)
                batch = []
        if start < len(self.files) and self.shape is None:
            raise ValueError(f"none of the {len(self.files)} images in {self.root} could be read")
