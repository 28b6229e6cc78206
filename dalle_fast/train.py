"""Training entry point: `python -m dalle_fast.train vae --data shapes --preset tiny`.

Stage 1 (the dVAE) is here; stage 2 (the transformer) will join as another subcommand. Flags are
generated from the config dataclass, so the CLI and the config cannot drift apart.

A run directory holds: config.json, model.safetensors and ema.safetensors (weights), state.pt
(optimizer, step, RNG: everything --resume needs to continue exactly), log.csv, TensorBoard events and
recon_<step>.png (held-out originals above their reconstructions). Every file is written to a
temporary name and renamed, so a crash never leaves a half-written checkpoint.

Exact resume needs an indexable source (shapes, folder:, coco:). A WebDataset stream (wds:) has no index
to return to: --resume restores weights, EMA, optimizer, step and schedules and goes on reading the
stream with a fresh shuffle, not from the sample where the run stopped.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from dalle_fast.checkpoint import atomic_write, save_run
from dalle_fast.data import SkipCounter, collate_skip, open_datasets
from dalle_fast.dvae import DVAE, PRESETS, DVAEConfig, codebook_usage, cosine_anneal, linear_ramp, psnr


@dataclass
class VAETrainConfig:
    data: str = field(
        default="shapes",
        metadata={
            "help": "shapes | folder:DIR | coco:CAPTIONS_JSON,IMAGE_DIR | wds:URLS (tar shards: a brace pattern "
            "or a comma list)"
        },
    )
    val_data: str = field(
        default="",
        metadata={
            "help": "held-out images (same forms as --data); empty: split from --data (a stream: its first "
            "--eval-images samples)"
        },
    )
    preset: str = field(default="tiny", metadata={"help": f"dVAE size: {' | '.join(PRESETS)}"})
    # tiny: 8 (the default, 64 image tokens) or 16 (256 tokens that keep small shapes: README, "What limits
    # caption fidelity"); the number of resblock groups follows.
    grid: int = field(
        default=0,
        metadata={"help": "side of the token grid (image_size / grid must be a power of two); 0: the preset's"},
    )
    out: str = field(default="runs/vae", metadata={"help": "run directory (checkpoints, logs, images)"})
    # 3000: what 2 unshared cores do in about 255 s with the tiny preset (channels-last): held-out PSNR
    # 30.5 dB after 1500 updates, 31.5 after 3000. With --time-limit a slower machine does fewer, with the
    # schedules still run to their end.
    steps: int = field(default=3000, metadata={"help": "optimizer updates in the whole run"})
    batch_size: int = field(default=32, metadata={"help": "images per update"})
    lr: float = field(default=2e-3, metadata={"help": "peak learning rate (the paper: 1e-4 at its scale)"})
    lr_end: float = field(default=1.25e-5, metadata={"help": "learning rate at the end of the cosine decay"})
    weight_decay: float = field(default=1e-4, metadata={"help": "AdamW weight decay (the paper's 1e-4)"})
    ema: float = field(default=0.999, metadata={"help": "decay of the parameter EMA used for evaluation"})
    # kl_ramp, tau_anneal, lr (and the preset's codebook and beta) were tuned on the tiny preset with the
    # logit-Laplace likelihood, where no setting beat these by more than the spread between two runs; the
    # likelihood was what held it back (README, "The dVAE (stage 1)").
    kl_ramp: float = field(default=0.25, metadata={"help": "fraction of the run over which beta rises 0 -> max"})
    tau_anneal: float = field(default=1.0, metadata={"help": "fraction of the run over which tau falls 1 -> 1/16"})
    ckpt_every: int = field(default=500, metadata={"help": "updates between checkpoints"})
    log_every: int = field(default=50, metadata={"help": "updates between log lines"})
    eval_images: int = field(default=256, metadata={"help": "held-out images for PSNR and codebook usage"})
    time_limit: float = field(
        default=0.0,
        metadata={
            "help": "stop (with a checkpoint) after this many seconds of training, counted across --resume; the "
            "schedules then follow whichever runs out first, steps or time; 0: none"
        },
    )
    workers: int = field(default=0, metadata={"help": "DataLoader worker processes"})
    threads: int = field(default=0, metadata={"help": "torch CPU threads; 0: torch's default"})
    # The dVAE is plain PyTorch layers (no custom kernels), so any CUDA GPU runs it, in fp32.
    device: str = field(default="auto", metadata={"help": "auto (a GPU when present) | cpu | cuda | cuda:N"})
    seed: int = field(default=0, metadata={"help": "seed of the data order, the init and the gumbel noise"})
    resume: bool = field(default=False, metadata={"help": "continue the run in --out exactly where it stopped"})

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {self.preset!r}")
        for name in ("steps", "batch_size", "ckpt_every", "log_every", "eval_images"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not (self.lr > 0 and 0 <= self.lr_end <= self.lr):
            raise ValueError(f"need lr > 0 and 0 <= lr_end <= lr, got {self.lr}, {self.lr_end}")
        if not 0 <= self.ema < 1:
            raise ValueError(f"ema must be in [0, 1), got {self.ema}")
        if not (0 < self.kl_ramp <= 1 and 0 < self.tau_anneal <= 1):
            raise ValueError("kl_ramp and tau_anneal must be in (0, 1]")
        if self.workers < 0 or self.threads < 0 or self.time_limit < 0:
            raise ValueError("workers, threads and time_limit must be >= 0")
        parse_device(self.device, check_available=False)
        self.dvae_config()  # a grid the preset cannot make fails here, before any work

    def dvae_config(self) -> DVAEConfig:
        """The preset's dVAE config, with as many resblock groups as --grid needs (one per halving + 1)."""
        dcfg = PRESETS[self.preset]
        if not self.grid:
            return dcfg
        factor = dcfg.image_size // self.grid if self.grid > 0 else 0
        if self.grid < 1 or factor * self.grid != dcfg.image_size or factor & (factor - 1):
            raise ValueError(
                f"grid must divide the preset's image_size ({dcfg.image_size}) by a power of two, got {self.grid}"
            )
        return dataclasses.replace(dcfg, groups=factor.bit_length())


