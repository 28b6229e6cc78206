"""Stage 2: training the transformer on (caption, dVAE code) pairs: `python -m dalle_fast.train dalle`.

The images are encoded once by the stage-1 dVAE (argmax codes of its EMA weights) and cached in the
run directory with their captions, already BPE-encoded: every caption once without and `bpe_variants`
times with BPE dropout. Training then draws, per step, a batch of items, one caption of each and one
of its encodings, all as a function of (seed, step), so --resume continues exactly. (The tokenizers
library's dropout RNG cannot be seeded, hence the pre-drawn encodings; with enough variants this is
the paper's 10% BPE dropout.)

A run directory holds config.json, model.safetensors, ema.safetensors, state.pt, tokenizer.json, the
token caches (cache_train.pt, cache_val.pt), log.csv, TensorBoard events (tb/) and samples_<step>.png.

Precision: fp32 or bf16 autocast on CPU; on CUDA fp16 autocast with per-resblock gradient scaling
(dalle_fast.amp: one scale per resblock, skipped blocks on overflow, no host sync), or bf16.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import math
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dalle_fast.checkpoint import atomic_write, load_config, load_model, load_state, load_weights, save_run
from dalle_fast.data import SkipCounter, open_datasets
from dalle_fast.distributed import (
    LossModule,
    agree_found_inf,
    barrier,
    bytes_per_step,
    closing_process_group,
    init_from_env,
    mean_over_ranks,
    paper_compression_rate,
    rank0_value,
    sync_uncompressed,
    wrap_ddp,
    wrap_fsdp,
)
from dalle_fast.dvae import DVAE, DVAEConfig
from dalle_fast.generate import sample_tokens, save_captioned_grid
from dalle_fast.ops import CUDA_HEAD_DIMS, cuda_unusable_reason
from dalle_fast.tokenizer import PAD, CaptionTokenizer
from dalle_fast.transformer import ATTENTION_MODES, DALLE, PRESETS, TransformerConfig, preset

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass
class DALLETrainConfig:
    """Stage 2: the DALL-E transformer on captions and dVAE codes."""

    data: str = field(
        default="shapes",
        metadata={"help": "shapes | folder:DIR | coco:CAPTIONS_JSON,IMAGE_DIR | wds:URLS (tar shards: a brace pattern "
                  "or a comma list)"},
    )  # fmt: skip
    val_data: str = field(
        default="",
        metadata={"help": "held-out data (same forms); empty: split from --data (a stream: its first items)"},
    )
    vae: str = field(default="runs/vae", metadata={"help": "the stage-1 run directory (its EMA weights encode)"})
    preset: str = field(default="tiny", metadata={"help": f"transformer size: {' | '.join(PRESETS)}"})
    out: str = field(default="runs/dalle", metadata={"help": "run directory (checkpoints, logs, samples)"})
    d_model: int = field(
        default=0, metadata={"help": "residual-stream width (heads: d_model / the preset's head_dim); 0: the preset's"}
    )
    text_len: int = field(default=0, metadata={"help": "text positions; 0: the preset's"})
    vocab_size: int = field(default=0, metadata={"help": "BPE vocabulary size; 0: the preset's text_vocab"})
    bpe_dropout: float = field(default=0.1, metadata={"help": "BPE dropout on training captions (the paper: 0.1)"})
    bpe_variants: int = field(default=4, metadata={"help": "pre-drawn BPE-dropout encodings per caption"})
    # Not in the paper: a share of captions replaced by the empty caption teaches the model p(image) beside
    # p(image | caption), which sampling with --guidance > 1 (classifier-free guidance) needs.
    caption_dropout: float = field(
        default=0.0, metadata={"help": "fraction of training captions replaced by the empty caption (for --guidance)"}
    )
    max_items: int = field(default=0, metadata={"help": "encode at most this many training items; 0: all"})
    val_items: int = field(default=512, metadata={"help": "held-out items for the validation loss"})
    attention: str = field(default="sparse", metadata={"help": "sparse (the paper's masks) | causal | dense (SDPA)"})
    steps: int = field(default=2000, metadata={"help": "optimizer updates in the whole run"})
    batch_size: int = field(default=64, metadata={"help": "captioned images per update"})
    lr: float = field(default=1e-3, metadata={"help": "peak learning rate (the paper: 4.5e-4 at its scale)"})
    lr_end: float = field(default=1e-5, metadata={"help": "learning rate at the end of the cosine decay"})
    warmup: int = field(default=100, metadata={"help": "updates of linear learning-rate warm-up"})
    weight_decay: float = field(default=4.5e-2, metadata={"help": "AdamW weight decay (the paper's 4.5e-2)"})
    grad_clip: float = field(default=4.0, metadata={"help": "gradient-norm clip (the paper's 4); 0: none"})
    ema: float = field(default=0.999, metadata={"help": "decay of the parameter EMA used for sampling"})
    precision: str = field(
        default="auto", metadata={"help": "auto (CPU fp32, CUDA fp16; bf16 with --shard) | fp32 | bf16 | fp16"}
    )
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda | cuda:N"})
    shard: bool = field(default=False, metadata={"help": "under torchrun: FSDP (sharded parameters) instead of DDP"})
    powersgd_rank: int = field(
        default=0, metadata={"help": "under torchrun: PowerSGD gradient compression of this rank (DDP); 0: off"}
    )
    powersgd_fp32: bool = field(
        default=False, metadata={"help": "PowerSGD communicates in fp32 (default: fp16, as the paper did)"}
    )
    dist_timeout: float = field(default=600.0, metadata={"help": "seconds a collective may wait for the other ranks"})
    resblock_scaling: bool = field(
        default=False,
        metadata={"help": "per-resblock gradient scaling (dalle_fast.amp); always on with fp16"},
    )
    checkpoint: bool = field(default=False, metadata={"help": "activation checkpointing (recompute in backward)"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the model"})
    ckpt_every: int = field(default=500, metadata={"help": "updates between checkpoints"})
    log_every: int = field(default=50, metadata={"help": "updates between log lines"})
    samples: int = field(default=8, metadata={"help": "held-out captions sampled at each checkpoint; 0: none"})
    time_limit: float = field(default=0.0, metadata={"help": "stop (with a checkpoint) after this many seconds"})
    workers: int = field(default=0, metadata={"help": "DataLoader workers for the one-off image encoding"})
    threads: int = field(default=0, metadata={"help": "torch CPU threads; 0: torch's default"})
    seed: int = field(default=0, metadata={"help": "seed of the init, the batches and the samples"})
    resume: bool = field(default=False, metadata={"help": "continue the run in --out exactly where it stopped"})

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {self.preset!r}")
        if self.attention not in ATTENTION_MODES:
            raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {self.attention!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        for name in ("steps", "batch_size", "ckpt_every", "log_every", "val_items"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.shard and self.powersgd_rank:
            raise ValueError("--shard and --powersgd-rank exclude each other (PowerSGD is a DDP communication hook)")
        if self.dist_timeout <= 0:
            raise ValueError(f"dist_timeout must be > 0, got {self.dist_timeout}")
        head_dim = PRESETS[self.preset].head_dim
        if self.d_model < 0 or self.d_model % head_dim:
            raise ValueError(
                f"d_model must be 0 or a positive multiple of the preset's head_dim ({head_dim}), got {self.d_model}"
            )
        for name in (
            "powersgd_rank",
            "text_len",
            "vocab_size",
            "bpe_variants",
            "max_items",
            "warmup",
            "samples",
            "workers",
            "threads",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.vocab_size and self.vocab_size < 257:
            raise ValueError(f"vocab_size must be 0 or >= 257, got {self.vocab_size}")
        if not (self.lr > 0 and 0 <= self.lr_end <= self.lr):
            raise ValueError(f"need lr > 0 and 0 <= lr_end <= lr, got {self.lr}, {self.lr_end}")
        if not 0 <= self.bpe_dropout < 1 or not 0 <= self.ema < 1 or not 0 <= self.caption_dropout < 1:
            raise ValueError("bpe_dropout, caption_dropout and ema must be in [0, 1)")
        if self.weight_decay < 0 or self.grad_clip < 0 or self.time_limit < 0:
            raise ValueError("weight_decay, grad_clip and time_limit must be >= 0")


# ---- stage 1 and the data ---------------------------------------------------------------------------


def load_dvae(run: str | Path) -> DVAE:
    """The stage-1 dVAE of a run directory, with its EMA weights, in eval mode."""
    return load_model(run, "dvae", "dVAE", lambda c: DVAE(DVAEConfig(**c)), "ema.safetensors", "--vae")[0]


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
    for images, caps, idx, skipped in loader:
        if caps and isinstance(caps[0], str):  # a streamed source: one caption per item
            caps = [[c] for c in caps]
        counter.add(len(caps) + skipped, skipped)
        if caps:
            codes.append(dvae.encode(images.to(device, non_blocking=True)).flatten(1).to(torch.int16).cpu())
            lines += caps
            index += idx
        if limit and len(lines) >= limit:
            break
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


# ---- optimisation helpers ---------------------------------------------------------------------------


@torch.no_grad()
def clip_grad_norm_finite_(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Clips the total gradient norm to max_norm, leaving nonfinite gradients out of the norm (those
    blocks are skipped by the optimizer anyway), without a host sync. Returns the norm."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norms = torch.stack(torch._foreach_norm(grads)).float()
    total = torch.where(norms.isfinite(), norms, torch.zeros_like(norms)).norm()
    torch._foreach_mul_(grads, (max_norm / (total + 1e-6)).clamp(max=1.0).to(grads[0].dtype))
    return total


def learning_rate(step: int, cfg: DALLETrainConfig, seconds: float = 0.0) -> float:
    """Linear warm-up to lr, then a cosine decay to lr_end (short runs have no plateaus to halve on, the
    paper's schedule). With a time limit the decay follows whichever runs out first, steps or time, so a
    run cut short by the clock still ends annealed (and is then not bit-reproducible)."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    if cfg.time_limit:
        t = max(t, seconds / cfg.time_limit)
    t = min(1.0, t)
    return cfg.lr_end + (cfg.lr - cfg.lr_end) * 0.5 * (1 + math.cos(math.pi * t))


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX). There bf16 autocast trains the
    tiny preset about 1.5x faster than fp32 (9.8k vs 6.5k tokens/s on 2 cores); elsewhere bf16 is
    emulated, so "auto" stays fp32 on the CPU and the main job asks for bf16 only here."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def resolve_device(cfg: DALLETrainConfig) -> tuple[torch.device, str]:
    """(device, precision) with "auto" resolved; ValueError for combinations that cannot run."""
    from dalle_fast.train import parse_device

    head_dim = PRESETS[cfg.preset].head_dim

    def cuda_refusal(device: torch.device | str) -> str | None:
        """Why this run cannot train on `device` (a GPU), or None."""
        if (why := cuda_unusable_reason(device)) is not None:  # also the scaling kernels of fp16 need it
            return why
        if cfg.attention != "dense" and head_dim not in CUDA_HEAD_DIMS:
            return (
                f"preset {cfg.preset}'s head_dim {head_dim} has no CUDA attention kernel (head dims "
                f"{CUDA_HEAD_DIMS}): use another preset, --attention dense, or --device cpu"
            )
        return None

    if cfg.device == "auto":
        # The GPU when this run can train there; the CPU otherwise (saying why, if a GPU is present).
        why_not = cuda_refusal("cuda")
        if why_not is not None and torch.cuda.is_available():
            warnings.warn(f"device auto: training on the CPU, since {why_not}", stacklevel=2)
        device = torch.device("cuda" if why_not is None else "cpu")
    else:
        device = parse_device(cfg.device)
        if device.type == "cuda" and (why_not := cuda_refusal(device)) is not None:
            raise ValueError(f"device {cfg.device!r}: {why_not}")
    if cfg.precision != "auto":
        precision = cfg.precision
    elif device.type == "cuda":  # fp16 with per-resblock scaling (the paper's); bf16 when sharded (FSDP)
        precision = "bf16" if cfg.shard else "fp16"
    else:
        precision = "fp32"
    if device.type == "cpu" and precision == "fp16":
        raise ValueError("precision fp16 needs a CUDA device (CPU: fp32 or bf16)")
    if device.type == "cuda" and precision == "fp32" and cfg.attention != "dense":
        raise ValueError("precision fp32 on CUDA: the CUDA attention kernels take fp16/bf16; use bf16 or fp16")
    return device, precision


