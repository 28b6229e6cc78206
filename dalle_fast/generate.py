"""Sampling image tokens from a trained transformer, and the captioned PNG grids samples are shown in.

`sample_tokens` draws the image tokens one at a time (temperature, top-k, top-p, a seeded generator).
By default it decodes through a key/value cache (`dalle_fast.kv_cache`: the prompt runs once, then each
new token attends only to the cached keys its layer's mask allows); cache=False recomputes the whole
sequence for every token, the plain reference the cache is tested against. Both draw the same random
numbers in the same order, so for a seed they give the same tokens (up to fp32 rounding of the logits).
"""

from __future__ import annotations

import contextlib
import sys
import textwrap
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dalle_fast.checkpoint import atomic_write, load_config
from dalle_fast.kv_cache import decode_step, prefill
from dalle_fast.tokenizer import PAD
from dalle_fast.transformer import DALLE


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Keeps the top_k largest logits (0: all) and the smallest set whose probability reaches top_p
    (1.0: all); the rest become -inf. logits: (B, V)."""
    if top_k < 0 or not 0.0 < top_p <= 1.0:
        raise ValueError(f"need top_k >= 0 and 0 < top_p <= 1, got top_k={top_k}, top_p={top_p}")
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # keep every token until the mass reaches top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def sampling_autocast(model: DALLE, device: torch.device | str):
    """The autocast sampling runs under: bf16 on CUDA for a sparse-attention model outside any autocast
    (the CUDA attention kernels take fp16 and bf16; an fp32 model would be refused there), else none.
    The logits stay fp32 either way."""
    device = torch.device(device)
    if device.type != "cuda" or model.cfg.attention == "dense" or torch.is_autocast_enabled("cuda"):
        return contextlib.nullcontext()
    with warnings.catch_warnings():  # built without a GPU (tests), torch warns that it disables itself
        warnings.simplefilter("ignore")
        return torch.autocast("cuda", dtype=torch.bfloat16)


@torch.no_grad()
def sample_tokens(
    model: DALLE,
    text: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    guidance: float = 1.0,
    generator: torch.Generator | None = None,
    prime: torch.Tensor | None = None,
    cache: bool = True,
) -> torch.Tensor:
    """Image tokens (B, image_size**2) for text (B, text_len). prime: (B, P) first image tokens to keep.
    cache=False: recompute the whole sequence per token (the reference path).

    guidance > 1 (classifier-free guidance; for a model trained with caption dropout): each token's logits
    become u + guidance * (c - u), c given the caption and u given the empty one (a second sequence per
    sample, decoded alongside), which pushes samples toward what the caption adds.

    On CUDA an fp32 model samples under bf16 autocast (see sampling_autocast)."""
    with sampling_autocast(model, text.device):
        return _sample_tokens(model, text, temperature, top_k, top_p, guidance, generator, prime, cache)


def _sample_tokens(model, text, temperature, top_k, top_p, guidance, generator, prime, cache) -> torch.Tensor:
    cfg = model.cfg
    n = cfg.image_size**2
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if guidance < 1:
        raise ValueError(f"guidance must be >= 1 (1: none), got {guidance}")
    image = torch.zeros(text.shape[0], n, dtype=torch.long, device=text.device)
    start = 0
    if prime is not None:
        model.check_tokens(text, prime, image_len=prime.shape[1] if prime.dim() == 2 else None)
        start = prime.shape[1]
        image[:, :start] = prime
    model.check_tokens(text, image)
    if start == n:
        return image
    B, guided = text.shape[0], guidance != 1
    seq_text = torch.cat([text, torch.full_like(text, PAD)]) if guided else text  # rows B..2B-1: the empty caption
    seq_image = image.repeat(2, 1) if guided else image
    if cache:
        kv, logits = prefill(model, seq_text, seq_image, start)
    for j in range(start, n):
        if not cache:
            logits = model.image_logits(model.hidden(seq_text, seq_image)[:, cfg.text_len - 1 + j])  # (B', vocab)
        elif j > start:
            logits = decode_step(model, kv, seq_image[:, j - 1])
        if guided:
            cond, uncond = logits.float().chunk(2)
            logits = uncond + guidance * (cond - uncond)
        probs = filter_logits(logits / temperature, top_k, top_p).softmax(-1)
        token = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        seq_image[:, j] = token.repeat(2) if guided else token
    return seq_image[:B]


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
    arr = (images.detach().float().clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    for i, (a, ls) in enumerate(zip(arr, lines, strict=True)):
        x = 4 + (i % cols) * (cell + 4)
        y = 4 + (i // cols) * (cell + text_h + 4)
        grid.paste(Image.fromarray(a).resize((cell, cell), Image.Resampling.NEAREST), (x, y))
        for k, line in enumerate(ls):
            draw.text((x, y + cell + 2 + 12 * k), line, fill=(0, 0, 0), font=font)
    path = Path(path)
    atomic_write(path, lambda p: grid.save(p, format="PNG"))
    return path


# ---- the command line: python -m dalle_fast.generate ---------------------------------------------------


@dataclass
class GenerateConfig:
    """Samples images for captions from a trained stage-2 run (a PNG grid plus one PNG per image)."""

    run: str = field(
        default="", metadata={"help": "the stage-2 run directory (python -m dalle_fast.train dalle --out)"}
    )
    images: int = field(default=8, metadata={"help": "images kept per caption (also -n, --keep)"})
    rerank: int = field(default=0, metadata={"help": "draw this many per caption and keep the best by CLIP; 0: none"})
    clip: str = field(default="", metadata={"help": "CLIP run or open_clip:ARCH:WEIGHTS_FILE; empty: RUN/../clip"})
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
    no_cache: bool = field(default=False, metadata={"help": "recompute the sequence per token (the slow reference)"})
    device: str = field(
        default="auto", metadata={"help": "auto (the GPU when the model's attention runs there) | cpu | cuda | cuda:N"}
    )

    def __post_init__(self):
        if not self.run:
            raise ValueError("--run is required: the stage-2 run directory")
        if self.images < 1 or self.batch_size < 1:
            raise ValueError(f"-n and --batch-size must be >= 1, got {self.images}, {self.batch_size}")
        if self.rerank and self.rerank < self.images:
            raise ValueError(f"--rerank ({self.rerank}) must be 0 or at least -n/--keep ({self.images})")
        if self.rerank < 0 or self.prime_rows < 0:
            raise ValueError("--rerank and --prime-rows must be >= 0")
        if self.temperature <= 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ValueError("need --temperature > 0, --top-k >= 0 and 0 < --top-p <= 1")
        if not self.guidance >= 1:
            raise ValueError(f"--guidance must be >= 1 (1: none), got {self.guidance}")
        if self.prime_rows and not self.prime:
            raise ValueError("--prime-rows needs --prime IMAGE")


def sampling_device(name: str, model: DALLE, cache: bool = True) -> torch.device:
    """--device for sampling `model`: auto is the GPU when the model's attention can run there (a dense
    model: any GPU; a sparse one: this build's CUDA kernels on the GPU, with a head dim they cover), else
    the CPU. An explicit cuda that cannot run it is a ValueError that says why."""
    from dalle_fast.ops import CUDA_HEAD_DIMS, cuda_unusable_reason
    from dalle_fast.train import parse_device

    def why_not(device: torch.device) -> str | None:
        if not torch.cuda.is_available():
            return "no CUDA device is available"
        if model.cfg.attention == "dense" and not cache:  # torch's own attention only
            return None
        if (why := cuda_unusable_reason(device)) is not None:  # the cache's decode kernel, the sparse kernels
            return why
        if model.cfg.attention != "dense" and model.cfg.head_dim not in CUDA_HEAD_DIMS:
            dims = CUDA_HEAD_DIMS
            return f"the model's head_dim {model.cfg.head_dim} has no CUDA attention kernel (head dims {dims})"
        return None

    if name == "auto":
        return torch.device("cuda" if why_not(torch.device("cuda")) is None else "cpu")
    device = parse_device(name)
    if device.type == "cuda" and (why := why_not(device)) is not None:
        raise ValueError(f"--device {name}: {why}; sample with --device cpu")
    return device


def check_captions(captions: list[str], tok) -> torch.Tensor:
    """BPE ids (C, text_len); ValueError for an empty caption, a one-line warning for a truncated one."""
    import warnings

    if not captions:
        raise ValueError("no caption given: pass captions as arguments or --captions-file FILE")
    rows = []
    for i, c in enumerate(captions):
        if not c.strip():
            raise ValueError(f"caption {i + 1} is empty")
        tok._warned = False  # the tokenizer warns once per tokenizer; here once per long caption
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            rows.append(tok.encode(c.strip()))
        if caught:
            print(f"warning: caption {i + 1} is longer than {tok.text_len} tokens and was truncated", file=sys.stderr)
    return torch.stack(rows)


def load_prime(path: str | Path, dvae, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(the first rows * grid image tokens of the image at path, its full dVAE reconstruction (3, H, W))."""
    from PIL import Image, UnidentifiedImageError

    from dalle_fast.data import preprocess

    W = dvae.cfg.grid
    if not 1 <= rows <= W:
        raise ValueError(f"--prime-rows must be in [1, {W}] (the token grid is {W}x{W}), got {rows}")
    try:
        with Image.open(path) as img:
            img.load()
            x = preprocess(img, dvae.cfg.image_size)
    except FileNotFoundError as e:
        raise ValueError(f"--prime: {path} does not exist") from e
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as e:
        raise ValueError(f"--prime: {path} is not a readable image ({type(e).__name__})") from e
    codes = dvae.encode(x[None])  # (1, W, W)
    return codes[0, :rows].flatten(), dvae.decode(codes)[0]


