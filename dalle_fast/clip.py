"""Reranking: a small contrastive image-text model (CLIP-style) and its training, `python -m dalle_fast.train clip`.

The paper draws N samples per caption and keeps the ones a contrastive model (CLIP) scores highest
(Section 3, N = 512; gains flatten beyond ~32). This is a CLIP at the scale of the built-in data: a
convolutional image encoder (its last feature map flattened, so positions survive for "above" and
"left of"), a small transformer over the SAME BPE tokens as the stage-2 model (the tokenizer is copied
from the transformer's run), both projected to a shared unit sphere; trained with the symmetric InfoNCE
loss (cross-entropy over the batch's image-text similarities, in both directions) with a learned
temperature.

Random batches of the shapes data can mostly be told apart by colour. Where a dataset offers near misses
(`hard_negative(i)`: for shapes, the same scene with one object's shape changed), half of each batch is
the other half's near misses, and the held-out check also reports how often a caption scores its own
image above the near miss (val_near_miss; chance is 50%), which is reranking in miniature.

A run directory (dalle_fast.checkpoint) holds config.json, model.safetensors, state.pt, tokenizer.json
and log.csv. `load_scorer` turns a run (or `open_clip:ARCH:WEIGHTS`, with the open_clip package and local
weights) into a `Scorer`: score(images, captions) -> similarity per pair; `rerank` keeps the best.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dalle_fast.checkpoint import load_config, load_model, load_state, load_weights, save_run
from dalle_fast.tokenizer import PAD, CaptionTokenizer


@dataclass
class CLIPConfig:
    text_vocab: int = 512  # BPE vocabulary size (the stage-2 tokenizer's)
    text_len: int = 20  # text positions (the stage-2 tokenizer's)
    image_size: int = 32  # side of the input images (the dVAE's)
    width: int = 128  # width of the text transformer and of the last image feature map
    text_layers: int = 2  # text transformer layers
    heads: int = 4  # text attention heads
    embed_dim: int = 64  # the shared embedding

    def __post_init__(self):
        for name in ("text_vocab", "text_len", "width", "text_layers", "heads", "embed_dim"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an int >= 1, got {getattr(self, name)!r}")
        if not isinstance(self.image_size, int) or self.image_size < 8 or self.image_size % 8:
            raise ValueError(f"image_size must be a multiple of 8, got {self.image_size!r}")
        if self.width % self.heads:
            raise ValueError(f"width ({self.width}) must be a multiple of heads ({self.heads})")


class CLIP(nn.Module):
    """encode_image (B, 3, S, S) in [0, 1] -> (B, embed_dim) unit vectors; encode_text (B, text_len) BPE ids
    with PAD -> (B, embed_dim) unit vectors; forward -> the symmetric InfoNCE loss."""

    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        self.image_encoder = nn.Sequential(
            nn.Conv2d(3, w // 4, 3, padding=1), nn.GELU(),
            nn.Conv2d(w // 4, w // 2, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(w // 2, w, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(w, w, 3, stride=2, padding=1), nn.GELU(),  # (B, w, S/8, S/8)
            nn.AdaptiveAvgPool2d(4), nn.Flatten(),  # (B, 16 w): where things are is kept
            nn.Linear(16 * w, cfg.embed_dim),
        )  # fmt: skip
        self.token_emb = nn.Embedding(cfg.text_vocab + 1, w)  # the last id is PAD
        self.pos_emb = nn.Parameter(torch.randn(cfg.text_len, w) * 0.02)
        layer = nn.TransformerEncoderLayer(w, cfg.heads, 4 * w, dropout=0.0, batch_first=True, norm_first=True)
        self.text_encoder = nn.TransformerEncoder(layer, cfg.text_layers, enable_nested_tensor=False)
        self.text_norm = nn.LayerNorm(w)
        self.text_proj = nn.Linear(w, cfg.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's initial temperature

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [batch, 3, H, W], got {tuple(images.shape)}")
        S = self.cfg.image_size
        if images.shape[-2:] != (S, S):
            images = F.interpolate(images, size=(S, S), mode="bilinear", antialias=True, align_corners=False)
        return F.normalize(self.image_encoder(images * 2 - 1), dim=-1)

    def encode_text(self, text: torch.Tensor) -> torch.Tensor:
        if text.dim() != 2 or text.shape[1] != self.cfg.text_len:
            raise ValueError(f"text must be [batch, {self.cfg.text_len}], got {tuple(text.shape)}")
        real = text != PAD
        h = self.token_emb(torch.where(real, text, self.cfg.text_vocab)) + self.pos_emb  # (B, T, w)
        h = self.text_norm(self.text_encoder(h))
        # Mean over the caption's own tokens (pad slots only carry the length).
        h = (h * real.unsqueeze(-1)).sum(1) / real.sum(1, keepdim=True).clamp(min=1)
        return F.normalize(self.text_proj(h), dim=-1)

    def similarity(self, images: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Cosine similarity of each image with its own caption: (B,)."""
        return (self.encode_image(images) * self.encode_text(text)).sum(-1)

    def forward(self, images: torch.Tensor, text: torch.Tensor) -> dict[str, torch.Tensor]:
        """Symmetric InfoNCE over the batch: image i's caption is text i, every other text a negative."""
        logits = self.logit_scale.exp().clamp(max=100) * self.encode_image(images) @ self.encode_text(text).t()
        target = torch.arange(len(images), device=images.device)
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2
        acc = (logits.argmax(1) == target).float().mean()
        return {"loss": loss, "accuracy": acc.detach()}


