"""Streaming statistics of image features: the Frechet distance (FID) and the Inception score (IS).

`FeatureStats` keeps running sums in float64 (count, sum of features, sum of outer products), so its
memory is D + D^2 numbers whatever the number of images, and two sets' sums add (or subtract: FID
without some images). `frechet_distance` takes the square root of the covariance product through two
symmetric eigendecompositions with negative eigenvalues (rounding) clipped to zero, so it stays finite
for rank-deficient covariances (fewer images than feature dimensions) where scipy's sqrtm can return
complex or NaN values.

`ClassStats` keeps, per split, the count, the sum of class probabilities and the sum of p log p: the
Inception score exp(E_x KL(p(y|x) || p(y))) = exp(E_x sum p log p - sum p(y) log p(y)) needs nothing
else. Image i goes to split i mod `splits` (not contiguous chunks: the total is not known while
streaming); the score is the mean over splits and its spread their standard deviation.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dalle_fast.files import atomic_write


class FeatureStats:
    """Running float64 sums of features [B, D]: count, sum (D,), sum of outer products (D, D)."""

    def __init__(self, dim: int):
        self.dim = dim
        self.n = 0
        self.sum = torch.zeros(dim, dtype=torch.float64)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64)

    def update(self, features: torch.Tensor) -> FeatureStats:
        if features.dim() != 2 or features.shape[1] != self.dim:
            raise ValueError(f"features must be [B, {self.dim}], got {list(features.shape)}")
        f = features.detach().to("cpu", torch.float64)
        if not torch.isfinite(f).all():
            raise ValueError("the feature extractor returned non-finite features")
        self.n += f.shape[0]
        self.sum += f.sum(0)
        self.outer += f.T @ f
        return self

    def __add__(self, other: FeatureStats) -> FeatureStats:
        return self._combine(other, 1)

    def __sub__(self, other: FeatureStats) -> FeatureStats:
        """The statistics of this set without `other`'s images (which must be among them)."""
        if other.n > self.n:
            raise ValueError(f"cannot take {other.n} images out of {self.n}")
        return self._combine(other, -1)

    def _combine(self, other: FeatureStats, sign: int) -> FeatureStats:
        if other.dim != self.dim:
            raise ValueError(f"features of different sizes ({self.dim} and {other.dim}) do not combine")
        out = FeatureStats(self.dim)
        out.n, out.sum, out.outer = (
            self.n + sign * other.n,
            self.sum + sign * other.sum,
            self.outer + sign * other.outer,
        )
        return out

    def mean(self) -> torch.Tensor:
        return self.sum / self.n

    def cov(self) -> torch.Tensor:
        """The unbiased covariance (n - 1 in the denominator, as numpy.cov and the FID references use)."""
        if self.n < 2:
            raise ValueError(f"a covariance needs at least 2 images, got {self.n}")
        mu = self.mean()
        return (self.outer - self.n * torch.outer(mu, mu)) / (self.n - 1)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"n": torch.tensor([self.n], dtype=torch.int64), "sum": self.sum, "outer": self.outer}

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor]) -> FeatureStats:
        s = cls(t["sum"].numel())
        s.n, s.sum, s.outer = int(t["n"][0]), t["sum"].double(), t["outer"].double()
        return s


def _psd_sqrt(m: torch.Tensor) -> torch.Tensor:
    """The symmetric square root of a symmetric positive semi-definite matrix (float64)."""
    w, v = torch.linalg.eigh((m + m.T) / 2)
    return (v * w.clamp(min=0).sqrt()) @ v.T


def frechet_distance(mu1: torch.Tensor, cov1: torch.Tensor, mu2: torch.Tensor, cov2: torch.Tensor) -> float:
    """|mu1 - mu2|^2 + tr(C1) + tr(C2) - 2 tr((C1 C2)^(1/2)), where tr((C1 C2)^(1/2)) is computed as
    tr((S C2 S)^(1/2)) with S = C1^(1/2): the same eigenvalues, but of a symmetric PSD matrix."""
    mu1, mu2, cov1, cov2 = (t.double() for t in (mu1, mu2, cov1, cov2))
    s = _psd_sqrt(cov1)
    eig = torch.linalg.eigvalsh((s @ cov2 @ s + (s @ cov2 @ s).T) / 2)
    value = (mu1 - mu2).square().sum() + cov1.trace() + cov2.trace() - 2 * eig.clamp(min=0).sqrt().sum()
    return max(float(value), 0.0)  # rounding can leave -1e-12 for identical sets