@torch.no_grad()
def generate(
    model: DALLE,
    text: torch.Tensor,
    dvae,
    *,
    draws: int,
    keep: int | None = None,
    scorer=None,
    captions: list[str] | None = None,
    prime: torch.Tensor | None = None,
    batch_size: int = 64,
    generator: torch.Generator | None = None,
    cache: bool = True,
    **sampling,
) -> dict[str, torch.Tensor]:
    """`draws` samples for each caption of text (C, text_len), in batches; with a scorer
    (`dalle_fast.clip.Scorer`) and the captions as strings, the `keep` best of each caption's draws, best
    first (the paper's reranking), else the first `keep`.

    Returns tokens (C, keep, grid**2), images (C, keep, 3, H, W) and scores (C, keep) (NaN without a
    scorer). prime: (P,) image tokens every sample starts with."""
    keep = draws if keep is None else keep
    C, W = text.shape[0], model.cfg.image_size
    device = next(model.parameters()).device
    rows = text.repeat_interleave(draws, dim=0)  # caption c's draws are rows c * draws ...
    tokens, images = [], []
    for i in range(0, len(rows), batch_size):
        t = rows[i : i + batch_size].to(device)
        p = None if prime is None else prime.to(device).expand(len(t), -1)
        tok = sample_tokens(model, t, generator=generator, prime=p, cache=cache, **sampling).cpu()
        tokens.append(tok)
        images.append(dvae.decode(tok.view(-1, W, W)))
    tokens = torch.cat(tokens).view(C, draws, -1)
    images = torch.cat(images)
    if scorer is None:
        scores = torch.full((C, draws), float("nan"))
        order = torch.arange(keep).expand(C, keep)
    else:
        from dalle_fast.clip import rerank

        if captions is None or len(captions) != C:
            raise ValueError(f"reranking needs the {C} captions as strings, got {captions!r}")
        scores = scorer.score(images, [c for c in captions for _ in range(draws)]).view(C, draws)
        order = rerank(scores, keep)
    images = images.view(C, draws, *images.shape[1:])
    pick = order.unsqueeze(-1)
    return {
        "tokens": tokens.gather(1, pick.expand(-1, -1, tokens.shape[-1])),
        "images": images[torch.arange(C).unsqueeze(1), order],
        "scores": scores.gather(1, order),
    }