# ---- the loop ---------------------------------------------------------------------------------------

LOG_COLUMNS = ["step", "loss", "text", "image", "val_image", "grad_norm", "lr", "tokens_per_s", "seconds"]


class Trainer:
    """Builds (or resumes) a stage-2 run and trains it; attributes are the run's parts."""

    def __init__(self, cfg: DALLETrainConfig):
        self.cfg = cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.out = Path(cfg.out)
        if not cfg.resume and (self.out / "state.pt").exists():
            raise ValueError(f"{self.out} already holds a run: pass --resume to continue it, or choose another --out")
        self.device, self.precision = resolve_device(cfg)
        self.dist = init_from_env(self.device.type, cfg.dist_timeout)
        if self.dist.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
            torch.cuda.set_device(self.device)
        if cfg.batch_size % self.dist.world:
            raise ValueError(
                f"batch_size ({cfg.batch_size}) must be a multiple of the number of processes ({self.dist.world})"
            )
        if cfg.shard and (self.precision == "fp16" or cfg.resblock_scaling):
            raise ValueError("--shard does not combine with per-resblock gradient scaling (fp16) yet; use bf16")
        self.dvae = load_dvae(cfg.vae).to(self.device)  # encodes the data, decodes the samples
        self._prepare_data()
        base = PRESETS[cfg.preset]
        self.mcfg = preset(
            cfg.preset,
            text_vocab=self.tok.vocab_size,
            text_len=self.tok.text_len,
            image_vocab=self.dvae.cfg.codebook,
            image_size=self.dvae.cfg.grid,
            attention=cfg.attention,
            checkpoint=cfg.checkpoint,
            kernel_size=min(base.kernel_size, 2 * self.dvae.cfg.grid - 1),
            **({"d_model": cfg.d_model, "n_heads": cfg.d_model // base.head_dim} if cfg.d_model else {}),
        )
        torch.manual_seed(cfg.seed)
        self.model = DALLE(self.mcfg).to(self.device)
        self.scaler = None
        if self.precision == "fp16" or cfg.resblock_scaling:
            from dalle_fast.amp import ResblockGradScaler

            # The paper's M: scales start M times higher, as each replica's loss is 1/M of the global one.
            self.scaler = ResblockGradScaler(2 * self.mcfg.n_layers, replicas=self.dist.world, device=self.device)
            self.model.use_resblock_scaler(self.scaler)
        # The module whose forward() computes the loss: plain, DDP (maybe with PowerSGD) or FSDP.
        self.uncompressed: list[torch.nn.Parameter] = []
        self.powersgd = None
        if cfg.shard and self.dist.enabled:
            self.forward_module = wrap_fsdp(self.model)
        elif self.dist.enabled:
            self.forward_module, self.uncompressed, self.powersgd = wrap_ddp(
                self.model, self.dist, self.device, cfg.powersgd_rank, fp16_comm=not cfg.powersgd_fp32
            )
        else:
            self.forward_module = LossModule(self.model)
        self.ema = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        hyper = dict(lr=cfg.lr, betas=(0.9, 0.96), eps=1e-8, weight_decay=cfg.weight_decay)
        if self.scaler is not None:
            from dalle_fast.amp import BlockAdamW

            self.opt = BlockAdamW(self.scaler.param_groups(self.model), self.scaler, **hyper)
        else:
            self.opt = torch.optim.AdamW(self.model.parameters(), **hyper)
        self.step = 0
        self.seconds = 0.0  # training time so far, across resumes (the time limit covers the whole run)
        if cfg.resume:
            self._load()
        self.forward_loss = torch.compile(self.forward_module) if cfg.compile else self.forward_module

    # data and tokenizer

    def _prepare_data(self) -> None:
        cfg, out = self.cfg, self.out
        tok_path = out / "tokenizer.json"
        key = {
            "data": cfg.data,
            "val_data": cfg.val_data,
            "vae": str(Path(cfg.vae).resolve()),
            "vae_step": load_config(cfg.vae, "--vae").get("step"),
            "max_items": cfg.max_items,
            "val_items": cfg.val_items,
            "bpe_variants": cfg.bpe_variants,
            "seed": cfg.seed,
        }
        caches = {s: TokenCache.load(out / f"cache_{s}.pt", key) for s in ("train", "val")}
        if tok_path.exists() and all(caches.values()):
            self.tok = CaptionTokenizer.load(tok_path)
        elif cfg.resume and tok_path.exists():
            raise ValueError(f"--resume: the token caches in {out} are missing or were built for other data")
        else:
            train_ds, val_ds = open_datasets(
                cfg.data,
                self.dvae.cfg.image_size,
                cfg.seed,
                val_spec=cfg.val_data or None,
                stream_heldout=cfg.val_items,
            )
            t0 = time.time()
            codes, lines = self._encode_shared(train_ds, f"{cfg.data} (train)")
            if not self.dist.main:  # rank 0 builds the tokenizer and the caches; the others load them
                barrier(self.dist)
                return self._prepare_data()
            vcodes, vlines, _ = encode_images(val_ds, self.dvae, cfg.val_items, cfg.workers, f"{cfg.data} (val)")
            for name, c in (("training", codes), ("held-out", vcodes)):
                if not len(c):
                    raise ValueError(
                        f"--data {cfg.data}: no usable {name} items (every image or caption was unreadable)"
                    )
            base = PRESETS[cfg.preset]
            self.tok = CaptionTokenizer.train(
                (c for cs in lines for c in cs),
                vocab_size=cfg.vocab_size or base.text_vocab,
                text_len=cfg.text_len or base.text_len,
                dropout=cfg.bpe_dropout,
            )
            self.tok.save(tok_path)
            caches = {
                "train": TokenCache.build(codes, lines, self.tok, cfg.bpe_variants if cfg.bpe_dropout else 0),
                "val": TokenCache.build(vcodes, vlines, self.tok, 0),
            }
            for split, c in caches.items():
                c.save(out / f"cache_{split}.pt", key)
            print(
                f"encoded {len(codes)} training and {len(vcodes)} held-out images in {time.time() - t0:.0f} s; "
                f"BPE vocabulary {self.tok.vocab_size}",
                file=sys.stderr,
            )
            barrier(self.dist)
        self.train_cache, self.val_cache = caches["train"], caches["val"]
        # Held-out captions for the sample grids (the first few held-out items, clean encodings).
        self.sample_text, _ = self.val_cache.batch(
            torch.arange(min(self.cfg.samples, len(self.val_cache))), torch.Generator(), dropout=False
        )

    def _encode_shared(self, dataset, desc: str) -> tuple[torch.Tensor, list[list[str]]]:
        """The training items encoded by every rank in parts (map-style: interleaved indices; a stream:
        its shards split by rank), gathered on rank 0 in the order one process would have them."""
        info, limit = self.dist, self.cfg.max_items
        if not info.enabled:
            codes, lines, _ = encode_images(dataset, self.dvae, limit, self.cfg.workers, desc)
            return codes, lines
        stream = isinstance(dataset, torch.utils.data.IterableDataset)
        part_limit = -(-limit // info.world) if stream and limit else limit
        mine = encode_images(dataset, self.dvae, part_limit, self.cfg.workers, desc, (info.rank, info.world))
        parts = [None] * info.world if info.main else None
        torch.distributed.gather_object(mine, parts, dst=0)
        if not info.main:
            return torch.empty(0), []
        items = [(i, c, ls) for codes, lines, index in parts for i, c, ls in zip(index, codes, lines, strict=True)]
        if not stream:
            items.sort(key=lambda t: t[0])
        items = items[: limit or None]
        grid = self.dvae.cfg.grid**2
        codes = torch.stack([c for _, c, _ in items]) if items else torch.empty(0, grid, dtype=torch.int16)
        return codes, [ls for _, _, ls in items]

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch of update `step`: a pure function of (seed, step)."""
        g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + step)
        index = torch.randint(0, len(self.train_cache), (self.cfg.batch_size,), generator=g)
        text, image = self.train_cache.batch(index, g, dropout=self.cfg.bpe_dropout > 0)
        if self.cfg.caption_dropout > 0:  # the empty caption: every text position padding
            text = text.masked_fill((torch.rand(len(text), generator=g) < self.cfg.caption_dropout)[:, None], PAD)
        if self.dist.enabled:  # every rank draws the global batch and keeps its own slice
            text, image = (t.chunk(self.dist.world)[self.dist.rank] for t in (text, image))
        if self.device.type == "cuda":  # pinned and asynchronous: the host does not wait for the GPU here
            return tuple(t.pin_memory().to(self.device, non_blocking=True) for t in (text, image))
        return text, image

    # checkpoints

    def _meta(self) -> dict:
        return {
            "train": dataclasses.asdict(self.cfg),
            "transformer": dataclasses.asdict(self.mcfg),
            "dvae": dataclasses.asdict(self.dvae.cfg),
            "step": self.step,
        }

    @property
    def sharded(self) -> bool:
        return self.cfg.shard and self.dist.enabled

    def save(self) -> dict | None:
        """Every rank calls it (a sharded model gathers its full state); rank 0 writes. Returns the
        gathered full EMA weights of a sharded run (None otherwise)."""
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                get_model_state_dict,
                get_optimizer_state_dict,
            )

            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            model_sd = get_model_state_dict(self.model, options=opts)
            optim_sd, optim_format = get_optimizer_state_dict(self.model, self.opt, options=opts), "names"
            ema = {k: v.full_tensor().cpu() if hasattr(v, "full_tensor") else v for k, v in self.ema.items()}
        else:
            model_sd, ema = self.model.state_dict(), self.ema
            optim_sd, optim_format = self.opt.state_dict(), "ids"
        if not self.dist.main:
            return None
        state = {
            "step": self.step,
            "seconds": self.seconds,
            "optimizer": optim_sd,
            "optimizer_format": optim_format,  # "names" (sharded runs) or "ids" (torch's own format)
            "torch_rng": torch.get_rng_state(),
            "world": self.dist.world,
            "precision": self.precision,  # resolved ("auto" may mean fp16 on a GPU and fp32 on a CPU)
        }
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        save_run(self.out, {"model": model_sd, "ema": ema}, state, self._meta())
        return ema if self.sharded else None

    def _load(self) -> None:
        state = load_state(self.out)
        saved = load_config(self.out).get("transformer")
        if saved != dataclasses.asdict(self.mcfg):
            raise ValueError(f"--resume: {self.out} holds a different model configuration: {saved}")
        if ("scaler" in state) != (self.scaler is not None):
            # Per-resblock scaling changes the optimizer's parameter groups and state: no switching mid-run.
            was = state.get("precision", "fp16 or --resblock-scaling" if "scaler" in state else "fp32 or bf16")
            raise ValueError(
                f"--resume: {self.out} was trained with precision {was} "
                f"({'with' if 'scaler' in state else 'without'} per-resblock gradient scaling), but this run "
                f"resolves to precision {self.precision} on {self.device.type} "
                f"({'with' if self.scaler is not None else 'without'} it): pass the --precision, --device and "
                "--resblock-scaling it was trained with"
            )
        try:
            weights = load_weights(self.out / "model.safetensors", "--resume")
            ema = load_weights(self.out / "ema.safetensors", "--resume")
            names = state.get("optimizer_format", "ids") == "names"
            if self.sharded and not names:
                raise ValueError(
                    f"--resume: {self.out} was saved without --shard; resume it without --shard (DDP or one process)"
                )
            if self.sharded or names:
                from torch.distributed.checkpoint.state_dict import (
                    StateDictOptions,
                    set_model_state_dict,
                    set_optimizer_state_dict,
                )

                opts = StateDictOptions(full_state_dict=True)
                set_model_state_dict(self.model, weights, options=opts)
                set_optimizer_state_dict(self.model, self.opt, state["optimizer"], options=opts)
            else:
                self.model.load_state_dict(weights)
                self.opt.load_state_dict(state["optimizer"])
            for k, v in ema.items():
                e = self.ema[k]
                if hasattr(e, "device_mesh"):  # a shard: keep this rank's part of the full tensor
                    from torch.distributed.tensor import distribute_tensor

                    v = distribute_tensor(v.to(e.device), e.device_mesh, e.placements)
                e.copy_(v)
            if self.scaler is not None:
                saved = dict(state["scaler"])
                if saved["replicas"] != self.dist.world:  # resumed on another number of processes: the
                    # scales carry the factor M = replicas (the paper's), so they move with it
                    saved["scales"] = saved["scales"] * (self.dist.world / saved["replicas"])
                    saved["replicas"] = self.dist.world
                self.scaler.load_state_dict(saved)
            torch.set_rng_state(state["torch_rng"])
            self.step = int(state["step"])
            self.seconds = float(state.get("seconds", 0.0))
        except (KeyError, RuntimeError) as e:
            raise ValueError(f"--resume: the checkpoint in {self.out} does not fit this run: {e}") from e

    # evaluation

    @contextlib.contextmanager
    def ema_weights(self):
        """The EMA weights swapped into the model for the duration."""
        live = {k: v.clone() for k, v in self.model.state_dict().items()}
        self.model.load_state_dict(self.ema)
        try:
            yield self.model
        finally:
            self.model.load_state_dict(live)

    def autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.float16 if self.precision == "fp16" else torch.bfloat16
        return torch.autocast(self.device.type, dtype=dtype)

    @torch.no_grad()
    def validate(self) -> float:
        """Image cross-entropy of the EMA weights on the held-out items (clean captions)."""
        total, n = 0.0, 0
        with self.ema_weights() as model, self.autocast():
            model.eval()
            for start in range(0, len(self.val_cache), 128):
                index = torch.arange(start, min(start + 128, len(self.val_cache)))
                text, image = self.val_cache.batch(index, torch.Generator(), dropout=False)
                total += float(model.loss(text.to(self.device), image.to(self.device))["image"]) * len(index)
                n += len(index)
            model.train()
        return total / n

    @torch.no_grad()
    def write_samples(self, path: Path, full_ema: dict | None = None) -> None:
        """Rank 0 samples the held-out captions with the EMA weights (a sharded run passes the gathered
        full EMA weights, sampled with a plain copy of the model: no collectives while sampling)."""
        if not len(self.sample_text) or not self.dist.main:
            return
        g = torch.Generator(self.device).manual_seed(self.cfg.seed)
        if full_ema is not None:
            plain = DALLE(self.mcfg).to(self.device)
            plain.load_state_dict(full_ema)
            context = contextlib.nullcontext(plain)
        else:
            context = self.ema_weights()
        with context as model, self.autocast():
            model.eval()
            tokens = sample_tokens(model, self.sample_text.to(self.device), top_k=0, generator=g)
            model.train()
        W = self.mcfg.image_size
        images = self.dvae.decode(tokens.view(-1, W, W)).cpu()
        save_captioned_grid(path, images, self.tok.decode(self.sample_text))

    # training

    def train(self, stop_at: int | None = None) -> dict:
        """Runs to cfg.steps (or stop_at, as if killed there); returns the last logged metrics."""
        cfg, out = self.cfg, self.out
        main = self.dist.main  # only rank 0 writes logs, samples and checkpoints
        log_path = out / "log.csv"
        new_log = not (cfg.resume and log_path.exists())
        log_file = open(log_path, "w" if new_log else "a", newline="") if main else None
        log = csv.writer(log_file) if main else None
        if new_log and main:
            log.writerow(LOG_COLUMNS)
        tb = _tensorboard(out) if main else None
        bar = _progress(cfg.steps, self.step, "DALL-E") if main else None
        params = list(self.model.parameters())
        ema_pairs = [(self.ema[k], v) for k, v in self.model.state_dict().items() if v.dtype.is_floating_point]
        started = time.time() - self.seconds
        window_start, window_tokens = time.time(), 0
        metrics: dict = {}
        self.model.train()
        while self.step < cfg.steps:
            text, image = self.batch(self.step)
            lr = learning_rate(self.step, cfg, self.seconds)  # the same on every rank (see below)
            for g in self.opt.param_groups:
                g["lr"] = lr
            with self.autocast():
                parts = self.forward_loss(text, image)
            self.opt.zero_grad(set_to_none=True)
            parts["loss"].backward()
            sync_uncompressed(self.uncompressed, self.dist)
            if self.scaler is not None:
                self.scaler.unscale_(self.opt)
                agree_found_inf(self.scaler.found_inf, self.dist)
            if not cfg.grad_clip:
                gnorm = torch.zeros(())
            elif self.sharded:  # sharded gradients: torch's clip computes the global norm across ranks
                gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            else:
                gnorm = clip_grad_norm_finite_(params, cfg.grad_clip)
            self.opt.step()
            if self.scaler is not None:
                self.scaler.update()
            with torch.no_grad():  # EMA with a warm-up, so short runs are not sampled from their init
                decay = min(cfg.ema, (1 + self.step) / (10 + self.step))
                if self.sharded:  # shards (DTensors): one at a time
                    for e, v in ema_pairs:
                        e.lerp_(v, 1 - decay)
                else:  # one multi-tensor launch per dtype and device
                    torch._foreach_lerp_([e for e, _ in ema_pairs], [v for _, v in ema_pairs], 1 - decay)
            self.step += 1
            window_tokens += image.numel()
            if bar:
                bar.update(1)
            self.seconds = time.time() - started
            if cfg.time_limit:  # rank 0's clock, on every rank: the same learning rates, the same last step
                self.seconds = rank0_value(self.seconds, self.dist, self.device)
            timed_out = bool(cfg.time_limit) and self.seconds > cfg.time_limit
            done = self.step == cfg.steps or self.step == stop_at or timed_out
            ckpt = self.step % cfg.ckpt_every == 0 or done
            if self.step % cfg.log_every == 0 or ckpt:
                losses = mean_over_ranks(
                    [float(parts[k].detach()) for k in ("loss", "text", "image")], self.dist, self.device
                )
                now = time.time()  # after the losses' host read: the window's work is done, not just queued
                metrics = {"step": self.step, **dict(zip(("loss", "text", "image"), losses, strict=True))}
                metrics.update(
                    val_image=self.validate() if ckpt else math.nan,
                    grad_norm=float(gnorm),
                    lr=lr,
                    tokens_per_s=window_tokens / max(now - window_start, 1e-9),
                    seconds=now - started,
                )
                if main:
                    log.writerow([metrics[k] for k in LOG_COLUMNS])
                    log_file.flush()
                if tb:
                    for k, v in metrics.items():
                        if k != "step" and not math.isnan(v):
                            tb.add_scalar(f"dalle/{k}", v, self.step)
                if ckpt:
                    full_ema = self.save()
                    if cfg.samples:
                        self.write_samples(out / f"samples_{self.step:07d}.png", full_ema)
                    msg = (
                        f"step {self.step}: loss {metrics['loss']:.4f} image {metrics['image']:.4f} "
                        f"held-out image {metrics['val_image']:.4f}"
                    )
                    if main:
                        (bar.write if bar else print)(msg, file=sys.stderr)
                window_start, window_tokens = time.time(), 0  # evaluation and samples stay out of the rate
            if done:
                break
        if bar:
            bar.close()
        if tb:
            tb.close()
        if log_file:
            log_file.close()
        if self.powersgd is not None and main:
            self.report_compression()
        return metrics

    def report_compression(self) -> dict:
        """Bytes per step with PowerSGD vs uncompressed, next to the paper's formula for this model."""
        sent = bytes_per_step(self.model, self.powersgd, self.uncompressed, fp16_comm=not self.cfg.powersgd_fp32)
        sent["paper_rate"] = paper_compression_rate(self.cfg.powersgd_rank, self.mcfg.d_model)
        line = f"PowerSGD rank {self.cfg.powersgd_rank}: the paper's compression rate 1 - 5r/(8 d_model) = "
        line += f"{sent['paper_rate']:.1%}; uncompressed {sent['uncompressed_bytes'] / 1e6:.2f} MB per step"
        if "sent_bytes" in sent:
            line += f", sent {sent['sent_bytes'] / 1e6:.2f} MB ({sent['reduction']:.1%} less)"
        print(line, file=sys.stderr)
        return sent


def _tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(str(out / "tb"))


def _progress(total: int, initial: int, desc: str):
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, disable=not sys.stderr.isatty())


def train_dalle(cfg: DALLETrainConfig, stop_at: int | None = None) -> dict:
    """Runs (or resumes) stage-2 training. stop_at: stop after that step, as if killed (tests use it).
    Under torchrun, every rank runs this; the process group it joins is closed at the end, also when the
    run is refused after joining (a bad --vae, a batch size that does not split); one the caller made
    stays the caller's to close."""
    with closing_process_group():
        return Trainer(cfg).train(stop_at)


def load_transformer(run: str | Path, ema: bool = True) -> tuple[DALLE, CaptionTokenizer, DVAE]:
    """A trained stage-2 run: (transformer with its EMA or live weights, tokenizer, dVAE), in eval mode."""
    weights = "ema.safetensors" if ema else "model.safetensors"
    build = lambda c: DALLE(TransformerConfig(**c))  # noqa: E731
    model, meta = load_model(run, "transformer", "transformer", build, weights, "--run")
    tok = CaptionTokenizer.load(Path(run) / "tokenizer.json")
    return model, tok, load_dvae(meta["train"]["vae"])
