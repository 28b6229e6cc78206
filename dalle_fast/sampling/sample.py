"""Sampling images from a trained transformer: image tokens one at a time, decoded by the dVAE, reranked.

`sample_tokens` draws the image tokens one at a time (temperature, top-k, top-p, a seeded generator).
By default it decodes through the model's key/value cache (`DALLE.prefill` and `DALLE.decode_step`: the
prompt runs once, then each new token attends only to the cached keys its layer's mask allows);
cache=False recomputes the whole sequence for every token, the plain reference the cache is tested
against. Both draw the same random numbers in the same order, so for a seed they give the same tokens
(up to fp32 rounding of the logits). `generate` samples captions in batches, decodes and reranks.
"""

from __future__ import annotations

import contextlib
import math
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import torch
from PIL import Image, UnidentifiedImageError

from dalle_fast.data.images import preprocess
from dalle_fast.errors import FieldError
from dalle_fast.models.tokens import PAD
from dalle_fast.models.transformer import DALLE
from dalle_fast.ops.device import choose_device
from dalle_fast.sampling.rerank import Scorer, rerank

# Below it, logits / temperature overflow fp32 (a greedy draw is temperature -> 0; use top_k=1 for it).
MIN_TEMPERATURE = 1e-3

# progress(done, total): image tokens drawn so far and in all. Called once per drawn token position (for the
# whole batch), so it must be cheap; it may raise to stop the sampling (a caller that went away).
Progress = Callable[[int, int], None]


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
    progress: Progress | None = None,
) -> torch.Tensor:
    """Image tokens (B, image_size**2) for text (B, text_len). prime: (B, P) first image tokens to keep.
    cache=False: recompute the whole sequence per token (the reference path). progress(done, total) after
    each token position, counting the positions of one sequence (see Progress).

    guidance > 1 (classifier-free guidance; for a model trained with caption dropout): each token's logits
    become u + guidance * (c - u), c given the caption and u given the empty one (a second sequence per
    sample, decoded alongside), which pushes samples toward what the caption adds.

    On CUDA an fp32 model samples under bf16 autocast (see sampling_autocast). The loop runs in inference
    mode: no autograd bookkeeping per op (at batch 1 it is a tenth of a decode step); the tokens returned
    are an ordinary tensor."""
    with sampling_autocast(model, text.device), torch.inference_mode():
        tokens = _sample_tokens(model, text, temperature, top_k, top_p, guidance, generator, prime, cache, progress)
    return tokens.clone()  # outside inference mode: a tensor callers may change in place


def _sample_tokens(model, text, temperature, top_k, top_p, guidance, generator, prime, cache, progress) -> torch.Tensor:
    cfg = model.cfg
    n = cfg.image_size**2
    if not MIN_TEMPERATURE <= temperature < math.inf:
        raise ValueError(f"temperature must be finite and >= {MIN_TEMPERATURE}, got {temperature}")
    if not 1 <= guidance < math.inf:
        raise ValueError(f"guidance must be finite and >= 1 (1: none), got {guidance}")
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
        kv, logits = model.prefill(seq_text, seq_image, start)
    for j in range(start, n):
        if not cache:
            logits = model.image_logits(model.hidden(seq_text, seq_image)[:, cfg.text_len - 1 + j])  # (B', vocab)
        elif j > start:
            logits = model.decode_step(kv, seq_image[:, j - 1])
        if guided:
            cond, uncond = logits.float().chunk(2)
            logits = uncond + guidance * (cond - uncond)
        probs = filter_logits(logits / temperature, top_k, top_p).softmax(-1)
        token = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        seq_image[:, j] = token.repeat(2) if guided else token
        if progress is not None:
            progress(j + 1 - start, n - start)
    return seq_image[:B]


def sampling_device(name: str, model: DALLE, cache: bool = True) -> torch.device:
    """The device to sample `model` on, by the one device policy (dalle_fast.ops.device): a dense model
    without the cache runs on any GPU; otherwise the GPU needs this build's kernels (the decode op, the
    sparse attention) and, for sparse attention, a head dim they cover."""
    if model.cfg.attention == "dense" and not cache:  # torch's own attention only
        return choose_device(name)
    head_dim = model.cfg.head_dim if model.cfg.attention != "dense" else None
    return choose_device(name, kernels=True, head_dim=head_dim)


