"""Feature extractors for FID, IS and near duplicates: the user's to give, since nothing is downloaded.

Three forms of `extractor`:

  inception:WEIGHTS.pth  the standard FID InceptionV3 of torch-fidelity (pip install torch-fidelity: it
                         brings torchvision, which must match your torch), from its weights file
                         (weights-inception-2015-12-05-6726825d.pth, or your copy). 2048 features, and
                         the 1008 logits (without bias) for IS, as torch-fidelity and torchmetrics use them.
  FILE (or torchscript:FILE)
                         a TorchScript module (torch.jit.save) mapping float images in [0, 1], (B, 3, H,
                         W) at the images' own size, to features (B, D), or to (features, class logits
                         (B, K)) to get an Inception score too.
  shapes                 the judge of caption fidelity (dalle_fast.models.judge) trained here on rendered
                         shapes at the images' size, saved as TorchScript in the cache folder and loaded
                         from there like any TorchScript file: 256 features, 24 colour-shape classes.

Every extractor is known by the sha256 of its file, recorded with every result: statistics are cached
under it and two results are comparable only when it is the same. The weights file of `inception:` is
read without unpickling anything but tensors (dalle_fast.runs.torch_pickle); torch-fidelity is handed
a copy this code wrote from those tensors. A file whose name ends in a hash prefix, as torch hub names
them (-6726825d.pth), must match it.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
import warnings
from pathlib import Path

import torch

from dalle_fast.errors import FieldError
from dalle_fast.evaluation.fidelity import train_classifier
from dalle_fast.files import atomic_write, file_sha256
from dalle_fast.models.judge import JudgeFeatures
from dalle_fast.runs.torch_pickle import read_torch_file

EXTRACTOR_FORMS = "inception:WEIGHTS_FILE, a TorchScript file (or torchscript:FILE), or shapes"


class Extractor:
    """A feature module and what identifies it: `spec` (as given), `kind` (inception, torchscript,
    shapes), `sha256` of its file. Called on uint8 images (B, 3, H, W): (features (B, D) float32, class
    logits (B, K) or None)."""

    def __init__(self, module: torch.nn.Module, spec: str, kind: str, sha256: str, takes_uint8: bool = False):
        self.module, self.spec, self.kind, self.sha256, self.takes_uint8 = module, spec, kind, sha256, takes_uint8
        self.device = torch.device("cpu")

    def to(self, device: torch.device | str) -> Extractor:
        self.device = torch.device(device)
        self.module.to(self.device)
        return self

    def identity(self) -> dict:
        """What a result records of its extractor."""
        return {"extractor": self.spec, "extractor_kind": self.kind, "extractor_sha256": self.sha256}

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 images [B, 3, H, W], got {images.dtype} {list(images.shape)}")
        x = images.to(self.device)
        x = x if self.takes_uint8 else x.float() / 255
        try:
            out = self.module(x)
        except Exception as e:  # a user's module failing on these images: say so, in a line
            raise FieldError(
                "extractor", f"{self.spec} failed on images {list(images.shape)}: {type(e).__name__}: {e}"
            ) from e
        parts = list(out) if isinstance(out, (tuple, list)) else [out]
        B = len(images)
        ok = 1 <= len(parts) <= 2 and all(
            isinstance(p, torch.Tensor) and p.dim() == 2 and p.shape[0] == B and p.is_floating_point() for p in parts
        )
        if not ok:
            got = [list(p.shape) if isinstance(p, torch.Tensor) else type(p).__name__ for p in parts]
            raise FieldError(
                "extractor", f"{self.spec} must return features [B, D] or (features, logits [B, K]); got {got}"
            )
        feats = parts[0].float().cpu()
        logits = parts[1].float().cpu() if len(parts) == 2 else None
        return feats, logits


def default_cache() -> Path:
    """Where extractors trained here and reference statistics are kept: $XDG_CACHE_HOME/dalle_fast
    (~/.cache/dalle_fast)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dalle_fast"