# ---- scorers for reranking ----------------------------------------------------------------------------


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
                "--clip open_clip:...: the open_clip package is not installed (pip install open_clip_torch)"
            ) from e
        if not Path(weights).is_file():
            raise ValueError(f"--clip open_clip:{arch}:{weights}: no such weights file")
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


def load_clip(run: str | Path) -> tuple[CLIP, CaptionTokenizer]:
    """A trained CLIP run: (model in eval mode, its tokenizer)."""
    model, _ = load_model(run, "clip", "CLIP", lambda c: CLIP(CLIPConfig(**c)), "model.safetensors", "--clip")
    try:
        tok = CaptionTokenizer.load(Path(run) / "tokenizer.json")
    except OSError as e:
        raise ValueError(f"--clip: {run} has no readable tokenizer.json: {e}") from e
    return model.eval(), tok


def load_scorer(spec: str) -> Scorer:
    """A CLIP run directory, or open_clip:ARCH:WEIGHTS_FILE."""
    if spec.startswith("open_clip:"):
        parts = spec.split(":", 2)
        if len(parts) != 3 or not parts[1] or not parts[2]:
            raise ValueError(f"--clip: expected open_clip:ARCH:WEIGHTS_FILE, got {spec!r}")
        return OpenCLIPScorer(parts[1], parts[2])
    return CLIPScorer(*load_clip(spec))


