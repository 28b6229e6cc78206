"""Training the reranker: a small CLIP on the transformer's BPE tokens (python -m dalle_fast.train clip).

Random batches of the shapes data can mostly be told apart by colour. Where a dataset offers near misses
(`hard_negative(i)`: for shapes, the same scene with one object's shape changed), half of each batch is
the other half's near misses, and the held-out check also reports how often a caption scores its own
image above the near miss (val_near_miss; chance is 50%), which is reranking in miniature.

A run directory holds config.json, model.safetensors, state.pt, tokenizer.json (the transformer run's)
and log.csv.
"""

from __future__ import annotations

import dataclasses
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dalle_fast.data.batches import step_generator
from dalle_fast.data.sources import describe, open_datasets
from dalle_fast.data.token_cache import caption_lines
from dalle_fast.errors import FieldError, check_finite, field_errors
from dalle_fast.models.clip import CLIP, CLIPConfig
from dalle_fast.ops.device import choose_device, parse_device
from dalle_fast.progress import Progress
from dalle_fast.runs.checkpoint import load_config
from dalle_fast.runs.load import load_tokenizer, same_tokenizer
from dalle_fast.runs.log import RunLog
from dalle_fast.training.loop import (
    INIT_FROM_HELP,
    TIME_LIMIT_HELP,
    TrainingRun,
    check_init_from,
    seed_everything,
    set_threads,
)
from dalle_fast.training.schedules import warmup_cosine


