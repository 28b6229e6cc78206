"""Stage 1: the discrete VAE (Section 2.1, Appendix A).

Encoder: 7x7 conv, then `groups` groups of bottleneck resblocks (widths hidden x 1, 2, 4, 8, ...) with a
2x2 max-pool between groups, then a 1x1 conv to logits over the codebook. Decoder: 1x1 conv from the
(relaxed) one-hot codes, groups in reverse with nearest 2x upsampling between them, then a 1x1 conv to 6
maps: mu and ln b of a logit-Laplace distribution for each RGB channel. Each resblock's residual branch
is scaled by 1 / n_layers^2 (n_layers = groups x blocks_per_group), as in the paper. Two options
reproduce OpenAI's released dVAE exactly (the `openai` preset): `decoder_init`, a narrower 1x1 entry conv
(128 wide) whose first block widens it with a 1x1-conv shortcut, and `encoder_input="phi"`, the pixels
fed as phi(x) in [0.1, 0.9] rather than centred.

The likelihood is the paper's logit-Laplace by default. `likelihood="logit_normal"` swaps in a Gaussian
in the same logit space with a fixed scale `sigma` (3 output maps): on flat-coloured synthetic images the
learned per-pixel scale lets the decoder explain an object's colour as noise instead of encoding it (the
tiny preset trained that way draws every colour as orange or purple), and a fixed-scale likelihood does
not (docs/training.md, "The dVAE").

Training relaxes the codes with gumbel-softmax (temperature annealed 1 -> 1/16 on a cosine schedule)
and adds beta x KL(q || uniform), beta ramped linearly 0 -> 6.6; both the likelihood and the KL are
normalised per pixel value, so the KL's effective weight per code is beta / (3 x factor^2) (beta/192 at
the paper's factor 8). Pixels x in [0, 1] are mapped into (eps, 1 - eps) by phi(x) = (1 - 2 eps) x + eps,
eps = 0.1; the reconstruction is phi^-1(sigmoid(mu)). Stage-2 targets are argmax codes (`encode`).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import asdict, dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

EPS = 0.1  # logit-Laplace pixel margin (the paper's epsilon)
LIKELIHOODS = ("logit_laplace", "logit_normal")
ENCODER_INPUTS = ("centred", "phi")


@dataclass
class DVAEConfig:
    groups: int = 4  # resblock groups; the grid is image_size / 2^(groups - 1)
    blocks_per_group: int = 2  # bottleneck resblocks per group
    hidden: int = 256  # width of the first group (later groups double it)
    codebook: int = 8192  # number of discrete codes
    image_size: int = 256  # training image side
    kl_max: float = 6.6  # final KL weight beta
    tau_start: float = 1.0  # gumbel-softmax temperature at step 0
    tau_end: float = 1.0 / 16  # ... at the end of the anneal
    likelihood: str = "logit_laplace"  # the paper's (mu, learned ln b: 6 maps) | logit_normal (mu: 3 maps)
    sigma: float = 0.2  # logit_normal's fixed standard deviation, in logit units
    # OpenAI's released dVAE (the `openai` preset) differs from this project's default in two places:
    decoder_init: int = 0  # decoder entry: codes -> this width by a 1x1 conv, then a 1x1-shortcut block; 0: none
    encoder_input: str = "centred"  # centred: phi(x) * 2 - 1, in [-0.8, 0.8] | phi: phi(x), in [0.1, 0.9]

    def __post_init__(self):
        for name in ("groups", "blocks_per_group", "hidden", "codebook", "image_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an int >= 1, got {getattr(self, name)!r}")
        if self.codebook < 2:
            raise ValueError(f"codebook must be >= 2, got {self.codebook}")
        if self.image_size % self.factor:
            raise ValueError(f"image_size ({self.image_size}) must be a multiple of the factor {self.factor}")
        if self.likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {self.likelihood!r}")
        if not isinstance(self.decoder_init, int) or self.decoder_init < 0:
            raise ValueError(f"decoder_init must be an int >= 0 (0: none), got {self.decoder_init!r}")
        if self.encoder_input not in ENCODER_INPUTS:
            raise ValueError(f"encoder_input must be one of {ENCODER_INPUTS}, got {self.encoder_input!r}")
        if not self.sigma > 0:
            raise ValueError(f"sigma must be > 0, got {self.sigma}")
        if not 0 < self.tau_end <= self.tau_start:
            raise ValueError(f"need 0 < tau_end <= tau_start, got {self.tau_end}, {self.tau_start}")

    @property
    def factor(self) -> int:
        """Downsampling factor: image_size / grid side."""
        return 2 ** (self.groups - 1)

    @property
    def grid(self) -> int:
        return self.image_size // self.factor


PRESETS = {
    # The paper's model: 256x256 -> 32x32 codes from a codebook of 8192.
    "paper": DVAEConfig(),
    # For the built-in shapes data on a CPU: 32x32 -> 8x8 codes from 256, hidden width 32. 256 codes, not
    # 64, let 4x4-pixel tokens keep small shapes' corners in six colours (the judge's ceiling 46% -> 60% at
    # 1500 updates). The fixed-scale logit-normal likelihood, since the paper's learned-scale logit-Laplace
    # drew every colour wrong at this size (the studies: benchmarks/RESULTS_defaults.md).
    "tiny": DVAEConfig(
        groups=3, blocks_per_group=1, hidden=32, codebook=256, image_size=32, likelihood="logit_normal", sigma=0.2
    ),
    # OpenAI's released dVAE (DALL-E 0.1's Encoder and Decoder): the paper's shape, with a 128-wide 1x1
    # entry conv in the decoder and phi(x) fed to the encoder as it is (python -m dalle_fast.convert
    # openai-dvae builds a run of it from the released files; docs/openai_dvae.md).
    "openai": DVAEConfig(decoder_init=128, encoder_input="phi"),
}


def phi(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] pixels -> (eps, 1 - eps)."""
    return (1 - 2 * EPS) * x + EPS