def fid(a: FeatureStats, b: FeatureStats) -> float:
    """The Frechet distance between two image sets' feature statistics."""
    if a.dim != b.dim:
        raise ValueError(f"features of different sizes ({a.dim} and {b.dim}): not the same extractor")
    return frechet_distance(a.mean(), a.cov(), b.mean(), b.cov())


class ClassStats:
    """Running sums for the Inception score over `splits` splits: count, sum of p(y|x), sum of p log p."""

    def __init__(self, classes: int, splits: int = 10):
        self.classes, self.splits = classes, splits
        self.n = torch.zeros(splits, dtype=torch.float64)
        self.p = torch.zeros(splits, classes, dtype=torch.float64)
        self.plogp = torch.zeros(splits, dtype=torch.float64)
        self.seen = 0  # images so far: the next one goes to split seen % splits

    def update(self, logits: torch.Tensor) -> ClassStats:
        if logits.dim() != 2 or logits.shape[1] != self.classes:
            raise ValueError(f"class logits must be [B, {self.classes}], got {list(logits.shape)}")
        logp = logits.detach().to("cpu", torch.float64).log_softmax(-1)
        p = logp.exp()
        split = (torch.arange(len(p)) + self.seen) % self.splits
        self.n.index_add_(0, split, torch.ones(len(p), dtype=torch.float64))
        self.p.index_add_(0, split, p)
        self.plogp.index_add_(0, split, (p * logp).nan_to_num().sum(-1))  # 0 log 0 = 0
        self.seen += len(p)
        return self

    def inception_score(self) -> tuple[float, float]:
        """(mean, standard deviation) over the splits that hold at least one image."""
        used = self.n > 0
        if not used.any():
            raise ValueError("no images: no Inception score")
        n, p, plogp = self.n[used], self.p[used], self.plogp[used]
        py = p / n[:, None]
        kl = plogp / n - (py * py.clamp(min=1e-300).log()).sum(-1)
        scores = kl.exp()
        std = float(scores.std(unbiased=False)) if len(scores) > 1 else 0.0
        return float(scores.mean()), std

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"n": self.n, "p": self.p, "plogp": self.plogp, "seen": torch.tensor([self.seen])}

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor]) -> ClassStats:
        s = cls(t["p"].shape[1], t["p"].shape[0])
        s.n, s.p, s.plogp, s.seen = t["n"], t["p"], t["plogp"], int(t["seen"][0])
        return s


def inception_score_of(probs: torch.Tensor, splits: int = 1) -> float:
    """The Inception score of class probabilities (N, K) in one go (a reference for tests and users)."""
    return ClassStats(probs.shape[1], splits).update(probs.clamp(min=1e-300).log()).inception_score()[0]


# ---- saving: one safetensors file of named statistics, with JSON metadata ---------------------------


def save_stats(path: str | Path, stats: dict[str, FeatureStats | ClassStats], meta: dict) -> Path:
    """Several named statistics (and metadata: what they were computed from) in one file, atomically."""
    tensors = {}
    for name, s in stats.items():
        kind = "f" if isinstance(s, FeatureStats) else "c"
        tensors.update({f"{kind}/{name}/{k}": v.contiguous() for k, v in s.tensors().items()})
    return atomic_write(path, lambda p: save_file(tensors, str(p), metadata={"meta": json.dumps(meta)}))


def load_stats(path: str | Path) -> tuple[dict[str, FeatureStats | ClassStats], dict]:
    """What save_stats wrote: (named statistics, metadata). ValueError for a file that is not one."""
    try:
        with safe_open(str(path), "pt") as f:
            meta = json.loads((f.metadata() or {}).get("meta", "{}"))
        grouped: dict[tuple[str, str], dict] = {}
        for key, value in load_file(str(path)).items():
            kind, rest = key.split("/", 1)
            name, part = rest.rsplit("/", 1)
            grouped.setdefault((kind, name), {})[part] = value
        stats = {
            name: (FeatureStats if kind == "f" else ClassStats).from_tensors(t) for (kind, name), t in grouped.items()
        }
    except Exception as e:  # safetensors raises its own errors for a truncated or foreign file
        raise ValueError(f"{path} is not a statistics file: {type(e).__name__}: {e}") from e
    return stats, meta


def finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None
