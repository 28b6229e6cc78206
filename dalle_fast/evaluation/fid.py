"""FID and IS between image folders (python -m dalle_fast.evaluate fid DIR_A [DIR_B] --extractor ...).

`BlurStats` holds, for each blur radius, the streaming statistics of one image set (features for FID,
class probabilities for IS when the extractor gives logits); `accumulate` feeds it uint8 batches, each
blurred per radius by the one convention (dalle_fast.evaluation.image_sets). `compare_folders` is the
command: one folder gives its IS, two give FID between them (and each one's IS).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from dalle_fast.errors import FieldError, check_finite, field_errors
from dalle_fast.evaluation.extractors import Extractor, load_extractor
from dalle_fast.evaluation.image_sets import ImageFolder, gaussian_blur
from dalle_fast.evaluation.statistics import ClassStats, FeatureStats, fid
from dalle_fast.ops.device import choose_device, parse_device
from dalle_fast.progress import Progress


def parse_numbers(text: str, name: str, kind=float, minimum: float = 0) -> list:
    """ "0,1,2" -> [0.0, 1.0, 2.0]; FieldError naming `name` for anything else."""
    try:
        values = [kind(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or any(not math.isfinite(v) or v < minimum for v in values):
        raise FieldError(name, f"must be a comma list of numbers >= {minimum}, got {text!r}")
    return sorted(set(values))


class BlurStats:
    """Per blur radius: FeatureStats, and ClassStats when the extractor gives class logits."""

    def __init__(self, blurs: list[float], splits: int = 10):
        self.blurs, self.splits = list(blurs), splits
        self.features: dict[float, FeatureStats] = {}
        self.classes: dict[float, ClassStats] = {}

    @property
    def n(self) -> int:
        return next(iter(self.features.values())).n if self.features else 0

    def accumulate(self, extractor: Extractor, images: torch.Tensor) -> None:
        """uint8 images (B, 3, H, W), each blurred by every radius, through the extractor."""
        for r in self.blurs:
            feats, logits = extractor(gaussian_blur(images, r))
            self.features.setdefault(r, FeatureStats(feats.shape[1])).update(feats)
            if logits is not None:
                self.classes.setdefault(r, ClassStats(logits.shape[1], self.splits)).update(logits)

    def named(self, prefix: str = "") -> dict:
        """Flat {name: stats} for save_stats."""
        out: dict = {f"{prefix}features@{r:g}": s for r, s in self.features.items()}
        out.update({f"{prefix}classes@{r:g}": s for r, s in self.classes.items()})
        return out

    @classmethod
    def from_named(cls, named: dict, blurs: list[float], splits: int = 10, prefix: str = "") -> BlurStats:
        s = cls(blurs, splits)
        for r in blurs:
            if f"{prefix}features@{r:g}" in named:
                s.features[r] = named[f"{prefix}features@{r:g}"]
            if f"{prefix}classes@{r:g}" in named:
                s.classes[r] = named[f"{prefix}classes@{r:g}"]
        return s

    def inception_score(self, r: float) -> tuple[float, float] | None:
        return self.classes[r].inception_score() if r in self.classes else None


@dataclass
class FidConfig:
    """FID between two image folders, or the Inception score of one (one JSON line on stdout)."""

    folders: list = field(
        default_factory=list,
        metadata={"positional": "+", "help": "DIR_A [DIR_B]: image folders (searched recursively)"},
    )
    extractor: str = field(
        default="", metadata={"help": "inception:WEIGHTS.pth | a TorchScript file | shapes (docs/evaluation.md)"}
    )
    extractor_sha256: str = field(default="", metadata={"help": "the extractor file's expected sha256; empty: any"})
    size: int = field(
        default=0, metadata={"help": "bring every image to SIZE x SIZE (centred square, bicubic); 0: keep"}
    )
    blur: str = field(default="0", metadata={"help": "Gaussian blur radii (px), comma-separated, both folders alike"})
    limit: int = field(default=0, metadata={"help": "at most this many images per folder (sorted by path); 0: all"})
    splits: int = field(default=10, metadata={"help": "splits of the Inception score (mean and std over them)"})
    batch_size: int = field(default=50, metadata={"help": "images per extractor call"})
    cache: str = field(default="", metadata={"help": "cache folder (the shapes extractor); empty: ~/.cache/dalle_fast"})
    extractor_steps: int = field(default=1200, metadata={"help": "updates of the shapes extractor when trained"})
    threads: int = field(default=0, metadata={"help": "torch CPU threads; 0: torch's default"})
    device: str = field(default="auto", metadata={"help": "where the extractor runs: auto | cpu | cuda | cuda:N"})

    def __post_init__(self):
        check_finite(self)
        if not 1 <= len(self.folders) <= 2:
            raise FieldError("folders", f"give one folder (its IS) or two (FID between them), got {len(self.folders)}")
        for name in ("batch_size", "splits", "extractor_steps"):
            if getattr(self, name) < 1:
                raise FieldError(name, f"must be >= 1, got {getattr(self, name)}")
        for name in ("size", "limit", "threads"):
            if getattr(self, name) < 0:
                raise FieldError(name, f"must be >= 0, got {getattr(self, name)}")
        parse_numbers(self.blur, "blur")
        parse_device(self.device)


def folder_stats(
    folder: ImageFolder, extractor: Extractor, blurs: list[float], batch_size: int, splits: int
) -> BlurStats:
    stats = BlurStats(blurs, splits)
    bar = Progress(len(folder), f"features of {folder.root}", unit="img")
    done = 0
    for consumed, images in folder.batches(batch_size):
        stats.accumulate(extractor, images)
        bar.update(consumed - done)
        done = consumed
    bar.close()
    return stats


def compare_folders(cfg: FidConfig) -> dict:
    """{"fid": ..., "fid_blur": {radius: fid}, "is_a", "is_a_std", ..., images and skips per folder, the
    extractor's identity}; "fid" is at the first radius (0 by default)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    blurs = parse_numbers(cfg.blur, "blur")
    folders = []
    for name, path in zip(("a", "b"), cfg.folders, strict=False):
        with field_errors("folders"):
            folders.append((name, ImageFolder(path, cfg.size or None, cfg.limit)))
    size = cfg.size or None
    if cfg.extractor == "shapes" and size is None:  # trained at the images' size: the first readable one's
        with field_errors("folders"):
            size = next(folders[0][1].batches(1))[1].shape[-1]
            folders[0][1].skipped_files.clear()
    extractor = load_extractor(
        cfg.extractor, image_size=size, cache=cfg.cache, expected_sha256=cfg.extractor_sha256, steps=cfg.extractor_steps
    )
    extractor.to(choose_device(cfg.device))
    result: dict = dict(extractor.identity())
    stats = {}
    for name, folder in folders:
        with field_errors("folders"):
            stats[name] = folder_stats(folder, extractor, blurs, cfg.batch_size, cfg.splits)
        result[f"images_{name}"] = stats[name].n
        result[f"skipped_{name}"] = folder.skipped
        if folder.skipped:
            result[f"skipped_{name}_first"] = folder.skipped_files[:3]
        if folder.shape is not None:
            result[f"size_{name}"] = list(folder.shape)
        for r in blurs:
            score = stats[name].inception_score(r)
            if score is not None:
                suffix = "" if r == blurs[0] else f"_blur{r:g}"
                result[f"is_{name}{suffix}"], result[f"is_{name}_std{suffix}"] = score
    if len(folders) == 2:
        a, b = stats["a"], stats["b"]
        for name in ("a", "b"):
            if stats[name].n < 2:
                raise FieldError("folders", f"{cfg.folders['ab'.index(name)]}: FID needs at least 2 readable images")
        by_blur = {f"{r:g}": fid(a.features[r], b.features[r]) for r in blurs}
        result = {"fid": by_blur[f"{blurs[0]:g}"], **({"fid_blur": by_blur} if len(blurs) > 1 else {}), **result}
    return result