def rerank(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices (..., keep) of the `keep` highest scores along the last dim, best first."""
    if not 1 <= keep <= scores.shape[-1]:
        raise ValueError(f"keep must be in [1, {scores.shape[-1]}], got {keep}")
    return scores.topk(keep, dim=-1).indices


# ---- training -----------------------------------------------------------------------------------------


@dataclass
class CLIPTrainConfig:
    """Reranker: a contrastive image-text model on the transformer's BPE tokens."""

    data: str = field(default="shapes", metadata={"help": "shapes | folder:DIR | coco:CAPTIONS_JSON,IMAGE_DIR"})
    dalle: str = field(
        default="runs/dalle", metadata={"help": "stage-2 run whose tokenizer (and dVAE image size) to use"}
    )
    out: str = field(default="runs/clip", metadata={"help": "run directory (checkpoints, log)"})
    width: int = field(default=128, metadata={"help": "encoder width"})
    embed_dim: int = field(default=64, metadata={"help": "shared embedding size"})
    max_items: int = field(default=20000, metadata={"help": "training items rendered/read once and kept in memory"})
    val_items: int = field(default=512, metadata={"help": "held-out items for the retrieval accuracy"})
    steps: int = field(default=800, metadata={"help": "optimizer updates"})
    batch_size: int = field(default=128, metadata={"help": "image-caption pairs per update (the negatives)"})
    hard_negatives: bool = field(
        default=True,
        metadata={"help": "where the data has near misses (shapes: the scene with one shape changed), half of "
                  "each batch is the other half's near misses"},
    )  # fmt: skip
    lr: float = field(default=2e-3, metadata={"help": "peak learning rate (cosine decay after a short warm-up)"})
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay"})
    ckpt_every: int = field(default=200, metadata={"help": "updates between checkpoints"})
    time_limit: float = field(
        default=0.0, metadata={"help": "stop (with a checkpoint) after this many seconds; 0: none"}
    )
    threads: int = field(default=0, metadata={"help": "torch CPU threads; 0: torch's default"})
    device: str = field(default="auto", metadata={"help": "auto (a GPU when present) | cpu | cuda | cuda:N"})
    seed: int = field(default=0, metadata={"help": "seed of the init and the batches"})
    resume: bool = field(default=False, metadata={"help": "continue the run in --out where it stopped"})

    def __post_init__(self):
        for name in ("width", "embed_dim", "max_items", "val_items", "steps", "ckpt_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_size < 2:
            raise ValueError(f"batch_size must be >= 2 (the other pairs are the negatives), got {self.batch_size}")
        if self.lr <= 0 or self.weight_decay < 0 or self.time_limit < 0 or self.threads < 0:
            raise ValueError("need lr > 0 and weight_decay, time_limit, threads >= 0")
        from dalle_fast.train import parse_device

        parse_device(self.device, check_available=False)


def _read_items(dataset, limit: int, hard_negatives: bool = False) -> tuple[torch.Tensor, list[list[str]]]:
    """uint8 images (M, 3, S, S) and every caption line of each readable item (at most `limit`). With
    hard_negatives, item i's near miss (`dataset.hard_negative(i)`) follows it: images (2M, ...), pairs adjacent."""
    from dalle_fast.train_dalle import caption_lines

    images, lines = [], []
    for i in range(min(limit, len(dataset))):
        item = dataset[i]
        if not item:
            continue
        caps = [c.strip() for c in (caption_lines(dataset, i) or [item[1]]) if c.strip()]
        if caps:
            pairs = [(item[0], caps)] + ([dataset.hard_negative(i)] if hard_negatives else [])
            for image, c in pairs:
                images.append((image * 255).round().to(torch.uint8))
                lines.append(c)
    if not images:
        raise ValueError("--data: no usable items (every image or caption was unreadable)")
    return torch.stack(images), lines


def _batch_index(n: int, batch_size: int, pairs: bool, g: torch.Generator) -> torch.Tensor:
    """Random rows of the training images; with pairs (item 2i's near miss is row 2i + 1), batch_size // 2
    items and then their near misses, so both directions of the loss must tell each pair apart."""
    if not pairs:
        return torch.randint(0, n, (batch_size,), generator=g)
    first = torch.randint(0, n // 2, (batch_size // 2,), generator=g) * 2
    return torch.cat([first, first + 1])


def _batch(images, lines, tok, index: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    caps = [lines[i][int(torch.randint(len(lines[i]), (1,), generator=g))] for i in index.tolist()]
    return images[index.to(images.device)].float() / 255, tok.encode(caps)


LOG_COLUMNS = ["step", "loss", "accuracy", "val_accuracy", "val_near_miss", "lr", "seconds"]


def train_clip(cfg: CLIPTrainConfig, stop_at: int | None = None) -> dict:
    """Trains (or resumes) a CLIP run; returns the last metrics (loss, retrieval accuracy on held-out items)."""
    from dalle_fast.data import open_datasets
    from dalle_fast.train import parse_device

    device = parse_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    if not cfg.resume and (out / "state.pt").exists():
        raise ValueError(f"{out} already holds a run: pass --resume to continue it, or choose another --out")
    meta = load_config(cfg.dalle, "--dalle")
    tok_path = Path(cfg.dalle) / "tokenizer.json"
    try:
        tok = CaptionTokenizer.load(tok_path)
    except OSError as e:
        raise ValueError(f"--dalle: {cfg.dalle} has no readable tokenizer.json: {e}") from e
    image_size = meta.get("dvae", {}).get("image_size", 32)
    ccfg = CLIPConfig(
        text_vocab=tok.vocab_size, text_len=tok.text_len, image_size=image_size, width=cfg.width,
        embed_dim=cfg.embed_dim,
    )  # fmt: skip
    train_ds, val_ds = open_datasets(cfg.data, image_size, cfg.seed)
    t0 = time.time()
    pairs = cfg.hard_negatives and hasattr(train_ds, "hard_negative")
    images, lines = _read_items(train_ds, cfg.max_items, hard_negatives=pairs)
    near = hasattr(val_ds, "hard_negative")  # held-out near misses: the reranker's own task, measured
    val_images, val_lines = _read_items(val_ds, cfg.val_items, hard_negatives=near)
    print(
        f"read {len(images)} training and {len(val_images)} held-out images"
        f"{' (each item with its near miss)' if pairs else ''} in {time.time() - t0:.0f} s",
        file=sys.stderr,
    )
    # The images stay uint8 (a quarter of fp32) on the training device; batches are indexed there.
    images, val_images = images.to(device), val_images.to(device)
    val_text = tok.encode([c[0] for c in val_lines]).to(device)

    torch.manual_seed(cfg.seed)
    model = CLIP(ccfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    step, seconds = 0, 0.0
    if cfg.resume:
        state = load_state(out)
        if load_config(out).get("clip") != dataclasses.asdict(ccfg):
            raise ValueError(f"--resume: {out} holds a different CLIP configuration")
        try:
            model.load_state_dict(load_weights(out / "model.safetensors", "--resume"))
        except RuntimeError as e:
            raise ValueError(f"--resume: the weights in {out} do not fit this run: {e}") from e
        opt.load_state_dict(state["optimizer"])
        step, seconds = int(state["step"]), float(state.get("seconds", 0.0))
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(tok_path, out / "tokenizer.json")
    log_file = open(out / "log.csv", "a" if cfg.resume else "w", newline="")
    log = csv.writer(log_file)
    if not cfg.resume:
        log.writerow(LOG_COLUMNS)

    @torch.no_grad()
    def validate() -> dict[str, float]:
        """val_accuracy: how often a held-out image's own caption is the most similar of all held-out captions
        (near misses left out). val_near_miss, where the data has near misses: how often a caption scores its
        own image above the near miss's (reranking in miniature; chance is 50%)."""
        model.eval()
        img, txt = model.encode_image(val_images.float() / 255), model.encode_text(val_text)
        model.train()
        own = slice(0, None, 2 if near else 1)
        sims = img[own] @ txt[own].t()
        out = {"val_accuracy": float((sims.argmax(1) == torch.arange(len(sims), device=device)).float().mean())}
        out["val_near_miss"] = float("nan")
        if near:  # rows 2i and 2i + 1: an item and its near miss
            hit = (img[0::2] * txt[0::2]).sum(-1) > (img[1::2] * txt[0::2]).sum(-1)
            out["val_near_miss"] = float(hit.float().mean())
        return out

    started = time.time() - seconds
    metrics: dict = {}
    warmup = max(1, cfg.steps // 20)
    model.train()
    while step < cfg.steps:
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        x, text = _batch(images, lines, tok, _batch_index(len(images), cfg.batch_size, pairs, g), g)
        text = text.to(device, non_blocking=True)
        t = min(1.0, max(0.0, (step - warmup) / max(1, cfg.steps - warmup)))
        lr = cfg.lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * t))
        for group in opt.param_groups:
            group["lr"] = lr
        parts = model(x, text)
        opt.zero_grad(set_to_none=True)
        parts["loss"].backward()
        opt.step()
        step += 1
        seconds = time.time() - started
        done = step == cfg.steps or step == stop_at or (cfg.time_limit and seconds > cfg.time_limit)
        if step % cfg.ckpt_every == 0 or done:
            metrics = {"step": step, "loss": float(parts["loss"].detach()), "accuracy": float(parts["accuracy"])}
            metrics.update(validate(), lr=lr, seconds=seconds)
            log.writerow([metrics[k] for k in LOG_COLUMNS])
            log_file.flush()
            state = {"step": step, "seconds": seconds, "optimizer": opt.state_dict()}
            meta_out = {"clip": dataclasses.asdict(ccfg), "train": dataclasses.asdict(cfg), "step": step}
            save_run(out, {"model": model.state_dict()}, state, meta_out)
            print(
                f"CLIP step {step}: loss {metrics['loss']:.3f} held-out retrieval {metrics['val_accuracy']:.1%}"
                + (f", near misses told apart {metrics['val_near_miss']:.1%}" if near else ""),
                file=sys.stderr,
            )
        if done:
            break
    log_file.close()
    return metrics