def phi_inv(y: torch.Tensor) -> torch.Tensor:
    return ((y - EPS) / (1 - 2 * EPS)).clamp(0, 1)


def logit_laplace_nll(x: torch.Tensor, mu: torch.Tensor, ln_b: torch.Tensor) -> torch.Tensor:
    """-log f(x | mu, b) elementwise for x in (0, 1): f = exp(-|logit x - mu| / b) / (2 b x (1 - x))."""
    b = ln_b.exp()
    return (torch.logit(x) - mu).abs() / b + math.log(2.0) + ln_b + torch.log(x) + torch.log1p(-x)


def logit_normal_nll(x: torch.Tensor, mu: torch.Tensor, sigma: float) -> torch.Tensor:
    """-log f(x | mu, sigma) elementwise for x in (0, 1), logit x ~ N(mu, sigma^2):
    f = exp(-(logit x - mu)^2 / (2 sigma^2)) / (sqrt(2 pi) sigma x (1 - x))."""
    return (
        0.5 * ((torch.logit(x) - mu) / sigma) ** 2
        + math.log(math.sqrt(2 * math.pi) * sigma)
        + torch.log(x)
        + torch.log1p(-x)
    )


class BottleneckBlock(nn.Module):
    """id_path(x) + post_gain * res_path(x); res_path is 4 convs (ReLU before each) through n_out / 4
    channels. Kernel sizes: (3, 3, 3, 1) in the encoder, (1, 3, 3, 3) in the decoder."""

    def __init__(self, n_in: int, n_out: int, post_gain: float, kernels: tuple[int, int, int, int]):
        super().__init__()
        hid = max(n_out // 4, 1)
        widths = [n_in, hid, hid, hid, n_out]
        self.id_path = nn.Conv2d(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        layers: list[nn.Module] = []
        for k, a, b in zip(kernels, widths[:-1], widths[1:], strict=True):
            layers += [nn.ReLU(), nn.Conv2d(a, b, k, padding=k // 2)]
        self.res_path = nn.Sequential(*layers)
        self.post_gain = post_gain

    def forward(self, x):
        return self.id_path(x) + self.post_gain * self.res_path(x)


def _groups(cfg: DVAEConfig, block, widths: list[int], first_in: int, resample) -> nn.Sequential:
    """group_1.block_1 ... group_G.block_B, with `resample` closing every group but the last."""
    gain = 1.0 / (cfg.groups * cfg.blocks_per_group) ** 2
    groups: OrderedDict[str, nn.Module] = OrderedDict()
    n_in = first_in
    for g, w in enumerate(widths, start=1):
        blocks: OrderedDict[str, nn.Module] = OrderedDict()
        for b in range(1, cfg.blocks_per_group + 1):
            blocks[f"block_{b}"] = block(n_in, w, gain)
            n_in = w
        if g < len(widths):
            blocks["resample"] = resample()
        groups[f"group_{g}"] = nn.Sequential(blocks)
    return nn.Sequential(groups)


class DVAE(nn.Module):
    def __init__(self, cfg: DVAEConfig):
        super().__init__()
        self.cfg = cfg
        widths = [cfg.hidden * 2**g for g in range(cfg.groups)]
        enc_block = partial(BottleneckBlock, kernels=(3, 3, 3, 1))
        dec_block = partial(BottleneckBlock, kernels=(1, 3, 3, 3))
        upsample = partial(nn.Upsample, scale_factor=2, mode="nearest")
        self.encoder = nn.Sequential(OrderedDict(
            input=nn.Conv2d(3, cfg.hidden, 7, padding=3),
            blocks=_groups(cfg, enc_block, widths, cfg.hidden, partial(nn.MaxPool2d, 2)),
            relu=nn.ReLU(),
            output=nn.Conv2d(widths[-1], cfg.codebook, 1),
        ))  # fmt: skip
        rev = widths[::-1]
        entry = cfg.decoder_init or rev[0]  # a width of its own: the first block's shortcut is a 1x1 conv
        self.decoder = nn.Sequential(OrderedDict(
            input=nn.Conv2d(cfg.codebook, entry, 1),
            blocks=_groups(cfg, dec_block, rev, entry, upsample),
            relu=nn.ReLU(),
            output=nn.Conv2d(rev[-1], 6 if cfg.likelihood == "logit_laplace" else 3, 1),
        ))  # fmt: skip

    def batch_limit(self, budget_bytes: int = 2 << 30, cap: int = 256) -> int:
        """Images per encode()/decode() call that keep the activations near budget_bytes. Per image, the
        peak is a few fp32 maps of `hidden` channels at full resolution (measured on the CPU: under 6 in
        encode() and decode(); benchmarks/RESULTS_defaults.md), so 6 are counted."""
        per_image = 6 * self.cfg.hidden * self.cfg.image_size**2 * 4
        return max(1, min(cap, budget_bytes // per_image))

    def _check_images(self, images: torch.Tensor) -> None:
        s = self.cfg.image_size
        if (
            images.dim() != 4
            or images.shape[1] != 3
            or images.shape[2] % self.cfg.factor
            or images.shape[3] % self.cfg.factor
        ):
            raise ValueError(
                f"images must be [batch, 3, H, W] with H, W multiples of {self.cfg.factor} (trained at {s}x{s}), "
                f"got {tuple(images.shape)}"
            )

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """images in [0, 1], [B, 3, H, W] -> code logits [B, codebook, H / f, W / f]."""
        self._check_images(images)
        x = phi(images)
        # "phi" is OpenAI's input: no change of the weights turns it into the centred one, as the zero
        # padding at the borders sees the offset.
        return self.encoder(x if self.cfg.encoder_input == "phi" else x * 2 - 1)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Argmax codes, LongTensor [B, H / f, W / f] (the stage-2 targets: no gumbel noise), in batches
        of batch_limit() images."""
        return _in_batches(lambda x: self.logits(x).argmax(dim=1), images, self.batch_limit())

    def decode_soft(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(relaxed) one-hot codes [B, codebook, h, w] -> (mu, ln_b), each [B, 3, h f, w f] (ln_b has 0
        channels with the fixed-scale logit_normal likelihood)."""
        out = self.decoder(z)
        return out[:, :3], out[:, 3:]

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes LongTensor [B, h, w] -> images in [0, 1], [B, 3, h f, w f], in batches of batch_limit()."""
        if codes.dim() != 3 or codes.dtype != torch.long:
            raise ValueError(f"codes must be a LongTensor [batch, h, w], got {codes.dtype} {tuple(codes.shape)}")
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.cfg.codebook):
            raise ValueError(f"codes must be in [0, {self.cfg.codebook})")

        def decode_batch(c: torch.Tensor) -> torch.Tensor:
            z = F.one_hot(c, self.cfg.codebook).permute(0, 3, 1, 2).to(next(self.parameters()).dtype)
            mu, _ = self.decode_soft(z)
            return phi_inv(torch.sigmoid(mu))

        return _in_batches(decode_batch, codes, self.batch_limit())

    def forward(self, images: torch.Tensor, tau: float, beta: float) -> dict[str, torch.Tensor]:
        """The training loss (negative ELBO per pixel value) and its parts."""
        logits = self.logits(images)
        z = F.gumbel_softmax(logits, tau=tau, hard=False, dim=1)
        mu, ln_b = self.decode_soft(z)
        x = phi(images)
        if self.cfg.likelihood == "logit_laplace":
            nll = logit_laplace_nll(x, mu, ln_b).mean()
        else:
            nll = logit_normal_nll(x, mu, self.cfg.sigma).mean()
        log_q = F.log_softmax(logits, dim=1)
        kl = (log_q.exp() * (log_q + math.log(self.cfg.codebook))).sum(dim=1)  # KL(q || uniform) per cell
        kl_per_value = kl.sum() / images.numel()
        recon = phi_inv(torch.sigmoid(mu))
        return {
            "loss": nll + beta * kl_per_value,
            "nll": nll.detach(),
            "kl": kl.mean().detach(),
            "mse": F.mse_loss(recon, images).detach(),
        }


def _in_batches(fn, x: torch.Tensor, n: int) -> torch.Tensor:
    """fn over x in slices of at most n rows, concatenated (one call when x fits)."""
    return fn(x) if len(x) <= n else torch.cat([fn(b) for b in x.split(n)])


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB for images in [0, 1]."""
    mse = F.mse_loss(a.float(), b.float()).item()
    return float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)


def codebook_usage(codes: torch.Tensor, codebook: int) -> tuple[float, float]:
    """(fraction of codes used, perplexity of the code histogram)."""
    counts = torch.bincount(codes.flatten(), minlength=codebook).float()
    p = counts / counts.sum()
    nz = p[p > 0]
    return float((counts > 0).float().mean()), float(torch.exp(-(nz * nz.log()).sum()))


def config_dict(cfg: DVAEConfig) -> dict:
    return asdict(cfg)
