"""Key/value caching for sampling: one new image token per step, attending only to what its mask allows.

`sample_tokens` without a cache reruns the whole [text ; image] sequence for every image token. With
one, the prompt (text plus any primed image tokens) runs once through the ordinary forward pass, which
leaves every layer's keys and values in a `KVCache`; then each new token runs through the layers
alone, and its attention is the decode op (`dalle_fast.sparse_attention_decode`, CPU and CUDA kernels):
its query meets only the cached keys its layer's mask allows at its image position p,

  text     every text position (image queries see all of the text, pad tokens included)
  causal   image positions 0..p
  row      image positions p - image_size .. p (the previous image_size + 1 tokens)
  column   p, p - W, p - 2W, ... (the same column, rows up to its own)
  conv     p - (dr * W + dc) for the kernel offsets dr * W + dc >= 0 (masks.attention_mask's rule)

Each layer's cache is in its kernel order, as the full forward pass produces it: raster order, except
for column layers, whose image states are transposed (token (r, c) at text_len + c * W + r), where the
column's keys are one contiguous run. Norms, projections and MLPs are the model's own modules, so
decoding runs on any device and under autocast; attention arithmetic is fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dalle_fast.ops import sparse_attention_decode
from dalle_fast.transformer import DALLE


@dataclass
class KVCache:
    """Every layer's keys and values, (B, n_heads, seq_len, head_dim) in the layer's kernel order (see
    above), valid for the first `length` tokens of the sequence (exclusive)."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    length: int


def kernel_position(kind: str, text_len: int, image_size: int, t: int) -> int:
    """Where sequence position t sits in a `kind` layer's kernel order (transposed image states for column)."""
    p = t - text_len
    if kind != "column" or p < 0:
        return t
    return text_len + (p % image_size) * image_size + p // image_size


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
    for qkv in captured:  # each in its layer's kernel order (column layers project transposed states)
        qkv = qkv.view(qkv.shape[0], cfg.seq_len, 3, cfg.n_heads, cfg.head_dim)
        ks.append(qkv[:, :, 1].transpose(1, 2).contiguous())  # (B, nh, N, hs)
        vs.append(qkv[:, :, 2].transpose(1, 2).contiguous())
    cache = KVCache(ks, vs, cfg.text_len + start)
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
    # Rows of the position tables by Python index: no per-token host-to-device copy (which would wait
    # for the GPU and keep the host from queueing the next step's kernels).
    x = model.image_emb(token) + model.row_emb.weight[p // W] + model.col_emb.weight[p % W]  # (B, d)
    B = x.shape[0]
    for i, layer in enumerate(model.layers):
        attn = layer.attn.branch
        qkv = attn.qkv(attn.norm(x)).view(B, 3, cfg.n_heads, cfg.head_dim)
        q, k, v = qkv.unbind(1)  # each (B, nh, hs)
        at = kernel_position(layer.kind, cfg.text_len, W, t)
        cache.k[i][:, :, at] = k
        cache.v[i][:, :, at] = v
        o = sparse_attention_decode(q, cache.k[i], cache.v[i], layer.kind, cfg.text_len, W, at, cfg.kernel_size)
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
