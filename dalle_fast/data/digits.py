"""The built-in `digits` dataset: real handwriting, tinted, with captions; no download.

scikit-learn ships 1,797 handwritten digits (8x8 grey scans, values 0..16) inside its wheel
(`pip install -e ".[digits]"`). Each becomes several items: the digit tinted in one of six colours on a
dark ground, upscaled to the run's image size, captioned from templates ("a red seven", "the digit 7 in
red", ...). Some colour-digit pairs never appear in training (the test of zero-shot composition, as the
shapes' held-out pairs are); the held-out scans (every tenth) are never trained on in any colour.

Splits: "train" (9 of 10 scans, every colour but the held-out pairs), "val" (the other scans, the same
pairs as train) and "heldout" (the other scans in the held-out pairs only). Item i is a function of
(split, i) alone; which caption __getitem__ returns also depends on the epoch (set_epoch).
"""

from __future__ import annotations

import gzip
import importlib.util
import random
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dalle_fast.data.batches import mix_seed
from dalle_fast.data.shapes import COLORS

NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# Colour-digit pairs never drawn in the training split.
HELD_OUT = (("red", 7), ("green", 2), ("blue", 5), ("yellow", 0), ("purple", 9), ("orange", 4))
BACKGROUND = np.array((24, 24, 28), dtype=np.float32)


@lru_cache(maxsize=1)
def load_scans() -> tuple[np.ndarray, np.ndarray]:
    """(scans (1797, 8, 8) float32 in [0, 1], digits (1797,) int64), read from scikit-learn's copy of the
    data without importing scikit-learn (whose import is slow and pulls in SciPy)."""
    spec = importlib.util.find_spec("sklearn")
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz" if spec else None
    if path is None or not path.exists():
        raise ImportError('the digits data comes with scikit-learn: pip install -e ".[digits]"')
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float32)
    return (table[:, :64] / 16.0).reshape(-1, 8, 8), table[:, 64].astype(np.int64)


def digit_captions(color: str, digit: int) -> list[str]:
    """Every paraphrase of an item's caption."""
    name = NAMES[digit]
    return [
        f"a {color} {name}",
        f"the digit {digit} in {color}",
        f"a handwritten {name} in {color}",
        f"a {color} {digit} on a dark background",
    ]


class DigitsDataset(torch.utils.data.Dataset):
    """Tinted handwritten digits with captions (see the module docstring). Items are (image (3, S, S) in
    [0, 1], caption); `captions(i)` lists every paraphrase, `hard_negative(i)` a near miss."""

    def __init__(self, split: str = "train", image_size: int = 32, seed: int = 0):
        if split not in ("train", "val", "heldout"):
            raise ValueError(f"split must be 'train', 'val' or 'heldout', got {split!r}")
        if image_size < 8:
            raise ValueError(f"image_size must be >= 8 (the scans are 8x8), got {image_size}")
        self.scans, self.digits = load_scans()
        self.split, self.image_size, self.seed = split, image_size, seed
        self.epoch = 0
        held_scans = split != "train"
        scans = [i for i in range(len(self.digits)) if (i % 10 == 9) == held_scans]
        held = set(HELD_OUT)
        # (scan, colour) items, shuffled so that any prefix of the list mixes digits and colours.
        self.items = [
            (scan, color)
            for color in COLORS
            for scan in scans
            if ((color, int(self.digits[scan])) in held) == (split == "heldout")
        ]
        random.Random(mix_seed(seed, {"train": 0, "val": 1, "heldout": 2}[split])).shuffle(self.items)
        self.pairs = sorted({(c, int(self.digits[s])) for s, c in self.items})  # colour-digit pairs drawn here

    def __len__(self) -> int:
        return len(self.items)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def render(self, scan: int, color: str) -> torch.Tensor:
        """A scan tinted in colour on the dark ground, upscaled to image_size: (3, S, S) in [0, 1]."""
        ink = Image.fromarray((self.scans[scan] * 255).round().astype(np.uint8), "L")
        ink = np.asarray(ink.resize((self.image_size,) * 2, Image.Resampling.BICUBIC), dtype=np.float32) / 255
        rgb = BACKGROUND + ink[..., None] * (np.array(COLORS[color], dtype=np.float32) - BACKGROUND)
        return torch.from_numpy(rgb / 255).permute(2, 0, 1).clamp(0, 1).contiguous()

    def captions(self, index: int) -> list[str]:
        scan, color = self.items[index]
        return digit_captions(color, int(self.digits[scan]))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        scan, color = self.items[index]
        caption = random.Random(mix_seed(self.seed, index) * 7919 + self.epoch).choice(self.captions(index))
        return self.render(scan, color), caption

    def hard_negative(self, index: int) -> tuple[torch.Tensor, list[str]]:
        """The same colour on a scan of another digit (a pair this split draws): caption and colour agree
        but for the digit, which a reranker must then read."""
        scan, color = self.items[index]
        rng = random.Random(mix_seed(self.seed, index) * 7919 - 1)
        digit = int(self.digits[scan])
        # The held-out split has one digit per colour: its near misses draw a digit of another pair.
        others = [d for c, d in self.pairs if c == color and d != digit] or [d for _, d in self.pairs if d != digit]
        other = rng.choice(others)
        scans = np.flatnonzero(self.digits == other)
        return self.render(int(rng.choice(scans)), color), digit_captions(color, other)