def parse_device(name: str, check_available: bool = True) -> torch.device:
    """--device for stages of plain PyTorch layers: auto is the GPU when one is present, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}") from e
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}")
    if device.type == "cpu":
        return torch.device("cpu")  # cpu:N names the same CPU
    if check_available and not torch.cuda.is_available():
        raise ValueError(f"device {name!r}: no CUDA device is available")
    if check_available and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def build_parser(cls, prog: str) -> argparse.ArgumentParser:
    """argparse flags from a config dataclass: --field-name, typed, defaults and help from the fields."""
    ap = argparse.ArgumentParser(prog=prog, description=cls.__doc__)
    for f in fields(cls):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):  # a switch; one that defaults to on also gets --no-field-name
            action = argparse.BooleanOptionalAction if f.default else "store_true"
            ap.add_argument(flag, action=action, default=f.default, help=f.metadata.get("help"))
        else:
            typ = {"int": int, "float": float, "str": str}.get(f.type, f.type)
            ap.add_argument(
                flag, type=typ, default=f.default, help=f"{f.metadata.get('help', '')} (default: {f.default})"
            )
    return ap


# ---- data -------------------------------------------------------------------------------------------


class StepBatches(torch.utils.data.Sampler):
    """Batch indices as a pure function of (seed, step): resuming at step s replays exactly what an
    uninterrupted run would have drawn from step s on."""

    def __init__(self, length: int, batch_size: int, seed: int, start: int, stop: int):
        self.length, self.batch_size, self.seed, self.start, self.stop = length, batch_size, seed, start, stop

    def __iter__(self):
        for step in range(self.start, self.stop):
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
            yield torch.randint(0, self.length, (self.batch_size,), generator=g).tolist()

    def __len__(self):
        return self.stop - self.start


def _train_batches(train_ds, cfg: VAETrainConfig, start: int, counter: SkipCounter, pin: bool = False):
    """(images, captions, skipped) batches for the updates from `start` on.

    A map-style source draws them with StepBatches, so a resumed run sees exactly what an uninterrupted
    one would have. A stream (wds:) is read pass after pass, each pass shuffled with a seed drawn from
    the number of batches before it; a resumed stream restarts with a fresh shuffle (salted by the
    resume step) rather than at the sample where the run stopped, since a stream has no index to
    return to."""
    # Its own generator: the loader must not draw from the global RNG, which the gumbel noise uses and
    # the checkpoint restores.
    common = dict(
        collate_fn=collate_skip,
        num_workers=cfg.workers,
        generator=torch.Generator().manual_seed(cfg.seed),
        pin_memory=pin,  # page-locked batches, copied to the GPU without blocking
    )
    if not isinstance(train_ds, torch.utils.data.IterableDataset):
        sampler = StepBatches(len(train_ds), cfg.batch_size, cfg.seed, start, cfg.steps)
        yield from torch.utils.data.DataLoader(train_ds, batch_sampler=sampler, **common)
        return
    drawn = start
    while True:
        train_ds.set_epoch(drawn)
        good = 0
        for images, captions, skipped in torch.utils.data.DataLoader(train_ds, batch_size=cfg.batch_size, **common):
            good += len(captions)
            drawn += 1
            yield images, captions, skipped
        counter.end_epoch()
        if not good:
            raise ValueError(f"--data {cfg.data!r}: a pass over the stream gave no usable training sample")


# ---- checkpoints ------------------------------------------------------------------------------------


def save_checkpoint(
    out: Path, model, ema: dict, opt, step: int, cfg: VAETrainConfig, dcfg: DVAEConfig, seconds: float = 0.0
) -> None:
    state = {
        "step": step,
        "seconds": seconds,  # training time so far: a --time-limit covers the whole run, resumes included
        "optimizer": opt.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "python_rng": random.getstate(),
    }
    device = next(model.parameters()).device
    if device.type == "cuda":  # the gumbel noise is drawn there
        state["cuda_rng"] = torch.cuda.get_rng_state(device)
    meta = {"train": dataclasses.asdict(cfg), "dvae": dataclasses.asdict(dcfg), "step": step}
    save_run(out, {"model": model.state_dict(), "ema": ema}, state, meta)


def load_checkpoint(out: Path, model, ema: dict, opt) -> tuple[int, float]:
    """Restores everything in place; returns (step, training seconds so far)."""
    from safetensors.torch import load_file

    try:
        model.load_state_dict(load_file(out / "model.safetensors"))
        for k, v in load_file(out / "ema.safetensors").items():
            ema[k].copy_(v)
        state = torch.load(out / "state.pt", map_location="cpu", weights_only=False)
        opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])
        device = next(model.parameters()).device
        if device.type == "cuda" and "cuda_rng" in state:  # a run that started on a CPU has none
            torch.cuda.set_rng_state(state["cuda_rng"], device)
        return int(state["step"]), float(state.get("seconds", 0.0))
    except FileNotFoundError as e:
        raise ValueError(f"--resume: no complete checkpoint in {out} ({e.filename} is missing)") from e
    except Exception as e:  # truncated or foreign files
        raise ValueError(f"--resume: the checkpoint in {out} is unreadable: {type(e).__name__}: {e}") from e


def save_recon_grid(path: Path, originals: torch.Tensor, recon: torch.Tensor) -> None:
    from PIL import Image

    n = originals.shape[0]
    grid = torch.cat([torch.cat(list(originals), dim=2), torch.cat(list(recon), dim=2)], dim=1)  # [3, 2H, nW]
    arr = (grid.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).contiguous().numpy()
    img = Image.fromarray(arr)
    if n and originals.shape[-1] < 128:
        img = img.resize((img.width * 2, img.height * 2), Image.Resampling.NEAREST)
    atomic_write(path, lambda p: img.save(p, format="PNG"))


@torch.no_grad()
def evaluate(model: DVAE, ema: dict, images: torch.Tensor) -> dict:
    """PSNR and codebook usage of argmax codes on held-out images, with the EMA weights."""
    live = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(ema)
    try:
        codes = model.encode(images)
        recon = model.decode(codes)
    finally:
        model.load_state_dict(live)
    used, ppl = codebook_usage(codes, model.cfg.codebook)
    return {"psnr": psnr(recon, images), "usage": used, "perplexity": ppl, "recon": recon}


# ---- the loop ---------------------------------------------------------------------------------------


def schedule_position(step: int, seconds: float, cfg: VAETrainConfig) -> float:
    """Where the schedules (tau, beta, lr) stand, in steps. With a time limit they follow whichever runs
    out first, steps or time, so a run cut short by the clock (a slow or shared machine) still ends with
    tau, beta and the learning rate at their final values; such a run is not bit-reproducible."""
    if not cfg.time_limit:
        return float(step)
    return max(float(step), cfg.steps * min(seconds / cfg.time_limit, 1.0))


LOG_COLUMNS = ["step", "loss", "nll", "kl", "mse", "tau", "beta", "lr", "psnr", "usage", "perplexity", "seconds"]


def train_vae(cfg: VAETrainConfig, stop_at: int | None = None) -> dict:
    """Runs (or resumes) stage-1 training. stop_at: stop after that step, as if killed (tests use it)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    dcfg = cfg.dvae_config()
    device = parse_device(cfg.device)
    if device.type == "cuda" and device.index is not None:  # cuda:N: where batches pin, the RNG state is read
        torch.cuda.set_device(device)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    # channels_last: the convolutions run about 1.5x faster on CPU (oneDNN's preferred layout); the
    # checkpoints store ordinary contiguous tensors.
    model = DVAE(dcfg).to(device=device, memory_format=torch.channels_last)
    ema = {k: v.detach().clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=cfg.weight_decay)
    step, seconds = 0, 0.0
    if cfg.resume:
        step, seconds = load_checkpoint(out, model, ema, opt)
    elif (out / "state.pt").exists():
        raise ValueError(f"{out} already holds a run: pass --resume to continue it, or choose another --out")

    train_ds, val_ds = open_datasets(
        cfg.data, dcfg.image_size, cfg.seed, val_spec=cfg.val_data or None, stream_heldout=cfg.eval_images
    )
    n_eval = min(cfg.eval_images, len(val_ds))
    val_images = [it[0] for it in (val_ds[i] for i in range(n_eval)) if it]
    if not val_images:
        raise ValueError(f"no readable held-out image among the first {n_eval} of {cfg.val_data or cfg.data}")
    val_images = torch.stack(val_images).to(device).contiguous(memory_format=torch.channels_last)
    counter = SkipCounter(cfg.data)
    streamed = isinstance(train_ds, torch.utils.data.IterableDataset)
    loader = _train_batches(train_ds, cfg, step, counter, pin=device.type == "cuda")
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "log.csv"
    new_log = not log_path.exists() or not cfg.resume
    log_file = open(log_path, "w" if new_log else "a", newline="")
    log = csv.writer(log_file)
    if new_log:
        log.writerow(LOG_COLUMNS)
    try:
        from torch.utils.tensorboard import SummaryWriter

        tb = SummaryWriter(str(out / "tb"))
    except ImportError:  # tensorboard is optional
        tb = None
    try:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=step, desc="dVAE", dynamic_ncols=True, disable=not sys.stderr.isatty())
    except ImportError:
        bar = None

    started = time.time() - seconds
    metrics: dict = {}
    ema_params = [(ema[k], v) for k, v in model.state_dict().items() if v.dtype.is_floating_point]
    for images, captions, skipped in loader:
        counter.add(len(captions) + skipped, skipped)
        if not captions:
            continue
        at = schedule_position(step, time.time() - started, cfg)
        tau = cosine_anneal(at, int(cfg.steps * cfg.tau_anneal), dcfg.tau_start, dcfg.tau_end)
        beta = linear_ramp(at, int(cfg.steps * cfg.kl_ramp), dcfg.kl_max)
        lr = cosine_anneal(at, cfg.steps, cfg.lr, cfg.lr_end)
        for g in opt.param_groups:
            g["lr"] = lr
        images = images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        parts = model(images, tau, beta)
        opt.zero_grad(set_to_none=True)
        parts["loss"].backward()
        opt.step()
        with torch.no_grad():  # EMA with a warm-up, so short runs are not evaluated on their init
            decay = min(cfg.ema, (1 + step) / (10 + step))
            for e, v in ema_params:
                e.lerp_(v, 1 - decay)
        step += 1
        if bar:
            bar.update(1)
        done = step == cfg.steps or step == stop_at or (cfg.time_limit and time.time() - started > cfg.time_limit)
        if step % cfg.log_every == 0 or step % cfg.ckpt_every == 0 or done:
            ev = evaluate(model, ema, val_images) if (step % cfg.ckpt_every == 0 or done) else {}
            metrics = {"step": step, **{k: float(parts[k].detach()) for k in ("loss", "nll", "kl", "mse")}}
            metrics.update(tau=tau, beta=beta, lr=lr, seconds=time.time() - started)
            metrics.update({k: ev.get(k, math.nan) for k in ("psnr", "usage", "perplexity")})
            log.writerow([metrics[k] for k in LOG_COLUMNS])
            log_file.flush()
            if tb:
                for k, v in metrics.items():
                    if k != "step" and not math.isnan(v):
                        tb.add_scalar(f"vae/{k}", v, step)
            if ev:
                save_checkpoint(out, model, ema, opt, step, cfg, dcfg, seconds=time.time() - started)
                save_recon_grid(out / f"recon_{step:07d}.png", val_images[:8].cpu(), ev["recon"][:8].cpu())
                msg = f"step {step}: loss {metrics['loss']:.4f} psnr {ev['psnr']:.2f} dB codebook {ev['usage']:.0%}"
                (bar.write if bar else print)(msg)
        if done:
            break
        if counter.seen and step % 1000 == 0 and not streamed:  # a stream reports at the end of each pass
            counter.end_epoch()
    counter.end_epoch()
    if bar:
        bar.close()
    if tb:
        tb.close()
    log_file.close()
    return metrics


