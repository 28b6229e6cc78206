"""Sampling from the command line: python -m dalle_fast.generate --run RUN "a caption" [...].

Writes into --out (default RUN/generated): grid.png (each caption's images in a row, with the caption
under each), one PNG per image named by caption index, caption and rank (003_a-red-circle_01.png: the
4th caption's second image, the best first when reranked), and captions.json, which maps every file to
its caption and score and records the settings that drew them (the same settings and seed draw the same
images). Prints a JSON line of what it wrote.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dalle_fast.cli import build_parser, parse_config, run_or_exit
from dalle_fast.errors import FieldError, check_finite, field_errors
from dalle_fast.files import atomic_write, check_writable
from dalle_fast.runs.checkpoint import load_config
from dalle_fast.runs.images import save_captioned_grid, save_png
from dalle_fast.runs.load import load_transformer
from dalle_fast.sampling.rerank import find_scorer
from dalle_fast.sampling.sample import MIN_TEMPERATURE, check_captions, generate, load_prime, sampling_device


@dataclass
class GenerateConfig:
    """Samples images for captions from a trained stage-2 run (a PNG grid plus one PNG per image)."""

    run: str = field(
        default="", metadata={"help": "the stage-2 run directory (python -m dalle_fast.train dalle --out)"}
    )
    images: int = field(default=8, metadata={"help": "images kept per caption (also -n, --keep)"})
    rerank: int = field(default=0, metadata={"help": "draw this many per caption and keep the best by CLIP; 0: none"})
    clip: str = field(
        default="",
        metadata={"help": "CLIP run or open_clip:ARCH:WEIGHTS_FILE; empty: RUN/../clip; none: no reranking"},
    )
    temperature: float = field(default=1.0, metadata={"help": "softmax temperature of the image tokens"})
    top_k: int = field(default=0, metadata={"help": "sample among the k likeliest tokens; 0: all"})
    top_p: float = field(default=1.0, metadata={"help": "sample among the likeliest tokens holding this mass"})
    guidance: float = field(
        default=1.0,
        metadata={"help": "classifier-free guidance scale (a run trained with --caption-dropout); 1: none"},
    )
    seed: int = field(default=0, metadata={"help": "seed of the sampling (same seed, same images)"})
    prime: str = field(default="", metadata={"help": "image to complete: its top --prime-rows token rows are kept"})
    prime_rows: int = field(default=0, metadata={"help": "token rows of --prime kept; 0: half the grid"})
    captions_file: str = field(default="", metadata={"help": "more captions, one per line"})
    out: str = field(default="", metadata={"help": "output folder; empty: RUN/generated"})
    batch_size: int = field(default=64, metadata={"help": "images sampled at once"})
    threads: int = field(default=0, metadata={"help": "torch CPU threads; 0: torch's default"})
    no_cache: bool = field(default=False, metadata={"help": "recompute the sequence per token (the slow reference)"})
    device: str = field(
        default="auto", metadata={"help": "auto (the GPU when the model's attention runs there) | cpu | cuda | cuda:N"}
    )

    def __post_init__(self):
        check_finite(self)
        if not self.run:
            raise ValueError("--run is required: the stage-2 run directory")
        if self.images < 1 or self.batch_size < 1:
            raise ValueError(f"-n and --batch-size must be >= 1, got {self.images}, {self.batch_size}")
        if self.rerank and self.rerank < self.images:
            raise ValueError(f"--rerank ({self.rerank}) must be 0 or at least -n/--keep ({self.images})")
        if self.rerank < 0 or self.prime_rows < 0 or self.threads < 0:
            raise ValueError("--rerank, --prime-rows and --threads must be >= 0")
        if not MIN_TEMPERATURE <= self.temperature or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"need --temperature >= {MIN_TEMPERATURE}, --top-k >= 0 and 0 < --top-p <= 1")
        if not self.guidance >= 1:
            raise ValueError(f"--guidance must be >= 1 (1: none), got {self.guidance}")
        if self.prime_rows and not self.prime:
            raise ValueError("--prime-rows needs --prime IMAGE")


def run_generate(cfg: GenerateConfig, captions: list[str]) -> dict:
    """The CLI's job: loads the run, samples (and reranks), writes grid.png and one PNG per image."""
    if cfg.captions_file:
        try:
            captions = list(captions) + [ln for ln in Path(cfg.captions_file).read_text().splitlines() if ln.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise FieldError("captions_file", f"cannot read {cfg.captions_file}: {e}") from e
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out or Path(cfg.run) / "generated")
    with field_errors("run"):
        model, tok, dvae = load_transformer(cfg.run)
    check_writable(out)  # before any sampling: its results must have somewhere to go
    device = sampling_device(cfg.device, model, cache=not cfg.no_cache)
    model.to(device)
    if cfg.guidance != 1 and not load_config(cfg.run).get("train", {}).get("caption_dropout", 0):
        print(
            f"warning: {cfg.run} was trained without --caption-dropout, so it never saw the empty caption that "
            "--guidance compares against; expect worse samples, not better",
            file=sys.stderr,
        )
    text = check_captions(captions, tok)
    captions = [c.strip() for c in captions]
    prime = original = None
    if cfg.prime:
        rows = cfg.prime_rows or model.cfg.image_size // 2
        prime, original = load_prime(cfg.prime, dvae, rows)
    scorer = None
    if cfg.rerank:
        scorer, spec = find_scorer(cfg.run, cfg.clip)
        if scorer is None:
            if spec == "none":
                raise ValueError(f"--rerank {cfg.rerank} needs a CLIP model, but --clip is none; use --rerank 0")
            raise ValueError(
                f"--rerank needs a CLIP model: none in {spec}; pass --clip RUN (train one with "
                f"python -m dalle_fast.train clip --dalle {cfg.run}) or --clip open_clip:ARCH:WEIGHTS_FILE"
            )

    result = generate(
        model, text, dvae, draws=cfg.rerank or cfg.images, keep=cfg.images, scorer=scorer, captions=captions,
        prime=prime, batch_size=cfg.batch_size, generator=torch.Generator(device).manual_seed(cfg.seed),
        cache=not cfg.no_cache, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, guidance=cfg.guidance,
    )  # fmt: skip
    images = result["images"]  # (C, keep, 3, H, W)
    labels = [c for c in captions for _ in range(cfg.images)]
    grid_images = images.flatten(0, 1)
    if original is not None:  # completion: each row starts with the prime image, below the kept rows greyed
        shown = original.clone()
        shown[:, (prime.numel() // model.cfg.image_size) * dvae.cfg.factor :] = 0.5
        grid_images = torch.cat([torch.stack([shown] * len(captions)).unsqueeze(1), images], 1).flatten(0, 1)
        labels = [x for c in captions for x in ["prime (kept rows)"] + [c] * cfg.images]
    grid = save_captioned_grid(out / "grid.png", grid_images, labels, columns=len(labels) // len(captions))
    files: dict[str, dict] = {}
    for c, per_caption in enumerate(images):
        for k, image in enumerate(per_caption):
            name = save_png(out / f"{c:03d}_{_slug(captions[c])}_{k + 1:02d}.png", image).name
            files[name] = {"caption": captions[c], "caption_index": c, "rank": k + 1}
            if cfg.rerank:
                files[name]["score"] = round(float(result["scores"][c, k]), 4)
    settings = {
        "run": cfg.run, "seed": cfg.seed, "images": cfg.images, "rerank": cfg.rerank, "clip": cfg.clip,
        "temperature": cfg.temperature, "top_k": cfg.top_k, "top_p": cfg.top_p, "guidance": cfg.guidance,
        "prime": cfg.prime, "prime_rows": cfg.prime_rows, "batch_size": cfg.batch_size, "cache": not cfg.no_cache,
        "device": str(device),
    }  # fmt: skip
    record = json.dumps({"settings": settings, "files": files}, indent=1)
    atomic_write(out / "captions.json", lambda tmp: tmp.write_text(record))
    summary = {"grid": str(grid), "images": len(files), "out": str(out), "captions": str(out / "captions.json")}
    if cfg.rerank:
        summary["mean_kept_score"] = round(float(result["scores"].mean()), 4)
    return summary


def _slug(caption: str, limit: int = 40) -> str:
    """A file-name-safe short form of a caption: "A red circle!" -> "a-red-circle"."""
    return re.sub(r"[^a-z0-9]+", "-", caption.lower()).strip("-")[:limit].rstrip("-") or "caption"


def main(argv: list[str] | None = None) -> int:
    """`python -m dalle_fast.generate --run RUN "a caption" ["another" ...] [-n 16] [--rerank 64] ...`"""
    ap = build_parser(GenerateConfig, "python -m dalle_fast.generate")
    ap.add_argument("captions", nargs="*", help="captions to draw (one grid row each)")
    ap.add_argument("-n", "--keep", dest="images", type=int, default=argparse.SUPPRESS, help="same as --images")
    args = vars(ap.parse_args(argv))
    captions = args.pop("captions")
    result = run_or_exit(ap, GenerateConfig, run_generate, parse_config(ap, GenerateConfig, args), captions)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