def run_generate(cfg: GenerateConfig, captions: list[str]) -> dict:
    """The CLI's job: loads the run, samples (and reranks), writes grid.png and one PNG per image."""
    from PIL import Image

    from dalle_fast.train_dalle import load_transformer

    if cfg.captions_file:
        try:
            captions = list(captions) + [ln for ln in Path(cfg.captions_file).read_text().splitlines() if ln.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"--captions-file: cannot read {cfg.captions_file}: {e}") from e
    try:
        model, tok, dvae = load_transformer(cfg.run)
    except OSError as e:  # e.g. a run folder without its tokenizer.json
        raise ValueError(f"--run: {cfg.run} is incomplete: {e}") from e
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
        from dalle_fast.clip import load_scorer

        spec = cfg.clip or str(Path(cfg.run).parent / "clip")
        if not cfg.clip and not (Path(spec) / "config.json").exists():
            raise ValueError(
                f"--rerank needs a CLIP model: none in {spec}; pass --clip RUN (train one with "
                f"python -m dalle_fast.train clip --dalle {cfg.run}) or --clip open_clip:ARCH:WEIGHTS_FILE"
            )
        scorer = load_scorer(spec)

    result = generate(
        model, text, dvae, draws=cfg.rerank or cfg.images, keep=cfg.images, scorer=scorer, captions=captions,
        prime=prime, batch_size=cfg.batch_size, generator=torch.Generator(device).manual_seed(cfg.seed),
        cache=not cfg.no_cache, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, guidance=cfg.guidance,
    )  # fmt: skip
    out = Path(cfg.out or Path(cfg.run) / "generated")
    images = result["images"]  # (C, keep, 3, H, W)
    labels = [c for c in captions for _ in range(cfg.images)]
    grid_images = images.flatten(0, 1)
    if original is not None:  # completion: each row starts with the prime image, below the kept rows greyed
        shown = original.clone()
        shown[:, (prime.numel() // model.cfg.image_size) * dvae.cfg.factor :] = 0.5
        grid_images = torch.cat([torch.stack([shown] * len(captions)).unsqueeze(1), images], 1).flatten(0, 1)
        labels = [x for c in captions for x in ["prime (kept rows)"] + [c] * cfg.images]
    grid = save_captioned_grid(out / "grid.png", grid_images, labels, columns=len(labels) // len(captions))
    files = []
    arr = (images.clamp(0, 1) * 255).round().byte().permute(0, 1, 3, 4, 2).numpy()
    for c, per_caption in enumerate(arr):
        for k, a in enumerate(per_caption):
            path = out / f"{c:03d}_{k:03d}.png"
            atomic_write(path, lambda p, a=a: Image.fromarray(a).save(p, format="PNG"))
            files.append(str(path))
    summary = {"grid": str(grid), "images": len(files), "out": str(out)}
    if cfg.rerank:
        summary["mean_kept_score"] = round(float(result["scores"].mean()), 4)
    return summary


def main(argv: list[str] | None = None) -> int:
    """`python -m dalle_fast.generate --run RUN "a caption" ["another" ...] [-n 16] [--rerank 64] ...`"""
    import argparse
    import json

    from dalle_fast.train import build_parser

    ap = build_parser(GenerateConfig, "python -m dalle_fast.generate")
    ap.add_argument("captions", nargs="*", help="captions to draw (one grid row each)")
    ap.add_argument("-n", "--keep", dest="images", type=int, default=argparse.SUPPRESS, help="same as --images")
    args = vars(ap.parse_args(argv))
    captions = args.pop("captions")
    try:
        result = run_generate(GenerateConfig(**args), captions)
    except ValueError as e:
        ap.error(str(e))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
