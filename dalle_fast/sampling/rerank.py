"""Reranking (the paper's Section 3): score each drawn image against its caption, keep the best.

A `Scorer` maps (images (B, 3, H, W) in [0, 1], B captions) to one similarity per pair. `load_scorer`
makes one from a CLIP run of this project (dalle_fast.training.clip) or from `open_clip:ARCH:WEIGHTS`
(the open_clip package with local weights); `rerank` picks the indices of the best.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from dalle_fast.data.tokenizer import CaptionTokenizer
from dalle_fast.errors import field_errors
from dalle_fast.models.clip import CLIP
from dalle_fast.runs.load import load_clip


class Scorer:
    """score(images (B, 3, H, W) in [0, 1], captions: B strings) -> (B,) image-caption similarity."""

    def score(self, images: torch.Tensor, captions: list[str]) -> torch.Tensor:
        raise NotImplementedError


class CLIPScorer(Scorer):
    def __init__(self, model: CLIP, tok: CaptionTokenizer):
        self.model, self.tok = model.eval(), tok

    @torch.no_grad()
    def score(self, images: torch.Tensor, captions: list[str]) -> torch.Tensor:
        if len(captions) != len(images):
            raise ValueError(f"need one caption per image, got {len(captions)} for {len(images)}")
        device = next(self.model.parameters()).device
        return torch.cat([
            self.model.similarity(images[i : i + 256].to(device), self.tok.encode(captions[i : i + 256]).to(device))
            for i in range(0, len(images), 256)
        ]).cpu()  # fmt: skip


class OpenCLIPScorer(Scorer):
    """An open_clip model with local weights: `open_clip:ARCH:WEIGHTS_FILE` (e.g. open_clip:ViT-B-32:/m/b32.pt)."""

    def __init__(self, arch: str, weights: str):
        try:
            import open_clip
        except ImportError as e:
            raise ValueError(
                "open_clip:...: the open_clip package is not installed (pip install open_clip_torch)"
            ) from e
        if not Path(weights).is_file():
            raise ValueError(f"open_clip:{arch}:{weights}: no such weights file")
        self.model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=weights)
        self.model.eval()
        self.tokenize = open_clip.get_tokenizer(arch)
        norm = next(t for t in preprocess.transforms if type(t).__name__ == "Normalize")
        self.mean, self.std = torch.tensor(norm.mean).view(1, 3, 1, 1), torch.tensor(norm.std).view(1, 3, 1, 1)
        size = self.model.visual.image_size
        self.size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)

    @torch.no_grad()
    def score(self, images: torch.Tensor, captions: list[str]) -> torch.Tensor:
        x = F.interpolate(images.float(), size=self.size, mode="bicubic", align_corners=False).clamp(0, 1)
        img = F.normalize(self.model.encode_image((x - self.mean) / self.std), dim=-1)
        txt = F.normalize(self.model.encode_text(self.tokenize(captions)), dim=-1)
        return (img * txt).sum(-1)


def load_scorer(spec: str) -> Scorer:
    """A CLIP run directory, or open_clip:ARCH:WEIGHTS_FILE."""
    if spec.startswith("open_clip:"):
        parts = spec.split(":", 2)
        if len(parts) != 3 or not parts[1] or not parts[2]:
            raise ValueError(f"expected a CLIP run folder or open_clip:ARCH:WEIGHTS_FILE, got {spec!r}")
        return OpenCLIPScorer(parts[1], parts[2])
    return CLIPScorer(*load_clip(spec))


def find_scorer(run: str | Path, clip: str = "") -> tuple[Scorer | None, str]:
    """(the reranker of a stage-2 run, where it is): `clip` when given (its errors name the clip field),
    else the CLIP run beside the run (RUN/../clip) when there is one; (None, where it was looked for)
    otherwise. `clip` "none" asks for no reranker: (None, "none")."""
    if clip == "none":
        return None, clip
    spec = clip or str(Path(run).parent / "clip")
    if not clip and not (Path(spec) / "config.json").exists():
        return None, spec
    with field_errors("clip"):
        return load_scorer(spec), spec


def rerank(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices (..., keep) of the `keep` highest scores along the last dim, best first."""
    if not 1 <= keep <= scores.shape[-1]:
        raise ValueError(f"keep must be in [1, {scores.shape[-1]}], got {keep}")
    return scores.topk(keep, dim=-1).indices
