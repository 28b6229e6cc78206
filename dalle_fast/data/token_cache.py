"""Stage 2's data, encoded once: dVAE codes of the images and BPE encodings of their captions.

The images are encoded by the stage-1 dVAE (argmax codes of its EMA weights) and kept in the run
directory with their captions, already BPE-encoded: every caption once without and `variants` times
with BPE dropout. Training then draws, per step, a batch of items, one caption of each and one of its
encodings, all as a function of (seed, step), so a resumed run continues exactly. (The tokenizers
library's dropout RNG cannot be seeded, hence the pre-drawn encodings; with enough variants this is
the paper's 10% BPE dropout.)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from dalle_fast.data.images import SkipCounter
from dalle_fast.data.tokenizer import CaptionTokenizer
from dalle_fast.files import atomic_write
from dalle_fast.models.dvae import DVAE
from dalle_fast.progress import Progress


def caption_lines(dataset, index: int) -> list[str] | None:
    """Every caption of a map-style item (all paraphrases), or None when the dataset cannot list them."""
    if isinstance(dataset, torch.utils.data.Subset):
        return caption_lines(dataset.dataset, dataset.indices[index])
    captions = getattr(dataset, "captions", None)
    return captions(index) if callable(captions) else None


class _ItemsWithCaptions(torch.utils.data.Dataset):
    """(image, all caption lines, item index) for the items `indices` of a map-style dataset."""

    def __init__(self, dataset, indices: list[int]):
        self.dataset, self.indices = dataset, indices

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, k):
        i = self.indices[k]
        item = self.dataset[i]
        if not item:
            return None
        lines = caption_lines(self.dataset, i) or [item[1]]
        lines = [c.strip() for c in lines if c.strip()]
        return (item[0], lines, i) if lines else None


def _collate(items):
    good = [it for it in items if it]
    images = torch.stack([g[0] for g in good]) if good else torch.empty(0)
    return images, [g[1] for g in good], [g[2] if len(g) > 2 else -1 for g in good], len(items) - len(good)


@torch.no_grad()
def encode_images(
    dataset, dvae: DVAE, limit: int, workers: int, desc: str, part: tuple[int, int] = (0, 1)
) -> tuple[torch.Tensor, list[list[str]], list[int]]:
    """dVAE argmax codes (M, grid**2) int16, the caption lines and the index (-1 for a stream) of each
    good item of the first `limit` (0: all); bad items are skipped and counted (one warning).

    part = (k, n): only the k-th of n parts of the items (map-style: every n-th index from k; a stream
    splits its shards by torch.distributed rank itself, and `limit` is then per part)."""
    if not isinstance(dataset, torch.utils.data.IterableDataset):
        n_items = min(limit, len(dataset)) if limit else len(dataset)
        dataset, limit = _ItemsWithCaptions(dataset, list(range(part[0], n_items, part[1]))), 0
    device = next(dvae.parameters()).device  # the training device: a GPU encodes far faster than the CPU
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=dvae.batch_limit(),  # 256 for small dVAEs; 5 for the paper's (256 px)
        num_workers=workers,
        collate_fn=_collate,
        pin_memory=device.type == "cuda",
    )
    codes, lines, index, counter = [], [], [], SkipCounter(desc)
    progress = Progress(limit or (len(dataset) if hasattr(dataset, "__len__") else 0), f"encoding {desc}", "image")
    for images, caps, idx, skipped in loader:
        progress.update(len(caps) + skipped)
        if caps and isinstance(caps[0], str):  # a streamed source: one caption per item
            caps = [[c] for c in caps]
        counter.add(len(caps) + skipped, skipped)
        if caps:
            codes.append(dvae.encode(images.to(device, non_blocking=True)).flatten(1).to(torch.int16).cpu())
            lines += caps
            index += idx
        if limit and len(lines) >= limit:
            break
    progress.close()
    counter.end_epoch()
    grid = dvae.cfg.grid**2
    codes = torch.cat(codes) if codes else torch.empty(0, grid, dtype=torch.int16)
    return codes[: limit or None], lines[: limit or None], index[: limit or None]


@dataclass
class TokenCache:
    """Encoded items: image codes (M, grid**2) int16; the captions of item m are rows
    text[ptr[m]:ptr[m + 1]] (C, variants, text_len) int32, variant 0 without BPE dropout."""

    codes: torch.Tensor
    ptr: torch.Tensor
    text: torch.Tensor

    def __len__(self) -> int:
        return self.codes.shape[0]

    @classmethod
    def build(cls, codes: torch.Tensor, lines: list[list[str]], tok: CaptionTokenizer, variants: int) -> TokenCache:
        flat = [c for cs in lines for c in cs]
        encs = [tok.encode(flat)] + [tok.encode(flat, dropout=True) for _ in range(variants)]
        ptr = torch.tensor([0] + [len(cs) for cs in lines]).cumsum(0)
        return cls(codes, ptr, torch.stack(encs, dim=1).to(torch.int32))

    def batch(self, index: torch.Tensor, generator: torch.Generator, dropout: bool) -> tuple[torch.Tensor, ...]:
        """(text (B, text_len), image (B, grid**2)) for items `index`: a random caption of each, a random
        BPE-dropout variant of it when dropout is on, else the clean encoding."""
        n_caps = self.ptr[index + 1] - self.ptr[index]
        pick = self.ptr[index] + (torch.rand(len(index), generator=generator) * n_caps).long()
        if dropout and self.text.shape[1] > 1:
            var = torch.randint(1, self.text.shape[1], (len(index),), generator=generator)
        else:
            var = torch.zeros(len(index), dtype=torch.long)
        return self.text[pick, var].long(), self.codes[index].long()

    def save(self, path: Path, key: dict) -> None:
        payload = {"key": key, "codes": self.codes, "ptr": self.ptr, "text": self.text}
        atomic_write(path, lambda p: torch.save(payload, p))

    @classmethod
    def load(cls, path: Path, key: dict) -> TokenCache | None:
        """The cache at path if it was built for `key`, else None."""
        if not path.exists():
            return None
        try:
            payload = torch.load(path, weights_only=True)
        except Exception:  # a damaged cache is rebuilt, not trusted
            return None
        if payload.get("key") != key:
            return None
        return cls(payload["codes"], payload["ptr"], payload["text"])