@dataclass
class CLIPTrainConfig:
    """Reranker: a contrastive image-text model on the transformer's BPE tokens."""

    data: str = field(
        default="",
        metadata={"help": "shapes | digits | folder:DIR | coco:JSON,DIR; empty: the data of the --dalle run"},
    )
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
    time_limit: float = field(default=0.0, metadata={"help": TIME_LIMIT_HELP})
    threads: int = field(default=0, metadata={"help": "torch CPU threads; 0: torch's default"})
    device: str = field(default="auto", metadata={"help": "auto (a GPU when present) | cpu | cuda | cuda:N"})
    seed: int = field(default=0, metadata={"help": "seed of the init and the batches"})
    resume: bool = field(default=False, metadata={"help": "continue the run in --out where it stopped"})
    init_from: str = field(
        default="",
        metadata={"help": "CLIP run to start from (the --dalle run's tokenizer must be its); " + INIT_FROM_HELP},
    )

    def __post_init__(self):
        check_finite(self)
        check_init_from(self)
        for name in ("width", "embed_dim", "max_items", "val_items", "steps", "ckpt_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_size < 2:
            raise ValueError(f"batch_size must be >= 2 (the other pairs are the negatives), got {self.batch_size}")
        if self.lr <= 0 or self.weight_decay < 0 or self.time_limit < 0 or self.threads < 0:
            raise ValueError("need lr > 0 and weight_decay, time_limit, threads >= 0")
        parse_device(self.device)


def _read_items(dataset, limit: int, hard_negatives: bool = False) -> tuple[torch.Tensor, list[list[str]]]:
    """uint8 images (M, 3, S, S) and every caption line of each readable item (at most `limit`). With
    hard_negatives, item i's near miss (`dataset.hard_negative(i)`) follows it: images (2M, ...), pairs adjacent."""
    images, lines = [], []
    progress = Progress(min(limit, len(dataset)), "reading images", "image")
    for i in range(min(limit, len(dataset))):
        progress.update()
        item = dataset[i]
        if not item:
            continue
        caps = [c.strip() for c in (caption_lines(dataset, i) or [item[1]]) if c.strip()]
        if caps:
            pairs = [(item[0], caps)] + ([dataset.hard_negative(i)] if hard_negatives else [])
            for image, c in pairs:
                images.append((image * 255).round().to(torch.uint8))
                lines.append(c)
    progress.close()
    if not images:
        raise FieldError("data", "no usable items (every image or caption was unreadable)")
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


class CLIPRun(TrainingRun):
    """The reranker's part of the training skeleton: images and captions read once into memory, batches
    with near misses, the InfoNCE update, held-out retrieval."""

    tag = "clip"
    columns = ["step", "loss", "accuracy", "val_accuracy", "val_near_miss", "lr", "seconds"]

    def __init__(self, cfg: CLIPTrainConfig):
        device = choose_device(cfg.device)  # plain PyTorch layers: any GPU
        set_threads(cfg.threads)
        with field_errors("dalle"):
            meta = load_config(cfg.dalle)
        if not cfg.data:  # the data the transformer was trained on, said aloud
            data = meta.get("train", {}).get("data") or "shapes"
            print(f"data: {data} (the data of {cfg.dalle})", file=sys.stderr)
            cfg = dataclasses.replace(cfg, data=data)
        super().__init__(cfg, device)
        with field_errors("dalle"):
            self.tok = load_tokenizer(cfg.dalle)
        image_size = meta.get("dvae", {}).get("image_size", 32)
        self.ccfg = CLIPConfig(
            text_vocab=self.tok.vocab_size, text_len=self.tok.text_len, image_size=image_size, width=cfg.width,
            embed_dim=cfg.embed_dim,
        )  # fmt: skip
        with field_errors("data"):
            train_ds, val_ds = open_datasets(cfg.data, image_size, cfg.seed)
        print(describe(cfg.data, train_ds, val_ds, image_size), file=sys.stderr)
        t0 = time.time()
        self.pairs = cfg.hard_negatives and hasattr(train_ds, "hard_negative")
        images, self.lines = _read_items(train_ds, cfg.max_items, hard_negatives=self.pairs)
        self.near = hasattr(val_ds, "hard_negative")  # held-out near misses: the reranker's own task, measured
        val_images, val_lines = _read_items(val_ds, cfg.val_items, hard_negatives=self.near)
        print(
            f"read {len(images)} training and {len(val_images)} held-out images"
            f"{' (each item with its near miss)' if self.pairs else ''} in {time.time() - t0:.0f} s",
            file=sys.stderr,
        )
        # The images stay uint8 (a quarter of fp32) on the training device; batches are indexed there.
        self.images, self.val_images = images.to(device), val_images.to(device)
        self.val_text = self.tok.encode([c[0] for c in val_lines]).to(device)
        seed_everything(cfg.seed)
        self.model = CLIP(self.ccfg).to(device)
        if cfg.init_from:
            with field_errors("dalle"):
                if not same_tokenizer(Path(cfg.dalle), Path(cfg.init_from)):
                    raise ValueError(
                        f"its tokenizer is not the one {cfg.init_from} was trained with (token ids would name other "
                        "pieces of words): give a stage-2 run that shares it (one started from the same run)"
                    )
            self.start_from("clip", dataclasses.asdict(self.ccfg), lambda c: dataclasses.asdict(CLIPConfig(**c)))
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        if cfg.resume:
            self.resume()
        self.out.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(cfg.dalle) / "tokenizer.json", self.out / "tokenizer.json")
        self.warmup = max(1, cfg.steps // 20)
        self.model.train()

    def update(self, step: int) -> dict:
        cfg = self.cfg
        g = step_generator(cfg.seed, step)
        index = _batch_index(len(self.images), cfg.batch_size, self.pairs, g)
        x, text = _batch(self.images, self.lines, self.tok, index, g)
        text = text.to(self.device, non_blocking=True)
        self.lr = warmup_cosine(step, self.progress(), cfg.lr, 0.0, self.warmup, cfg.steps)
        self.set_lr(self.lr)
        parts = self.model(x, text)
        self.opt.zero_grad(set_to_none=True)
        parts["loss"].backward()
        self.opt.step()
        return {"loss": parts["loss"], "accuracy": parts["accuracy"], "lr": self.lr}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """val_accuracy: how often a held-out image's own caption is the most similar of all held-out captions
        (near misses left out). val_near_miss, where the data has near misses: how often a caption scores its
        own image above the near miss's (reranking in miniature; chance is 50%)."""
        model = self.model
        model.eval()
        img, txt = model.encode_image(self.val_images.float() / 255), model.encode_text(self.val_text)
        model.train()
        own = slice(0, None, 2 if self.near else 1)
        sims = img[own] @ txt[own].t()
        out = {"val_accuracy": float((sims.argmax(1) == torch.arange(len(sims), device=self.device)).float().mean())}
        out["val_near_miss"] = float("nan")
        if self.near:  # rows 2i and 2i + 1: an item and its near miss
            hit = (img[0::2] * txt[0::2]).sum(-1) > (img[1::2] * txt[0::2]).sum(-1)
            out["val_near_miss"] = float(hit.float().mean())
        return out

    def at_checkpoint(self, metrics: dict, log: RunLog) -> None:
        log.print(
            f"CLIP step {self.step}: loss {metrics['loss']:.3f} held-out retrieval {metrics['val_accuracy']:.1%}"
            + (f", near misses told apart {metrics['val_near_miss']:.1%}" if self.near else "")
        )

    def check_resume(self, state: dict, meta: dict) -> None:
        if meta.get("clip") != dataclasses.asdict(self.ccfg):
            raise ValueError(f"cannot resume {self.out}: it holds a different CLIP configuration")

    def meta(self) -> dict:
        return {"clip": dataclasses.asdict(self.ccfg), "train": dataclasses.asdict(self.cfg), "step": self.step}


def train_clip(cfg: CLIPTrainConfig, stop_at: int | None = None) -> dict:
    """Trains (or resumes) a CLIP run; returns the last metrics (loss, retrieval accuracy on held-out items)."""
    return CLIPRun(cfg).train(stop_at)