def check_captions(captions: list[str], tok) -> torch.Tensor:
    """BPE ids (C, text_len); ValueError for an empty caption, a one-line warning for a truncated one and
    for one with words the tokenizer never saw in training."""
    if not captions:
        raise ValueError("no caption given")
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
        unseen = tok.unseen_words(c)
        if unseen:
            print(
                f"warning: caption {i + 1} has words no training caption had: {', '.join(map(repr, unseen))} "
                "(the model knows them only as pieces of other words: expect them to be ignored)",
                file=sys.stderr,
            )
    return torch.stack(rows)


def load_prime(path: str | Path | BinaryIO, dvae, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(the first rows * grid image tokens of the image at path, its full dVAE reconstruction (3, H, W)).
    path may also be an open binary file (an upload); errors then speak of "the uploaded file"."""
    W = dvae.cfg.grid
    if not 1 <= rows <= W:
        raise FieldError("prime_rows", f"must be in [1, {W}] (the token grid is {W}x{W}), got {rows}")
    name = path if isinstance(path, (str, Path)) else "the uploaded file"
    try:
        with Image.open(path) as img:
            img.load()
            x = preprocess(img, dvae.cfg.image_size)
    except FileNotFoundError as e:
        raise FieldError("prime", f"{name} does not exist") from e
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as e:
        raise FieldError("prime", f"{name} is not a readable image ({type(e).__name__})") from e
    codes = dvae.encode(x[None])  # (1, W, W)
    return codes[0, :rows].flatten(), dvae.decode(codes)[0]


def _batch_progress(progress: Progress, before: int, rows: int, total: int) -> Progress:
    """A batch's progress (positions of one sequence) as image tokens of every draw: `before` done in the
    batches before it, `rows` sequences in it."""
    return lambda j, _: progress(before + j * rows, total)


@torch.no_grad()
def generate(
    model: DALLE,
    text: torch.Tensor,
    dvae,
    *,
    draws: int,
    keep: int | None = None,
    scorer: Scorer | None = None,
    captions: list[str] | None = None,
    prime: torch.Tensor | None = None,
    batch_size: int = 64,
    generator: torch.Generator | None = None,
    cache: bool = True,
    progress: Progress | None = None,
    **sampling,
) -> dict[str, torch.Tensor]:
    """`draws` samples for each caption of text (C, text_len), in batches; with a scorer
    (`dalle_fast.sampling.rerank.Scorer`) and the captions as strings, the `keep` best of each caption's draws, best
    first (the paper's reranking), else the first `keep`.

    Returns tokens (C, keep, grid**2), images (C, keep, 3, H, W) and scores (C, keep) (NaN without a
    scorer). prime: (P,) image tokens every sample starts with. progress(done, total) counts the image
    tokens of every draw (C * draws * the positions left after the prime), batch after batch."""
    keep = draws if keep is None else keep
    C, W = text.shape[0], model.cfg.image_size
    device = next(model.parameters()).device
    rows = text.repeat_interleave(draws, dim=0)  # caption c's draws are rows c * draws ...
    tokens, images = [], []
    per_row = W * W - (0 if prime is None else prime.numel())
    for i in range(0, len(rows), batch_size):
        t = rows[i : i + batch_size].to(device)
        p = None if prime is None else prime.to(device).expand(len(t), -1)
        step = None if progress is None else _batch_progress(progress, i * per_row, len(t), len(rows) * per_row)
        tok = sample_tokens(model, t, generator=generator, prime=p, cache=cache, progress=step, **sampling).cpu()
        tokens.append(tok)
        images.append(dvae.decode(tok.view(-1, W, W)))
    tokens = torch.cat(tokens).view(C, draws, -1)
    images = torch.cat(images)
    if scorer is None:
        scores = torch.full((C, draws), float("nan"))
        order = torch.arange(keep).expand(C, keep)
    else:
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
