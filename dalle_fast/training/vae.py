"""Stage 1: training the dVAE (python -m dalle_fast.train vae).

A run directory holds config.json, model.safetensors and ema.safetensors (weights), state.pt
(optimizer, step, RNG: everything a resume needs to continue exactly), log.csv, TensorBoard events and
recon_<step>.png (held-out originals above their reconstructions).

Exact resume needs an indexable source (shapes, folder:, coco:). A WebDataset stream (wds:) has no index
to return to: a resumed run restores weights, EMA, optimizer, step and schedules and goes on reading the
stream with a fresh shuffle, not from the sample where the run stopped.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field

import torch

from dalle_fast.data.batches import step_batches
from dalle_fast.data.images import SkipCounter
from dalle_fast.data.sources import DATA_HELP, describe, open_datasets
from dalle_fast.errors import FieldError, check_finite, field_errors
from dalle_fast.models.dvae import DVAE, PRESETS, DVAEConfig, codebook_usage, psnr
from dalle_fast.ops.device import choose_device, parse_device
from dalle_fast.runs.images import save_recon_grid
from dalle_fast.runs.log import RunLog
from dalle_fast.training.loop import (
    INIT_FROM_HELP,
    TIME_LIMIT_HELP,
    TrainingRun,
    check_init_from,
    config_differences,
    seed_everything,
    set_threads,
)
from dalle_fast.training.schedules import cosine_anneal, linear_ramp


@dataclass
class VAETrainConfig:
    """Stage 1: the dVAE on images (python -m dalle_fast.train vae)."""

    data: str = field(
        default="shapes",
        metadata={"help": DATA_HELP},
    )
    val_data: str = field(
        default="",
        metadata={
            "help": "held-out images (same forms as --data); empty: split from --data (a stream: its first "
            "--eval-images samples)"
        },
    )
    preset: str = field(default="tiny", metadata={"help": f"dVAE size: {' | '.join(PRESETS)}"})
    image_size: int = field(
        default=0,
        metadata={
            "help": "side the images are resized to (after a square crop), a multiple of the preset's "
            "downsampling factor (tiny: 4, paper: 8); 0: the preset's (tiny: 32, paper: 256)"
        },
    )
    # tiny: 8 (the default, 64 image tokens) or 16 (256 tokens that keep small shapes: docs/evaluation.md,
    # "What limits caption fidelity"); the number of resblock groups follows.
    grid: int = field(
        default=0,
        metadata={
            "help": "side of the token grid (image size / grid must be a power of two); 0: image size / the "
            "preset's factor"
        },
    )
    codebook: int = field(
        default=0, metadata={"help": "number of discrete codes; 0: the preset's (tiny: 256, paper: 8192)"}
    )
    hidden: int = field(
        default=0, metadata={"help": "width of the first resblock group (later groups double it); 0: the preset's"}
    )
    out: str = field(default="runs/vae", metadata={"help": "run directory (checkpoints, logs, images)"})
    # With a time limit a slower machine does fewer updates, with the schedules still run to their end.
    steps: int = field(default=3000, metadata={"help": "optimizer updates in the whole run"})
    batch_size: int = field(default=32, metadata={"help": "images per update"})
    lr: float = field(default=2e-3, metadata={"help": "peak learning rate (the paper: 1e-4 at its scale)"})
    lr_end: float = field(default=1.25e-5, metadata={"help": "learning rate at the end of the cosine decay"})
    weight_decay: float = field(default=1e-4, metadata={"help": "AdamW weight decay (the paper's 1e-4)"})
    ema: float = field(default=0.999, metadata={"help": "decay of the parameter EMA used for evaluation"})
    # kl_ramp, tau_anneal, lr (and the preset's codebook and beta) were tuned on the tiny preset
    # (benchmarks/RESULTS_defaults.md).
    kl_ramp: float = field(default=0.25, metadata={"help": "fraction of the run over which beta rises 0 -> max"})
    tau_anneal: float = field(default=1.0, metadata={"help": "fraction of the run over which tau falls 1 -> 1/16"})
    ckpt_every: int = field(default=500, metadata={"help": "updates between checkpoints"})
    log_every: int = field(default=50, metadata={"help": "updates between log lines"})
    eval_images: int = field(default=256, metadata={"help": "held-out images for PSNR and codebook usage"})
    time_limit: float = field(default=0.0, metadata={"help": TIME_LIMIT_HELP})
    workers: int = field(default=0, metadata={"help": "DataLoader worker processes"})
    threads: int = field(default=0, metadata={"help": "torch CPU threads; 0: torch's default"})
    # The dVAE is plain PyTorch layers (no custom kernels), so any CUDA GPU runs it, in fp32.
    device: str = field(default="auto", metadata={"help": "auto (a GPU when present) | cpu | cuda | cuda:N"})
    seed: int = field(default=0, metadata={"help": "seed of the data order, the init and the gumbel noise"})
    resume: bool = field(default=False, metadata={"help": "continue the run in --out exactly where it stopped"})
    # A converted OpenAI dVAE has the openai preset's configuration: fine-tune it with --preset openai.
    init_from: str = field(default="", metadata={"help": "dVAE run to start from; " + INIT_FROM_HELP})

    def __post_init__(self):
        check_finite(self)
        check_init_from(self)
        if self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {self.preset!r}")
        for name in ("steps", "batch_size", "ckpt_every", "log_every", "eval_images"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.codebook < 0 or self.codebook == 1:
            raise FieldError("codebook", f"must be >= 2 (or 0: the preset's), got {self.codebook}")
        if self.hidden < 0:
            raise FieldError("hidden", f"must be >= 1 (or 0: the preset's), got {self.hidden}")
        if not (self.lr > 0 and 0 <= self.lr_end <= self.lr):
            raise ValueError(f"need lr > 0 and 0 <= lr_end <= lr, got {self.lr}, {self.lr_end}")
        if not 0 <= self.ema < 1:
            raise ValueError(f"ema must be in [0, 1), got {self.ema}")
        if not (0 < self.kl_ramp <= 1 and 0 < self.tau_anneal <= 1):
            raise ValueError("kl_ramp and tau_anneal must be in (0, 1]")
        if self.workers < 0 or self.threads < 0 or self.time_limit < 0:
            raise ValueError("workers, threads and time_limit must be >= 0")
        parse_device(self.device)
        self.dvae_config()  # a grid the preset cannot make fails here, before any work

    def dvae_config(self) -> DVAEConfig:
        """The preset's dVAE config at --image-size, with as many resblock groups as --grid needs (one per
        halving + 1)."""
        dcfg = PRESETS[self.preset]
        if self.codebook:
            dcfg = dataclasses.replace(dcfg, codebook=self.codebook)
        if self.hidden:
            dcfg = dataclasses.replace(dcfg, hidden=self.hidden)
        if self.image_size:
            if self.image_size < dcfg.factor or self.image_size % dcfg.factor:
                raise FieldError(
                    "image_size",
                    f"must be a positive multiple of the {self.preset} preset's downsampling factor "
                    f"{dcfg.factor} (or 0: {dcfg.image_size}), got {self.image_size}",
                )
            dcfg = dataclasses.replace(dcfg, image_size=self.image_size)
        if not self.grid:
            return dcfg
        factor = dcfg.image_size // self.grid if self.grid > 0 else 0
        if self.grid < 1 or factor * self.grid != dcfg.image_size or factor & (factor - 1):
            raise FieldError(
                "grid", f"must divide the image size ({dcfg.image_size}) by a power of two, got {self.grid}"
            )
        return dataclasses.replace(dcfg, groups=factor.bit_length())


MAX_EMPTY_BATCHES = 100  # batches in a row with no readable item before the data is refused


class VAERun(TrainingRun):
    """The dVAE's part of the training skeleton: its batches, schedules (tau, beta, lr), update and
    held-out PSNR and codebook usage."""

    tag = "vae"
    columns = ["step", "loss", "nll", "kl", "mse", "tau", "beta", "lr", "psnr", "usage", "perplexity", "seconds"]

    def __init__(self, cfg: VAETrainConfig):
        set_threads(cfg.threads)
        self.dcfg = cfg.dvae_config()
        device = choose_device(cfg.device)  # plain PyTorch layers: any GPU
        if device.type == "cuda" and device.index is not None:  # cuda:N: where batches pin, the RNG state is read
            torch.cuda.set_device(device)
        super().__init__(cfg, device)
        seed_everything(cfg.seed)
        # channels_last: oneDNN's preferred layout for the convolutions on a CPU; the checkpoints store
        # ordinary contiguous tensors.
        self.model = DVAE(self.dcfg).to(device=device, memory_format=torch.channels_last)
        if cfg.init_from:
            self.start_from("dvae", dataclasses.asdict(self.dcfg), lambda c: dataclasses.asdict(DVAEConfig(**c)))
        self.init_ema()
        self.opt = torch.optim.AdamW(
            self.model.parameters(), lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=cfg.weight_decay
        )
        if cfg.resume:
            self.resume()
        with field_errors("data"):
            train_ds, val_ds = open_datasets(
                cfg.data, self.dcfg.image_size, cfg.seed, val_spec=cfg.val_data or None,
                stream_heldout=cfg.eval_images,
            )  # fmt: skip
        print(describe(cfg.data, train_ds, val_ds, self.dcfg.image_size, cfg.val_data or None), file=sys.stderr)
        n_eval = min(cfg.eval_images, len(val_ds))
        val_images = [it[0] for it in (val_ds[i] for i in range(n_eval)) if it]
        if not val_images:
            raise ValueError(f"no readable held-out image among the first {n_eval} of {cfg.val_data or cfg.data}")
        self.val_images = torch.stack(val_images).to(device).contiguous(memory_format=torch.channels_last)
        self.counter = SkipCounter(cfg.data)
        self.streamed = isinstance(train_ds, torch.utils.data.IterableDataset)
        self.batches = step_batches(
            train_ds, cfg.batch_size, cfg.seed, self.step, self.counter, cfg.workers, pin=device.type == "cuda"
        )  # fmt: skip

    def update(self, step: int) -> dict:
        cfg, dcfg = self.cfg, self.dcfg
        if self.counter.seen and step and step % 1000 == 0 and not self.streamed:  # a stream reports per pass
            self.counter.end_epoch()
        # Endless: a batch of only unreadable items is passed over for the next, so the run still does
        # every update it was asked for; data with (almost) nothing readable is refused, not spun on.
        for empty, batch in enumerate(self.batches):
            images, captions, skipped = batch
            self.counter.add(len(captions) + skipped, skipped)
            if captions:
                break
            if empty + 1 >= MAX_EMPTY_BATCHES:
                raise FieldError("data", f"{cfg.data}: {MAX_EMPTY_BATCHES} batches in a row held no readable item")
        at = self.progress()  # 0 -> 1 over the run
        tau = cosine_anneal(at, cfg.tau_anneal, dcfg.tau_start, dcfg.tau_end)
        beta = linear_ramp(at, cfg.kl_ramp, dcfg.kl_max)
        lr = cosine_anneal(at, 1.0, cfg.lr, cfg.lr_end)
        self.set_lr(lr)
        images = images.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        parts = self.model(images, tau, beta)
        self.opt.zero_grad(set_to_none=True)
        parts["loss"].backward()
        self.opt.step()
        return {**{k: parts[k] for k in ("loss", "nll", "kl", "mse")}, "tau": tau, "beta": beta, "lr": lr}

    @torch.no_grad()
    def evaluate(self) -> dict:
        """PSNR and codebook usage of argmax codes on held-out images, with the EMA weights."""
        with self.ema_weights() as model:
            codes = model.encode(self.val_images)
            self.recon = model.decode(codes)
        used, ppl = codebook_usage(codes, self.dcfg.codebook)
        return {"psnr": psnr(self.recon, self.val_images), "usage": used, "perplexity": ppl}

    def at_checkpoint(self, metrics: dict, log: RunLog) -> None:
        save_recon_grid(
            self.out / f"recon_{self.step:07d}.png", self.val_images[:8].cpu(), self.recon[:8].cpu(), metrics["psnr"]
        )
        log.print(f"step {self.step}: loss {metrics['loss']:.4f} psnr {metrics['psnr']:.2f} dB "
                  f"codebook {metrics['usage']:.0%}")  # fmt: skip

    def check_resume(self, state: dict, meta: dict) -> None:
        if meta.get("train", {}).get("source"):  # a converted dVAE: no optimizer or schedules to continue
            raise ValueError(
                f"cannot resume {self.out}: it holds a converted dVAE ({meta['train']['source']}), not a training "
                "run; start a new run from it with init_from"
            )
        if "dvae" in meta:  # e.g. a run of the tiny preset from when it had 64 codes
            diff = config_differences(dataclasses.asdict(DVAEConfig(**meta["dvae"])), dataclasses.asdict(self.dcfg))
            if diff:
                raise ValueError(
                    f"cannot resume {self.out}: it holds a different dVAE configuration ({'; '.join(diff)}): "
                    "resume it with the settings it was trained with (preset, image_size, grid, codebook, hidden)"
                )

    def meta(self) -> dict:
        return {"train": dataclasses.asdict(self.cfg), "dvae": dataclasses.asdict(self.dcfg), "step": self.step}

    def train(self, stop_at: int | None = None) -> dict:
        try:
            return super().train(stop_at)
        finally:
            self.counter.end_epoch()


def train_vae(cfg: VAETrainConfig, stop_at: int | None = None) -> dict:
    """Runs (or resumes) stage-1 training. stop_at: stop after that step, as if killed (tests use it)."""
    return VAERun(cfg).train(stop_at)
