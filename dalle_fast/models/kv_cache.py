"""The key/value cache of sampling: every attention layer's keys and values, in the layer's kernel order.

`DALLE.prefill` fills it from the prompt (text plus any primed image tokens); `DALLE.decode_step` then
feeds one image token at a time, whose query meets only the cached keys its layer's mask allows at its
image position p:

  text     every text position (image queries see all of the text, pad tokens included)
  causal   image positions 0..p
  row      image positions p - image_size .. p (the previous image_size + 1 tokens)
  column   p, p - W, p - 2W, ... (the same column, rows up to its own)
  conv     p - (dr * W + dc) for the kernel offsets dr * W + dc >= 0 (ops.masks.attention_mask's rule)

Each layer's cache is in its kernel order, as the full forward pass produces it: raster order, except
for column layers, whose image states are transposed (token (r, c) at text_len + c * W + r), where the
column's keys are one contiguous run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class KVCache:
    """Every layer's keys and values, (B, n_heads, seq_len, head_dim) in the layer's kernel order (see
    above), valid for the first `length` tokens of the sequence (exclusive)."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    length: int
    layers: list | None = None  # transformer.DecodeLayer per layer, made by the first decode step


def kernel_position(kind: str, text_len: int, image_size: int, t: int) -> int:
    """Where sequence position t sits in a `kind` layer's kernel order (transposed image states for column)."""
    p = t - text_len
    if kind != "column" or p < 0:
        return t
    return text_len + (p % image_size) * image_size + p // image_size