def _check_sha(path: Path, sha: str, expected: str) -> None:
    if expected and sha != expected.lower():
        raise FieldError("extractor_sha256", f"{path} has sha256 {sha}, expected {expected.lower()}")
    m = re.search(r"-([0-9a-f]{8,64})\.[A-Za-z]+$", path.name)
    if m and not sha.startswith(m.group(1)):
        raise FieldError(
            "extractor", f"{path}: its name says sha256 {m.group(1)}..., its content is {sha}: altered or truncated"
        )


def _torchscript(path: Path, spec: str, kind: str, sha: str) -> Extractor:
    try:
        with warnings.catch_warnings():  # torch 2.9+ calls TorchScript deprecated; it is the format asked for
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            module = torch.jit.load(str(path), map_location="cpu")
    except Exception as e:  # torch raises RuntimeError and others for a file that is not TorchScript
        raise FieldError("extractor", f"{path} is not a TorchScript file (torch.jit.save): {str(e)[:200]}") from e
    return Extractor(module.eval(), spec, kind, sha)


def _inception(path: Path, spec: str, sha: str) -> Extractor:
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError as e:
        raise FieldError(
            "extractor",
            "inception: needs torch-fidelity (pip install torch-fidelity; it installs torchvision, which must "
            f"be the build for your torch): {e}",
        ) from e
    try:
        state = read_torch_file(path, classes=())
    except ValueError as e:
        raise FieldError("extractor", f"inception:{path}: not a torch-fidelity InceptionV3 weights file: {e}") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise FieldError("extractor", f"inception:{path}: expected a state dict of tensors")
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "weights.pth"
        torch.save(dict(state), copy)  # only tensors this code read: safe for the library's own torch.load
        try:
            module = FeatureExtractorInceptionV3(
                "inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=str(copy)
            )
        except RuntimeError as e:  # load_state_dict: missing or mis-shaped entries
            raise FieldError("extractor", f"inception:{path}: not InceptionV3 weights: {str(e)[:300]}") from e
    return Extractor(module, spec, "inception", sha, takes_uint8=True)


def shapes_extractor_file(cache: Path, image_size: int, steps: int = 1200, seed: int = 0) -> Path:
    """The shapes extractor for images of `image_size` px, trained (once: then read from the cache) and
    saved as TorchScript."""
    path = Path(cache) / "extractors" / f"shapes-{image_size}px-{steps}steps-seed{seed}.pt"
    if path.is_file():
        return path
    if image_size < 8:
        raise FieldError("extractor", f"shapes: images of {image_size} px; the shapes extractor needs >= 8")
    print(f"training the shapes extractor at {image_size} px ({steps} updates), once: kept as {path}", file=sys.stderr)
    items = 8000 if steps >= 200 else 64  # a short training (tests) renders few scenes
    judge = train_classifier(image_size, items=items, steps=steps, seed=seed)["model"]
    module = JudgeFeatures(judge).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecation and tracer warnings: the graph has no data-dependent branch
        traced = torch.jit.trace(module, torch.rand(2, 3, image_size, image_size))
    atomic_write(path, lambda p: traced.save(str(p)))
    return path


def load_extractor(
    spec: str, *, image_size: int | None = None, cache: str | Path = "", expected_sha256: str = "", steps: int = 1200
) -> Extractor:
    """An Extractor for one of the forms above (`image_size`: the images' size, for `shapes`). FieldError
    naming `extractor` (or `extractor_sha256`) for a missing, unreadable or unexpected file."""
    if not spec:
        raise FieldError("extractor", f"required: {EXTRACTOR_FORMS} (nothing is downloaded)")
    if spec == "shapes":
        if image_size is None:
            raise FieldError("extractor", "shapes: the images' size is not known")
        path = shapes_extractor_file(Path(cache or default_cache()), image_size, steps)
        sha = file_sha256(path)
        _check_sha(path, sha, expected_sha256)
        return _torchscript(path, spec, "shapes", sha)
    kind, sep, rest = spec.partition(":")
    if sep and kind in ("inception", "torchscript"):
        path = Path(rest)
    else:
        kind, path = "torchscript", Path(spec)
    if not path.is_file():
        raise FieldError("extractor", f"{path}: no such file ({EXTRACTOR_FORMS})")
    sha = file_sha256(path)
    _check_sha(path, sha, expected_sha256)
    return _inception(path, spec, sha) if kind == "inception" else _torchscript(path, spec, kind, sha)
