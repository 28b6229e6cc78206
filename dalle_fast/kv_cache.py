"""Key/value caching for sampling: one new image token per step, attending only to what its mask allows.

`sample_tokens` without a cache reruns the whole [text ; image] sequence for every image token. With
one, the prompt (text plus any primed image tokens) runs once through the ordinary forward pass, which
leaves every layer's keys and values in a `KVCache`; then each new token runs through the layers
alone: its query meets only the cached keys its layer's mask allows at its image position p,

  text     every text position (image queries see all of the text, pad tokens included)
  causal   image positions 0..p
  row      image positions p - image_size .. p (the previous image_size + 1 tokens)
  column   p, p - W, p - 2W, ... (the same column, rows up to its own)
  conv     p - (dr * W + dc) for the kernel offsets dr * W + dc >= 0 (masks.attention_mask's rule)

gathered by index (never an N x N mask). The index sets are computed once per (kind, p) from the same
rules as `masks.attention_mask`. Column layers run on transposed image states in the full forward; the
qkv projection acts per token, so the cache simply keeps every layer's keys in raster order.

Everything is plain PyTorch on the model's own modules (norms, projections, MLPs), so it runs on any
device and under autocast; attention scores and softmax are computed in fp32.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from dalle_fast.masks import check_mask_args
from dalle_fast.ops import to_column_order
from dalle_fast.transformer import DALLE


@functools.lru_cache(maxsize=64)
def _key_index_cpu(kind: str, text_len: int, image_size: int, kernel_size: int) -> tuple[torch.Tensor, ...]:
    check_mask_args(kind, text_len, image_size, kernel_size)
    T, W = text_len, image_size
    text = list(range(T))
    out = []
    for p in range(W * W):
        if kind == "causal":
            image = range(p + 1)
        elif kind == "row":
            image = range(max(0, p - W), p + 1)
        elif kind == "column":
            image = range(p % W, p + 1, W)
        else:
            s = kernel_size // 2
            offsets = {dr * W + dc for dr in range(s + 1) for dc in range(-s, s + 1)}
            image = sorted(p - off for off in offsets if 0 <= off <= p)
        out.append(torch.tensor(text + [T + q for q in image], dtype=torch.long))
    return tuple(out)


def key_index(
    kind: str, text_len: int, image_size: int, kernel_size: int = 11, device: torch.device | str | None = None
) -> list[torch.Tensor]:
    """For each image position p, the sequence positions (sorted LongTensor) of the keys an image query
    at p may attend to under mask `kind`: row p - text_len... of `masks.attention_mask`, as indices."""
    return [t.to(device) for t in _key_index_cpu(kind, text_len, image_size, kernel_size)]


@dataclass
class KVCache:
    """Every layer's keys and values, (B, n_heads, seq_len, head_dim) in raster order, valid up to
    `length` (exclusive); `index[kind][p]`: the keys an image query at p gathers (see key_index)."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    index: dict[str, list[torch.Tensor]]
    length: int


@torch.no_grad()
def prefill(model: DALLE, text: torch.Tensor, image: torch.Tensor, start: int) -> tuple[KVCache, torch.Tensor]:
    """Runs [text ; image] through the ordinary forward pass once and keeps every layer's keys and values.

    Only the first text_len + start positions are meaningful (image[:, :start] are the given tokens; the
    rest may be anything: causality keeps them out of the earlier positions). Returns the cache and the
    fp32 logits (B, image_vocab) of image token `start`.
    """
    cfg = model.cfg
    n = cfg.image_size**2
    if not 0 <= start < n:
        raise ValueError(f"start must be in [0, {n}), got {start}")
    model.check_tokens(text, image)
    captured: list[torch.Tensor] = []
    hooks = [
        layer.attn.branch.qkv.register_forward_hook(lambda _m, _i, out: captured.append(out)) for layer in model.layers
    ]
    try:
        h = model.hidden(text, image)
    finally:
        for hook in hooks:
            hook.remove()
    ks, vs = [], []
    for layer, qkv in zip(model.layers, captured, strict=True):
        if layer.kind == "column":  # the column branch projects transposed image states
            qkv = to_column_order(qkv, cfg.text_len, cfg.image_size)
        qkv = qkv.view(qkv.shape[0], cfg.seq_len, 3, cfg.n_heads, cfg.head_dim)
        ks.append(qkv[:, :, 1].transpose(1, 2).contiguous())  # (B, nh, N, hs)
        vs.append(qkv[:, :, 2].transpose(1, 2).contiguous())
    index = {
        kind: key_index(kind, cfg.text_len, cfg.image_size, cfg.kernel_size, text.device)
        for kind in {layer.kind for layer in model.layers}
    }
    cache = KVCache(ks, vs, index, cfg.text_len + start)
    return cache, model.image_logits(h[:, cfg.text_len - 1 + start])


@torch.no_grad()
def decode_step(model: DALLE, cache: KVCache, token: torch.Tensor) -> torch.Tensor:
    """Feeds image token `token` (B,) at the cache's next position; returns the fp32 logits (B,
    image_vocab) of the image token after it. The new keys and values go into the cache."""
    cfg = model.cfg
    t = cache.length
    p = t - cfg.text_len  # image position of the new token
    if not 0 <= p < cfg.image_size**2:
        raise ValueError(f"the cache is full or holds no text: next position {t}, seq_len {cfg.seq_len}")
    W = cfg.image_size
    pos = torch.tensor([p], device=token.device)
    x = model.image_emb(token) + model.row_emb(pos // W) + model.col_emb(pos % W)  # (B, d)
    B = x.shape[0]
    scale = cfg.head_dim**-0.5
    for i, layer in enumerate(model.layers):
        attn = layer.attn.branch
        qkv = attn.qkv(attn.norm(x)).view(B, 3, cfg.n_heads, cfg.head_dim)
        q, k, v = qkv.unbind(1)  # each (B, nh, hs)
        cache.k[i][:, :, t] = k
        cache.v[i][:, :, t] = v
        idx = cache.index[layer.kind][p]
        keys = cache.k[i].index_select(2, idx).float()  # (B, nh, L, hs)
        vals = cache.v[i].index_select(2, idx).float()
        w = ((keys @ q.float().unsqueeze(-1)).squeeze(-1) * scale).softmax(-1)  # (B, nh, L)
        o = (w.unsqueeze(-2) @ vals).squeeze(-2).to(q.dtype)  # (B, nh, hs)
        x = x + attn.drop(attn.proj(o.reshape(B, -1)))
        x = layer.mlp(x)
    cache.length = t + 1
    return model.image_logits(x)


@torch.no_grad()
def cached_image_logits(model: DALLE, text: torch.Tensor, image: torch.Tensor, start: int = 0) -> torch.Tensor:
    """Teacher-forced image logits (B, image_size**2 - start, image_vocab) for tokens start.., computed
    through the cache (prefill of the first `start` tokens, then one decode step per token). Equal, to
    fp32 rounding, to model(text, image)[1][:, start:]: the test of the cache, and a debugging aid."""
    cache, logits = prefill(model, text, image, start)
    out = [logits]
    for j in range(start, model.cfg.image_size**2 - 1):
        out.append(decode_step(model, cache, image[:, j]))
    return torch.stack(out, dim=1)
