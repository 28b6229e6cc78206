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
(dalle_fast.training.amp: one scale per resblock, skipped blocks on overflow, no host sync), or bf16.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import distribute_tensor

from dalle_fast.data.batches import step_generator
from dalle_fast.data.sources import DATA_HELP, describe, open_datasets
from dalle_fast.data.token_cache import TokenCache, encode_images
from dalle_fast.data.tokenizer import CaptionTokenizer
from dalle_fast.errors import FieldError, check_finite, field_errors
from dalle_fast.models.dvae import DVAEConfig
from dalle_fast.models.tokens import PAD
from dalle_fast.models.transformer import ATTENTION_MODES, DALLE, PRESETS, TransformerConfig, preset
from dalle_fast.ops.device import PRECISIONS, autocast, choose_device, choose_precision
from dalle_fast.runs.checkpoint import load_config
from dalle_fast.runs.images import save_captioned_grid
from dalle_fast.runs.load import load_dvae, load_tokenizer
from dalle_fast.runs.log import RunLog
from dalle_fast.sampling.sample import sample_tokens
from dalle_fast.training.amp import BlockAdamW, ResblockGradScaler, clip_grad_norm_finite_
from dalle_fast.training.distributed import (
    LossModule,
    agree_found_inf,
    barrier,
    bytes_per_step,
    closing_process_group,
    init_from_env,
    mean_over_ranks,
    paper_compression_rate,
    sync_uncompressed,
    wrap_ddp,
    wrap_fsdp,
)
from dalle_fast.training.loop import (
    INIT_FROM_HELP,
    TIME_LIMIT_HELP,
    TrainingRun,
    check_init_from,
    claim_output,
    config_differences,
    seed_everything,
    set_threads,
)
from dalle_fast.training.schedules import warmup_cosine