# ---- the main job: every stage on the built-in data --------------------------------------------------


@dataclass
class PipelineConfig:
    """The main job: tokenizer, dVAE and transformer on the built-in shapes data, then samples for
    captions of held-out colour-shape pairs (runs/<name>/samples.png)."""

    name: str = field(default="shapes", metadata={"help": "run name: everything goes to <root>/<name>/"})
    root: str = field(default="runs", metadata={"help": "folder of the runs"})
    # 1500 dVAE updates (about 2.1 minutes; 29.7-30.0 dB held out) leave the transformer most of the 15 minutes.
    vae_steps: int = field(default=1500, metadata={"help": "dVAE updates"})
    vae_minutes: float = field(default=2.5, metadata={"help": "stop the dVAE stage after this long; 0: no limit"})
    # The 8x8 grid scores higher within the 15-minute budget on 2 CPU cores; 16x16 draws shapes better given
    # about four times the transformer time (README, "What limits caption fidelity": --grid 16 --width 128
    # --dalle-batch 32 --dalle-minutes 36).
    grid: int = field(default=8, metadata={"help": "dVAE token grid: 8 (64 image tokens) or 16 (256)"})
    width: int = field(default=0, metadata={"help": "transformer d_model; 0: the tiny preset's (192)"})
    dalle_steps: int = field(default=3000, metadata={"help": "transformer updates"})
    dalle_minutes: float = field(default=9.0, metadata={"help": "stop the transformer after this long; 0: no limit"})
    dalle_batch: int = field(default=64, metadata={"help": "captioned images per transformer update"})
    items: int = field(default=20000, metadata={"help": "training images encoded for the transformer"})
    clip_steps: int = field(default=400, metadata={"help": "updates of the CLIP reranker"})
    clip_minutes: float = field(default=1.5, metadata={"help": "stop the reranker after this long; 0: no limit"})
    rerank: int = field(default=32, metadata={"help": "samples drawn per caption; the reranker keeps the best"})
    captions: int = field(default=8, metadata={"help": "held-out captions in samples.png"})
    per_caption: int = field(default=2, metadata={"help": "samples per caption"})
    threads: int = field(default=0, metadata={"help": "torch CPU threads; 0: torch's default"})
    device: str = field(default="auto", metadata={"help": "every stage's --device: auto | cpu | cuda | cuda:N"})
    seed: int = field(default=0, metadata={"help": "seed of every stage"})

    def __post_init__(self):
        if not self.name or "/" in self.name:
            raise ValueError(f"name must be a non-empty folder name, got {self.name!r}")
        for name in ("vae_steps", "dalle_steps", "dalle_batch", "clip_steps", "items", "captions", "per_caption"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if min(self.vae_minutes, self.dalle_minutes, self.clip_minutes, self.threads) < 0:
            raise ValueError("vae_minutes, dalle_minutes, clip_minutes and threads must be >= 0")
        if self.rerank < self.per_caption:
            raise ValueError(f"rerank ({self.rerank}) must be >= per_caption ({self.per_caption})")
        parse_device(self.device, check_available=False)


def _stage_state(out: Path, steps: int) -> str:
    """The stage's state: "new", "partial" (a checkpoint short of `steps`: resume it) or "done"."""
    if not (out / "state.pt").exists() or not (out / "config.json").exists():
        return "new"
    meta = json.loads((out / "config.json").read_text())
    return "done" if meta.get("step", 0) >= min(steps, meta.get("train", {}).get("steps", steps)) else "partial"


def _run_stage(label: str, cfg, train) -> None:
    """Trains a stage (a config with .out and .steps) unless its run directory holds a finished run; a
    partial one is resumed."""
    state = _stage_state(Path(cfg.out), cfg.steps)
    if state != "done":
        print(f"{label} -> {cfg.out}", file=sys.stderr)
        train(dataclasses.replace(cfg, resume=state == "partial"))


def run_pipeline(cfg: PipelineConfig) -> dict:
    """Runs (or continues) every stage; returns where everything is."""
    from dalle_fast.clip import CLIPScorer, CLIPTrainConfig, load_clip, train_clip
    from dalle_fast.data import ShapesDataset
    from dalle_fast.generate import generate, sampling_device, save_captioned_grid
    from dalle_fast.ops import cuda_unusable_reason
    from dalle_fast.train_dalle import DALLETrainConfig, cpu_has_native_bf16, load_transformer, train_dalle

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    run = Path(cfg.root) / cfg.name
    started = time.time()
    vae_cfg = VAETrainConfig(
        data="shapes", preset="tiny", grid=cfg.grid, out=str(run / "vae"), steps=cfg.vae_steps,
        time_limit=cfg.vae_minutes * 60, seed=cfg.seed, threads=cfg.threads, device=cfg.device,
    )  # fmt: skip
    _run_stage("[1/4] dVAE", vae_cfg, train_vae)
    # Where the transformer trains (resolve_device's rule): on a CPU, bf16 where it multiplies bf16 natively.
    on_cpu = cfg.device == "cpu" or (cfg.device == "auto" and cuda_unusable_reason() is not None)
    dalle_cfg = DALLETrainConfig(
        data="shapes", vae=vae_cfg.out, preset="tiny", d_model=cfg.width, out=str(run / "dalle"),
        steps=cfg.dalle_steps, batch_size=cfg.dalle_batch, max_items=cfg.items, time_limit=cfg.dalle_minutes * 60,
        seed=cfg.seed, threads=cfg.threads, device=cfg.device,
        precision="bf16" if on_cpu and cpu_has_native_bf16() else "auto",
    )  # fmt: skip
    _run_stage("[2/4] tokenizer and transformer", dalle_cfg, train_dalle)
    clip_cfg = CLIPTrainConfig(
        data="shapes", dalle=dalle_cfg.out, out=str(run / "clip"), steps=cfg.clip_steps, max_items=min(cfg.items, 8000),
        time_limit=cfg.clip_minutes * 60, seed=cfg.seed, threads=cfg.threads, device=cfg.device,
    )  # fmt: skip
    _run_stage("[3/4] CLIP reranker", clip_cfg, train_clip)

    print(f"[4/4] samples for held-out colour-shape pairs (best {cfg.per_caption} of {cfg.rerank})", file=sys.stderr)
    model, tok, dvae = load_transformer(dalle_cfg.out)
    device = sampling_device(cfg.device, model)
    model.to(device)
    heldout = ShapesDataset("heldout", cfg.captions, dvae.cfg.image_size, cfg.seed)
    caps = [heldout.captions(i)[0] for i in range(cfg.captions)]
    scorer = CLIPScorer(*load_clip(clip_cfg.out))
    drawn = generate(
        model, tok.encode(caps), dvae, draws=cfg.rerank, keep=cfg.per_caption, scorer=scorer, captions=caps,
        generator=torch.Generator(device).manual_seed(cfg.seed),
    )  # fmt: skip
    captions = [c for c in caps for _ in range(cfg.per_caption)]
    images = drawn["images"].flatten(0, 1)  # (captions * per_caption, 3, H, W), each caption's best first
    samples = save_captioned_grid(run / "samples.png", images, captions, columns=2 * cfg.per_caption)
    where = {
        "samples": str(samples),
        "dvae": vae_cfg.out,
        "transformer": dalle_cfg.out,
        "reranker": clip_cfg.out,
        "tokenizer": str(run / "dalle" / "tokenizer.json"),
        "minutes": round((time.time() - started) / 60, 2),
    }
    print("\n".join(f"{k:>12}: {v}" for k, v in where.items()), file=sys.stderr)
    return where


USAGE = """usage: python -m dalle_fast.train [flags]          the main job: every stage on the built-in data
       python -m dalle_fast.train vae [flags]      stage 1: the dVAE
       python -m dalle_fast.train dalle [flags]    stage 2: the transformer (needs --vae RUN)
Each takes --help for its flags."""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    stage = argv[0] if argv and not argv[0].startswith("-") else "all"
    if stage == "vae":
        cls, run, prog = VAETrainConfig, train_vae, "python -m dalle_fast.train vae"
    elif stage == "dalle":
        from dalle_fast.train_dalle import DALLETrainConfig, train_dalle

        cls, run, prog = DALLETrainConfig, train_dalle, "python -m dalle_fast.train dalle"
    elif stage == "clip":  # the reranker (needs --dalle RUN for its tokenizer)
        from dalle_fast.clip import CLIPTrainConfig, train_clip

        cls, run, prog = CLIPTrainConfig, train_clip, "python -m dalle_fast.train clip"
    elif stage == "all":
        cls, run, prog = PipelineConfig, run_pipeline, "python -m dalle_fast.train"
    else:
        print(f"unknown stage {stage!r}\n{USAGE}", file=sys.stderr)
        return 2
    ap = build_parser(cls, prog)
    args = ap.parse_args(argv[1:] if stage != "all" else argv)
    try:
        result = run(cls(**vars(args)))
    except ValueError as e:
        ap.error(str(e))
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun: one result line, rank 0's
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