@dataclass
class DALLETrainConfig:
    """Stage 2: the DALL-E transformer on captions and dVAE codes."""

    data: str = field(
        default="shapes",
        metadata={"help": DATA_HELP},
    )  # fmt: skip
    val_data: str = field(
        default="",
        metadata={"help": "held-out data (same forms); empty: split from --data (a stream: its first items)"},
    )
    vae: str = field(
        default="",
        metadata={"help": "the stage-1 run directory (its EMA weights encode); empty: the --init-from run's, else "
                  "runs/vae"},
    )  # fmt: skip
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
        default="auto",
        metadata={"help": "auto (CUDA fp16, bf16 with --shard; CPU bf16 where native, else fp32) | fp32 | bf16 | fp16"},
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
        metadata={"help": "per-resblock gradient scaling (dalle_fast.training.amp); always on with fp16"},
    )
    checkpoint: bool = field(default=False, metadata={"help": "activation checkpointing (recompute in backward)"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the model"})
    ckpt_every: int = field(default=500, metadata={"help": "updates between checkpoints"})
    log_every: int = field(default=50, metadata={"help": "updates between log lines"})
    samples: int = field(default=8, metadata={"help": "held-out captions sampled at each checkpoint; 0: none"})
    time_limit: float = field(default=0.0, metadata={"help": TIME_LIMIT_HELP})
    workers: int = field(default=0, metadata={"help": "DataLoader workers for the one-off image encoding"})
    threads: int = field(default=0, metadata={"help": "torch CPU threads; 0: torch's default"})
    seed: int = field(default=0, metadata={"help": "seed of the init, the batches and the samples"})
    resume: bool = field(default=False, metadata={"help": "continue the run in --out exactly where it stopped"})
    init_from: str = field(
        default="", metadata={"help": "stage-2 run to start from (its tokenizer and dVAE too); " + INIT_FROM_HELP}
    )

    def __post_init__(self):
        check_finite(self)
        check_init_from(self)
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
            raise ValueError("shard and powersgd_rank exclude each other (PowerSGD is a DDP communication hook)")
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
        if self.text_len == 1:
            raise ValueError("text_len must be 0 (the preset's) or >= 2 (one text position leaves no text to predict)")
        if self.vocab_size and self.vocab_size < 257:
            raise ValueError(f"vocab_size must be 0 or >= 257, got {self.vocab_size}")
        if not (self.lr > 0 and 0 <= self.lr_end <= self.lr):
            raise ValueError(f"need lr > 0 and 0 <= lr_end <= lr, got {self.lr}, {self.lr_end}")
        if not 0 <= self.bpe_dropout < 1 or not 0 <= self.ema < 1 or not 0 <= self.caption_dropout < 1:
            raise ValueError("bpe_dropout, caption_dropout and ema must be in [0, 1)")
        if self.weight_decay < 0 or self.grad_clip < 0 or self.time_limit < 0:
            raise ValueError("weight_decay, grad_clip and time_limit must be >= 0")


# ---- the loop ---------------------------------------------------------------------------------------


def resolve_device(cfg: DALLETrainConfig) -> tuple[torch.device, str]:
    """(device, precision) of a run, by the one device and precision policy (dalle_fast.ops.device): the
    GPU needs this build's kernels (attention, and gradient scaling with fp16) and, for sparse attention,
    a head dim they cover."""
    sparse = cfg.attention != "dense"
    device = choose_device(cfg.device, kernels=True, head_dim=PRESETS[cfg.preset].head_dim if sparse else None)
    return device, choose_precision(cfg.precision, device, sharded=cfg.shard, cuda_kernels=sparse)


class DALLERun(TrainingRun):
    """The transformer's part of the training skeleton: the token caches and tokenizer, the model under
    plain, DDP or FSDP training, mixed precision, its update, validation loss and sample grids."""

    tag = "dalle"
    columns = ["step", "loss", "text", "image", "val_image", "grad_norm", "lr", "tokens_per_s", "seconds"]

    def __init__(self, cfg: DALLETrainConfig):
        set_threads(cfg.threads)
        claim_output(Path(cfg.out), cfg.resume)  # before joining a process group: refuse early
        self.init_meta = _init_run(cfg)
        device, self.precision = resolve_device(cfg)
        dist = init_from_env(device.type, cfg.dist_timeout)
        if dist.enabled and device.type == "cuda":
            device = torch.device("cuda", dist.local_rank)
            torch.cuda.set_device(device)
        super().__init__(cfg, device, dist)
        # A resumed run keeps its dVAE and where it started from without their flags (its config.json says).
        own = load_config(self.out) if cfg.resume else {}
        self.init_source = str(Path(cfg.init_from).resolve()) if cfg.init_from else own.get("init_from", {}).get("run")
        vae = cfg.vae or self.init_meta.get("train", {}).get("vae") or own.get("train", {}).get("vae") or "runs/vae"
        self.cfg = cfg = dataclasses.replace(cfg, vae=vae)
        if self.dist.main:
            print(f"device {self.device}, precision {self.precision}", file=sys.stderr)
        if cfg.batch_size % dist.world:
            raise FieldError(
                "batch_size", f"{cfg.batch_size} is not a multiple of the number of processes ({dist.world})"
            )
        if cfg.shard and (self.precision == "fp16" or cfg.resblock_scaling):
            raise FieldError("shard", "does not combine with per-resblock gradient scaling (fp16) yet; use bf16")
        with field_errors("vae"):
            self.dvae = load_dvae(cfg.vae).to(self.device)  # encodes the data, decodes the samples
        if cfg.init_from:  # the codes the transformer learnt must mean the same images
            diff = config_differences(
                dataclasses.asdict(DVAEConfig(**self.init_meta["dvae"])), dataclasses.asdict(self.dvae.cfg)
            )
            if diff:
                raise FieldError(
                    "vae", f"{cfg.vae} is not the dVAE {cfg.init_from} was trained with: {'; '.join(diff)}"
                )
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
        seed_everything(cfg.seed)
        self.model = DALLE(self.mcfg).to(self.device)
        if cfg.init_from:  # before any wrapper: the plain model's names
            ignore = ("checkpoint",)  # recomputing activations changes no weight
            self.start_from("transformer", dataclasses.asdict(self.mcfg), _full_transformer_config, ignore)
        self.scaler = None
        if self.precision == "fp16" or cfg.resblock_scaling:
            # The paper's M: scales start M times higher, as each replica's loss is 1/M of the global one.
            self.scaler = ResblockGradScaler(2 * self.mcfg.n_layers, replicas=self.dist.world, device=self.device)
            self.model.use_resblock_scaler(self.scaler)
        # The module whose forward() computes the loss: plain, DDP (maybe with PowerSGD) or FSDP.
        self.uncompressed: list[torch.nn.Parameter] = []
        self.powersgd = None
        if self.sharded:
            self.forward_module = wrap_fsdp(self.model)
        elif self.dist.enabled:
            self.forward_module, self.uncompressed, self.powersgd = wrap_ddp(
                self.model, self.dist, self.device, cfg.powersgd_rank, fp16_comm=not cfg.powersgd_fp32
            )
        else:
            self.forward_module = LossModule(self.model)
        self.init_ema()
        self.sharded_ema = self.sharded
        hyper = dict(lr=cfg.lr, betas=(0.9, 0.96), eps=1e-8, weight_decay=cfg.weight_decay)
        if self.scaler is not None:
            self.opt = BlockAdamW(self.scaler.param_groups(self.model), self.scaler, **hyper)
        else:
            self.opt = torch.optim.AdamW(self.model.parameters(), **hyper)
        self.params = list(self.model.parameters())
        if cfg.resume:
            self.resume()
        self.forward_loss = torch.compile(self.forward_module) if cfg.compile else self.forward_module
        self.window_start, self.window_tokens = time.time(), 0  # the throughput of the steps since the last log

    @property
    def sharded(self) -> bool:
        return self.cfg.shard and self.dist.enabled

    # data and tokenizer

    def _prepare_data(self) -> None:
        cfg, out = self.cfg, self.out
        tok_path = out / "tokenizer.json"
        key = {
            "data": cfg.data,
            "val_data": cfg.val_data,
            "vae": str(Path(cfg.vae).resolve()),
            "vae_step": load_config(cfg.vae).get("step"),
            "max_items": cfg.max_items,
            "val_items": cfg.val_items,
            "bpe_variants": cfg.bpe_variants,
            "seed": cfg.seed,
        }
        if self.init_source:  # its tokenizer encoded the captions
            key["init_from"] = self.init_source
        caches = {s: TokenCache.load(out / f"cache_{s}.pt", key) for s in ("train", "val")}
        if tok_path.exists() and all(caches.values()):
            self.tok = CaptionTokenizer.load(tok_path)
        elif cfg.resume and tok_path.exists():
            raise ValueError(f"cannot resume {out}: its token caches are missing or were built for other data")
        else:
            with field_errors("data"):
                train_ds, val_ds = open_datasets(
                    cfg.data, self.dvae.cfg.image_size, cfg.seed, val_spec=cfg.val_data or None,
                    stream_heldout=cfg.val_items,
                )  # fmt: skip
            if self.dist.main:
                image_size = self.dvae.cfg.image_size
                print(describe(cfg.data, train_ds, val_ds, image_size, cfg.val_data or None), file=sys.stderr)
            t0 = time.time()
            codes, lines = self._encode_shared(train_ds, f"{cfg.data} (train)")
            if not self.dist.main:  # rank 0 builds the tokenizer and the caches; the others load them
                barrier(self.dist)
                return self._prepare_data()
            vcodes, vlines, _ = encode_images(val_ds, self.dvae, cfg.val_items, cfg.workers, f"{cfg.data} (val)")
            for name, c in (("training", codes), ("held-out", vcodes)):
                if not len(c):
                    raise FieldError(
                        "data", f"{cfg.data}: no usable {name} items (every image or caption was unreadable)"
                    )
            base = PRESETS[cfg.preset]
            if cfg.init_from:
                self.tok = self._init_tokenizer()
                self.tok.add_words(c for cs in lines for c in cs)
            else:
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

    def _init_tokenizer(self) -> CaptionTokenizer:
        """The --init-from run's tokenizer (token ids mean what its model learnt), with this run's BPE
        dropout; vocab_size and text_len, when set, must be the ones it was trained with."""
        cfg, init = self.cfg, self.init_meta.get("train", {})
        for name in ("vocab_size", "text_len"):
            if getattr(cfg, name) and getattr(cfg, name) != init.get(name):
                raise FieldError(
                    name,
                    f"{getattr(cfg, name)}, but {cfg.init_from} (whose tokenizer this run keeps) has {init.get(name)}",
                )
        with field_errors("init_from"):
            tok = load_tokenizer(cfg.init_from)
        tok.dropout = cfg.bpe_dropout
        return tok

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
        g = step_generator(self.cfg.seed, step)
        index = torch.randint(0, len(self.train_cache), (self.cfg.batch_size,), generator=g)
        text, image = self.train_cache.batch(index, g, dropout=self.cfg.bpe_dropout > 0)
        if self.cfg.caption_dropout > 0:  # the empty caption: every text position padding
            text = text.masked_fill((torch.rand(len(text), generator=g) < self.cfg.caption_dropout)[:, None], PAD)
        if self.dist.enabled:  # every rank draws the global batch and keeps its own slice
            text, image = (t.chunk(self.dist.world)[self.dist.rank] for t in (text, image))
        if self.device.type == "cuda":  # pinned and asynchronous: the host does not wait for the GPU here
            return tuple(t.pin_memory().to(self.device, non_blocking=True) for t in (text, image))
        return text, image

    # one update

    def update(self, step: int) -> dict:
        cfg = self.cfg
        text, image = self.batch(step)
        self.lr = warmup_cosine(step, self.progress(), cfg.lr, cfg.lr_end, cfg.warmup, cfg.steps)
        self.set_lr(self.lr)
        with autocast(self.device, self.precision):
            parts = self.forward_loss(text, image)
        self.opt.zero_grad(set_to_none=True)
        parts["loss"].backward()
        sync_uncompressed(self.uncompressed, self.dist)
        if self.scaler is not None:
            self.scaler.unscale_(self.opt)
            agree_found_inf(self.scaler.found_inf, self.dist)
        if not cfg.grad_clip:
            self.grad_norm = torch.zeros(())
        elif self.sharded:  # sharded gradients: torch's clip computes the global norm across ranks
            self.grad_norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
        else:
            self.grad_norm = clip_grad_norm_finite_(self.params, cfg.grad_clip)
        self.opt.step()
        if self.scaler is not None:
            self.scaler.update()
        self.window_tokens += image.numel()
        return parts

    def log_values(self, losses: dict) -> dict[str, float]:
        values = mean_over_ranks([float(losses[k].detach()) for k in ("loss", "text", "image")], self.dist, self.device)
        now = time.time()  # after the losses' host read: the window's work is done, not just queued
        return {
            **dict(zip(("loss", "text", "image"), values, strict=True)),
            "grad_norm": float(self.grad_norm),
            "lr": self.lr,
            "tokens_per_s": self.window_tokens / max(now - self.window_start, 1e-9),
        }

    def after_log(self) -> None:
        self.window_start, self.window_tokens = time.time(), 0  # evaluation and samples stay out of the rate

    # evaluation

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Image cross-entropy of the EMA weights on the held-out items (clean captions)."""
        total, n = 0.0, 0
        with self.ema_weights() as model, autocast(self.device, self.precision):
            model.eval()
            for start in range(0, len(self.val_cache), 128):
                index = torch.arange(start, min(start + 128, len(self.val_cache)))
                text, image = self.val_cache.batch(index, torch.Generator(), dropout=False)
                total += float(model.loss(text.to(self.device), image.to(self.device))["image"]) * len(index)
                n += len(index)
            model.train()
        return {"val_image": total / n}

    def at_checkpoint(self, metrics: dict, log: RunLog) -> None:
        if self.cfg.samples:
            self.write_samples(self.out / f"samples_{self.step:07d}.png", self.full_ema)
        log.print(f"step {self.step}: loss {metrics['loss']:.4f} image {metrics['image']:.4f} "
                  f"held-out image {metrics['val_image']:.4f}")  # fmt: skip

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
        with context as model, autocast(self.device, self.precision):
            model.eval()
            tokens = sample_tokens(model, self.sample_text.to(self.device), top_k=0, generator=g)
            model.train()
        W = self.mcfg.image_size
        images = self.dvae.decode(tokens.view(-1, W, W)).cpu()
        save_captioned_grid(path, images, self.tok.decode(self.sample_text))

    # checkpoints

    def meta(self) -> dict:
        return {
            "train": dataclasses.asdict(self.cfg),
            "transformer": dataclasses.asdict(self.mcfg),
            "dvae": dataclasses.asdict(self.dvae.cfg),
            "step": self.step,
        }

    def weights(self) -> dict[str, dict[str, torch.Tensor]]:
        """Every rank calls it: a sharded model gathers its full state (kept as full_ema for the samples)."""
        self.full_ema = None
        if not self.sharded:
            return {"model": self.model.state_dict(), "ema": self.ema}
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_sd = get_model_state_dict(self.model, options=opts)
        self.full_ema = {k: v.full_tensor().cpu() if hasattr(v, "full_tensor") else v for k, v in self.ema.items()}
        return {"model": model_sd, "ema": self.full_ema}

    def extra_state(self) -> dict:
        if self.sharded:
            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            optim_sd, optim_format = get_optimizer_state_dict(self.model, self.opt, options=opts), "names"
        else:
            optim_sd, optim_format = self.opt.state_dict(), "ids"
        state = {
            "optimizer": optim_sd,
            "optimizer_format": optim_format,  # "names" (sharded runs) or "ids" (torch's own format)
            "world": self.dist.world,
            "precision": self.precision,  # resolved ("auto" may mean fp16 on a GPU and fp32 on a CPU)
        }
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        return state

    def check_resume(self, state: dict, meta: dict) -> None:
        saved = meta.get("transformer")
        if saved != dataclasses.asdict(self.mcfg):
            raise ValueError(f"cannot resume {self.out}: it holds a different model configuration: {saved}")
        if ("scaler" in state) != (self.scaler is not None):
            # Per-resblock scaling changes the optimizer's parameter groups and state: no switching mid-run.
            was = state.get("precision", "fp16 or resblock_scaling" if "scaler" in state else "fp32 or bf16")
            raise ValueError(
                f"cannot resume {self.out}: it was trained with precision {was} "
                f"({'with' if 'scaler' in state else 'without'} per-resblock gradient scaling), but this run "
                f"resolves to precision {self.precision} on {self.device.type} "
                f"({'with' if self.scaler is not None else 'without'} it): resume it with the precision, "
                "device and resblock scaling it was trained with"
            )
        if self.sharded and state.get("optimizer_format", "ids") != "names":
            raise ValueError(
                f"cannot resume {self.out} sharded: it was saved unsharded (resume it with DDP or one process)"
            )

    def load_weights(self, weights: dict[str, dict[str, torch.Tensor]]) -> None:
        if self.sharded:
            set_model_state_dict(self.model, weights["model"], options=StateDictOptions(full_state_dict=True))
        else:
            self.model.load_state_dict(weights["model"])
        for k, v in weights["ema"].items():
            e = self.ema[k]
            if hasattr(e, "device_mesh"):  # a shard: keep this rank's part of the full tensor
                v = distribute_tensor(v.to(e.device), e.device_mesh, e.placements)
            e.copy_(v)

    def load_extra_state(self, state: dict) -> None:
        if self.sharded or state.get("optimizer_format", "ids") == "names":
            opts = StateDictOptions(full_state_dict=True)
            set_optimizer_state_dict(self.model, self.opt, state["optimizer"], options=opts)
        else:
            self.opt.load_state_dict(state["optimizer"])
        if self.scaler is not None:
            saved = dict(state["scaler"])
            if saved["replicas"] != self.dist.world:  # resumed on another number of processes: the
                # scales carry the factor M = replicas (the paper's), so they move with it
                saved["scales"] = saved["scales"] * (self.dist.world / saved["replicas"])
                saved["replicas"] = self.dist.world
            self.scaler.load_state_dict(saved)

    def train(self, stop_at: int | None = None) -> dict:
        self.model.train()
        metrics = super().train(stop_at)
        if self.powersgd is not None and self.dist.main:
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


def _init_run(cfg: DALLETrainConfig) -> dict:
    """The config.json of the --init-from run ({} without one); a given --vae must be its dVAE run."""
    if not cfg.init_from:
        return {}
    with field_errors("init_from"):
        meta = load_config(cfg.init_from)
        if "transformer" not in meta:
            raise ValueError(f"{cfg.init_from} is not a stage-2 run (its config.json has no 'transformer' entry)")
    theirs = meta.get("train", {}).get("vae", "")
    if cfg.vae and Path(cfg.vae).resolve() != Path(theirs).resolve():
        raise FieldError(
            "vae", f"{cfg.vae} is not the dVAE of {cfg.init_from} ({theirs}); leave it out to use that one"
        )
    return meta


def _full_transformer_config(saved: dict) -> dict:
    """A run's transformer config with every field (a run older than a field gets its default)."""
    return dataclasses.asdict(TransformerConfig(**saved))


def train_dalle(cfg: DALLETrainConfig, stop_at: int | None = None) -> dict:
    """Runs (or resumes) stage-2 training. stop_at: stop after that step, as if killed (tests use it).
    Under torchrun, every rank runs this; the process group it joins is closed at the end, also when the
    run is refused after joining (a bad vae, a batch size that does not split); one the caller made
    stays the caller's to close."""
    with closing_process_group():
        return DALLERun(cfg).train(stop_at)
