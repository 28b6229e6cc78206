"""Stage 2: the DALL-E transformer (Section 2.2, Appendix B).

A decoder-only transformer over one stream of `text_len` BPE text tokens followed by `image_size**2`
dVAE image tokens (raster order). Position t predicts token t + 1, so the last text position predicts
the first image token and the stream needs no extra start token.

- Text: unused text slots (PAD, -1) become a learned padding token of their own position (the paper's
  256 per-position pad tokens), so there is no attention masking of padding. They live at the end of the
  text vocabulary: pad of position i has id text_vocab + i, and the text head predicts them too.
- Image: token embedding + a broadcast row embedding + a broadcast column embedding.
- Layers: pre-norm resblocks, each layer an attention resblock then an MLP resblock (so 2 * n_layers
  resblocks: 128 in the paper, one gradient scale each). Layer i's attention uses the mask
  `ops.masks.layer_kinds(n_layers)[i]` through `dalle_fast.block_sparse_attention`; column layers transpose
  the image states before their qkv projection and back after their output projection (the projections
  act per token, so this equals transposing q, k and v, at a third of the copies).
- Logits in fp32; loss = 1/8 text cross-entropy + 7/8 image cross-entropy, each normalised by its own
  token count.

`attention` picks the attention path: "sparse" (the paper's schedule through the kernels), "causal"
(every layer dense causal, through the same kernels) or "dense" (PyTorch SDPA with is_causal=True, the
comparison baseline). "causal" and "dense" compute the same function.

Sampling runs through a key/value cache (`prefill`, then `decode_step` per image token): the prompt
runs once through the ordinary forward pass, each attention layer keeping its keys and values in a
`KVCache`; then each new token runs through the layers alone, and its attention is the decode op
(`sparse_attention_decode`), which reads only the cached keys its layer's mask allows.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from dalle_fast.models.kv_cache import KVCache, kernel_position
from dalle_fast.models.tokens import PAD
from dalle_fast.ops.attention import (
    block_sparse_attention,
    sparse_attention_decode,
    sparse_attention_decode_op,
    to_column_order,
)
from dalle_fast.ops.masks import check_mask_args, layer_kinds

ATTENTION_MODES = ("sparse", "causal", "dense")


@dataclass
class TransformerConfig:
    text_vocab: int = 16384  # BPE vocabulary size (the text_len pad tokens come on top)
    text_len: int = 256  # text positions (captions are truncated or padded to this)
    image_vocab: int = 8192  # dVAE codebook size
    image_size: int = 32  # side of the image token grid
    n_layers: int = 64  # transformer layers (each: an attention and an MLP resblock)
    d_model: int = 3968  # width of the residual stream
    n_heads: int = 62  # attention heads
    head_dim: int = 64  # width of one head (n_heads * head_dim need not equal d_model)
    mlp_ratio: int = 4  # MLP hidden width = mlp_ratio * d_model
    kernel_size: int = 11  # side of the conv mask's kernel (last layer)
    attention: str = "sparse"  # sparse | causal | dense (see the module docstring)
    dropout: float = 0.0  # dropout on attention and MLP outputs (the paper's model: none reported)
    checkpoint: bool = False  # recompute each resblock in backward instead of storing its activations

    def __post_init__(self):
        for name in ("text_vocab", "text_len", "image_vocab", "image_size", "n_layers", "d_model", "n_heads"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an int >= 1, got {getattr(self, name)!r}")
        if not isinstance(self.head_dim, int) or not 1 <= self.head_dim <= 256:
            raise ValueError(f"head_dim must be an int in [1, 256], got {self.head_dim!r}")
        if self.attention not in ATTENTION_MODES:
            raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {self.attention!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        check_mask_args("conv", self.text_len, self.image_size, self.kernel_size)

    @property
    def seq_len(self) -> int:
        return self.text_len + self.image_size**2

    def layer_kinds(self) -> list[str]:
        """The mask kind of each layer's attention ("causal" everywhere unless attention == "sparse")."""
        if self.attention == "sparse":
            return layer_kinds(self.n_layers)
        return ["causal"] * self.n_layers


PRESETS = {
    # The paper's 12B model (256 text + 32x32 image tokens); build it on the meta device to inspect it.
    "paper": TransformerConfig(),
    # Long sequences at moderate width: where the sparse masks pay off end to end.
    "long": TransformerConfig(text_vocab=16384, text_len=256, image_vocab=8192, image_size=32, n_layers=8,
                              d_model=256, n_heads=4, head_dim=64),
    # The paper's layout at a width a few CPU processes can train (distributed tests and benchmarks).
    "small": TransformerConfig(text_vocab=4096, text_len=64, image_vocab=1024, image_size=16, n_layers=8,
                               d_model=512, n_heads=8, head_dim=64),
    # The CPU default for the built-in shapes data (8x8 image tokens from the tiny dVAE).
    "tiny": TransformerConfig(text_vocab=512, text_len=20, image_vocab=64, image_size=8, n_layers=6,
                              d_model=192, n_heads=6, head_dim=32),
    # For tests: seconds per step.
    "micro": TransformerConfig(text_vocab=300, text_len=8, image_vocab=16, image_size=4, n_layers=2,
                               d_model=32, n_heads=2, head_dim=16),
}  # fmt: skip


def preset(name: str, **overrides) -> TransformerConfig:
    """A preset by name, with fields replaced (e.g. the vocabularies and grid the data dictates)."""
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {name!r}")
    return dataclasses.replace(PRESETS[name], **overrides)


class Residual(nn.Module):
    """x + branch(x). `dalle_fast.training.amp.ScaledResidual` has the same `branch` attribute, so swapping one
    for the other (DALLE.use_resblock_scaler) keeps the state-dict names."""

    def __init__(self, branch: nn.Module):
        super().__init__()
        self.branch = branch

    def forward(self, x: torch.Tensor, **cache) -> torch.Tensor:
        return x + self.branch(x, **cache)


class Attention(nn.Module):
    """Pre-norm attention branch under one mask kind."""

    def __init__(self, cfg: TransformerConfig, kind: str):
        super().__init__()
        self.cfg, self.kind = cfg, kind
        inner = cfg.n_heads * cfg.head_dim
        self.norm = nn.LayerNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * inner)
        self.proj = nn.Linear(inner, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        """x (B, N, d): the whole sequence; with a cache (the prefill), its keys and values go to
        cache.k/v[layer]. (A decode step's one token runs through decode_layer instead.)"""
        cfg = self.cfg
        B, N, _ = x.shape
        h = self.norm(x)
        if self.kind == "column":
            h = to_column_order(h, cfg.text_len, cfg.image_size)  # image states transposed: mask (c)
        qkv = self.qkv(h).view(B, N, 3, cfg.n_heads, cfg.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).contiguous().unbind(0)  # each (B, nh, N, hs)
        if cache is not None:  # in the layer's kernel order, as decoding reads them
            cache.k[layer], cache.v[layer] = k, v
        if cfg.attention == "dense":
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            if q.device.type == "cuda" and q.dtype == torch.float32:
                raise ValueError(
                    "the CUDA sparse-attention kernels take fp16 or bf16: run the model under "
                    "torch.autocast('cuda', dtype=torch.bfloat16) (or float16), or build it with attention='dense'"
                )
            o = block_sparse_attention(q, k, v, self.kind, cfg.text_len, cfg.image_size, cfg.kernel_size)
        o = self.proj(o.transpose(1, 2).reshape(B, N, -1))  # (B, N, d)
        if self.kind == "column":
            o = to_column_order(o, cfg.text_len, cfg.image_size)
        return self.drop(o)


class MLP(nn.Module):
    """Pre-norm MLP branch."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.norm = nn.LayerNorm(cfg.d_model)
        self.fc = nn.Linear(cfg.d_model, cfg.mlp_ratio * cfg.d_model)
        self.proj = nn.Linear(cfg.mlp_ratio * cfg.d_model, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(F.gelu(self.fc(self.norm(x)))))


class Layer(nn.Module):
    def __init__(self, cfg: TransformerConfig, kind: str):
        super().__init__()
        self.kind = kind
        self.checkpoint = cfg.checkpoint
        self.attn = Residual(Attention(cfg, kind))
        self.mlp = Residual(MLP(cfg))

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, index: int = 0) -> torch.Tensor:
        if cache is not None:  # the prefill: no gradients, so nothing to recompute
            return self.mlp(self.attn(x, cache=cache, layer=index))
        for block in (self.attn, self.mlp):
            if self.checkpoint and torch.is_grad_enabled():  # recompute the block in backward
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x


class DecodeLayer(NamedTuple):
    """One layer's tensors as a decode step reads them, fetched from the modules once per cache: at batch 1
    a step is bound by per-call overhead, and the modules' attribute lookups cost about as much as the
    arithmetic. The resblock wrappers drop out: they add nothing without gradients."""

    kind: str
    norm1: tuple  # (normalized_shape, weight, bias, eps) of the attention's layer norm
    qkv: tuple[torch.Tensor, torch.Tensor]  # (weight, bias)
    proj: tuple[torch.Tensor, torch.Tensor]
    norm2: tuple  # the MLP's layer norm
    fc: tuple[torch.Tensor, torch.Tensor]
    out: tuple[torch.Tensor, torch.Tensor]
    dropout: float  # of both branches' outputs: the config's while training, else 0

    @staticmethod
    def of(layer: Layer, training: bool) -> DecodeLayer:
        a, m = layer.attn.branch, layer.mlp.branch
        norm = lambda n: (n.normalized_shape, n.weight, n.bias, n.eps)  # noqa: E731
        return DecodeLayer(
            a.kind, norm(a.norm), (a.qkv.weight, a.qkv.bias), (a.proj.weight, a.proj.bias), norm(m.norm),
            (m.fc.weight, m.fc.bias), (m.proj.weight, m.proj.bias), a.drop.p if training else 0.0,
        )  # fmt: skip


def decode_layer(
    x: torch.Tensor, cache: KVCache, i: int, layer: DecodeLayer, cfg: TransformerConfig, checked: bool
) -> torch.Tensor:
    """Layer i for the one token per sequence x (B, d) at cache.length, as Layer.forward computes it: the
    token's key and value join the cache, its query meets the cached keys its mask allows (the decode op;
    attention arithmetic in fp32), then the MLP. checked: an earlier step of this cache checked the decode
    op's arguments (only the position moves, within the cache), so the op is called without them."""
    B = x.shape[0]
    h = F.layer_norm(x, *layer.norm1)
    q, k, v = F.linear(h, *layer.qkv).view(B, 3, cfg.n_heads, cfg.head_dim).unbind(1)
    at = kernel_position(layer.kind, cfg.text_len, cfg.image_size, cache.length)
    keys, values = cache.k[i], cache.v[i]
    keys.select(2, at).copy_(k)
    values.select(2, at).copy_(v)
    args = (q, keys, values, layer.kind, cfg.text_len, cfg.image_size, at, cfg.kernel_size)
    o = sparse_attention_decode_op(*args, cfg.head_dim**-0.5) if checked else sparse_attention_decode(*args)
    o = F.linear(o.reshape(B, -1), *layer.proj)
    x = x + (F.dropout(o, layer.dropout) if layer.dropout else o)
    h = F.gelu(F.linear(F.layer_norm(x, *layer.norm2), *layer.fc))
    o = F.linear(h, *layer.out)
    return x + (F.dropout(o, layer.dropout) if layer.dropout else o)


class DALLE(nn.Module):
    """The transformer. forward(text, image) -> (text_logits, image_logits); loss(text, image)."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        d, T, W = cfg.d_model, cfg.text_len, cfg.image_size
        self.text_emb = nn.Embedding(cfg.text_vocab + T, d)  # BPE tokens, then one pad token per position
        self.text_pos = nn.Embedding(T, d)
        self.image_emb = nn.Embedding(cfg.image_vocab, d)
        self.row_emb = nn.Embedding(W, d)
        self.col_emb = nn.Embedding(W, d)
        self.layers = nn.ModuleList(Layer(cfg, kind) for kind in cfg.layer_kinds())
        self.norm = nn.LayerNorm(d)
        self.text_head = nn.Linear(d, cfg.text_vocab + T, bias=False)
        self.image_head = nn.Linear(d, cfg.image_vocab, bias=False)
        self.register_buffer("_positions", torch.arange(max(T, W * W)), persistent=False)
        self.apply(self._init)
        # GPT-2's init: the projections into the residual stream shrink with depth.
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.n_layers))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ---- inputs ---------------------------------------------------------------------------------------

    def check_tokens(self, text: torch.Tensor, image: torch.Tensor | None = None, image_len: int | None = None):
        """ValueError naming the argument for token tensors the model cannot take."""
        cfg = self.cfg
        if not isinstance(text, torch.Tensor) or text.dtype != torch.long or text.dim() != 2:
            raise ValueError(f"text must be a LongTensor [batch, text_len], got {_describe(text)}")
        if text.shape[1] != cfg.text_len:
            raise ValueError(f"text.shape[1] must be text_len={cfg.text_len}, got {text.shape[1]}")
        if image is not None:
            n = cfg.image_size**2 if image_len is None else image_len
            if not isinstance(image, torch.Tensor) or image.dtype != torch.long or image.dim() != 2:
                raise ValueError(f"image must be a LongTensor [batch, image_size**2], got {_describe(image)}")
            if image.shape != (text.shape[0], n):
                raise ValueError(f"image must have shape ({text.shape[0]}, {n}), got {tuple(image.shape)}")
        if torch.compiler.is_compiling():  # the id ranges depend on the data: eager mode only
            return
        # Both ranges in one host read (on a GPU, one synchronisation per call rather than four).
        flags = [torch.zeros((), dtype=torch.bool, device=text.device)] * 2
        if text.numel():
            flags[0] = (text.min() < PAD) | (text.max() >= cfg.text_vocab)
        if image is not None and image.numel():
            flags[1] = (image.min() < 0) | (image.max() >= cfg.image_vocab)
        bad_text, bad_image = torch.stack(flags).tolist()
        if bad_text:
            raise ValueError(f"text ids must be in [0, {cfg.text_vocab}) or PAD ({PAD})")
        if bad_image:
            raise ValueError(f"image ids must be in [0, {cfg.image_vocab})")

    def text_ids(self, text: torch.Tensor) -> torch.Tensor:
        """PAD slots -> the pad token of their position (ids text_vocab + position)."""
        pad_ids = self.cfg.text_vocab + self._positions[: self.cfg.text_len]
        return torch.where(text == PAD, pad_ids, text)

    def embed(self, text: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """[text ; image] token ids -> (B, N, d) input states."""
        W = self.cfg.image_size
        pos = self._positions[: W * W]
        t = self.text_emb(self.text_ids(text)) + self.text_pos(self._positions[: self.cfg.text_len])
        i = self.image_emb(image) + self.row_emb(pos // W) + self.col_emb(pos % W)
        return torch.cat([t, i], dim=1)

    # ---- the model ------------------------------------------------------------------------------------

    def hidden(self, text: torch.Tensor, image: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """The last layer's states (B, N, d); with a cache, every layer's keys and values go into it."""
        x = self.embed(text, image)
        for i, layer in enumerate(self.layers):
            x = layer(x, cache, i) if cache is not None else layer(x)
        return x

    def _head(self, h: torch.Tensor, head: nn.Linear) -> torch.Tensor:
        with torch.autocast(h.device.type, enabled=False):  # logits in fp32
            return head(self.norm(h.float()))

    def logits(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 logits from hidden states: text (B, T - 1, text_vocab + T) predicting text[1:], image
        (B, W*W, image_vocab) predicting every image token."""
        T = self.cfg.text_len
        return self._head(h[:, : T - 1], self.text_head), self._head(h[:, T - 1 : -1], self.image_head)

    def image_logits(self, h: torch.Tensor) -> torch.Tensor:
        """fp32 image logits from the hidden states of any positions (..., d) (position t predicts image
        token t - text_len + 1)."""
        return self._head(h, self.image_head)

    def forward(self, text: torch.Tensor, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.check_tokens(text, image)
        return self.logits(self.hidden(text, image))

    def loss(self, text: torch.Tensor, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """{"loss", "text", "image"}: 1/8 text + 7/8 image cross-entropy, each a mean over its tokens."""
        text_logits, image_logits = self(text, image)
        lt = F.cross_entropy(text_logits.flatten(0, 1), self.text_ids(text)[:, 1:].flatten())
        li = F.cross_entropy(image_logits.flatten(0, 1), image.flatten())
        return {"loss": lt / 8 + li * 7 / 8, "text": lt.detach(), "image": li.detach()}

    # ---- sampling through a key/value cache --------------------------------------------------------

    @torch.no_grad()
    def prefill(self, text: torch.Tensor, image: torch.Tensor, start: int) -> tuple[KVCache, torch.Tensor]:
        """Runs [text ; image] through the forward pass once and keeps every layer's keys and values.

        Only the first text_len + start positions are meaningful (image[:, :start] are the given tokens;
        the rest may be anything: causality keeps them out of the earlier positions). Returns the cache
        and the fp32 logits (B, image_vocab) of image token `start`."""
        cfg = self.cfg
        if not 0 <= start < cfg.image_size**2:
            raise ValueError(f"start must be in [0, {cfg.image_size**2}), got {start}")
        self.check_tokens(text, image)
        cache = KVCache([None] * cfg.n_layers, [None] * cfg.n_layers, cfg.text_len + start)
        h = self.hidden(text, image, cache)
        return cache, self.image_logits(h[:, cfg.text_len - 1 + start])

    @torch.no_grad()
    def decode_step(self, cache: KVCache, token: torch.Tensor) -> torch.Tensor:
        """Feeds image token `token` (B,) at the cache's next position; returns the fp32 logits (B,
        image_vocab) of the image token after it. The new keys and values go into the cache."""
        cfg = self.cfg
        t = cache.length
        p = t - cfg.text_len  # image position of the new token
        if not 0 <= p < cfg.image_size**2:
            raise ValueError(f"the cache is full or holds no text: next position {t}, seq_len {cfg.seq_len}")
        W = cfg.image_size
        # Rows of the position tables by Python index: no per-token host-to-device copy (which would wait
        # for the GPU and keep the host from queueing the next step's kernels).
        x = self.image_emb(token) + self.row_emb.weight[p // W] + self.col_emb.weight[p % W]  # (B, d)
        first = cache.layers is None
        if first:
            cache.layers = [DecodeLayer.of(layer, self.training) for layer in self.layers]
        for i, layer in enumerate(cache.layers):
            x = decode_layer(x, cache, i, layer, cfg, checked=not first)
        cache.length = t + 1
        return self.image_logits(x)

    @torch.no_grad()
    def cached_image_logits(self, text: torch.Tensor, image: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Teacher-forced image logits (B, image_size**2 - start, image_vocab) for tokens start.., computed
        through the cache (prefill of the first `start` tokens, then one decode step per token). Equal, to
        fp32 rounding, to self(text, image)[1][:, start:]: the test of the cache, and a debugging aid."""
        cache, logits = self.prefill(text, image, start)
        out = [logits]
        for j in range(start, self.cfg.image_size**2 - 1):
            out.append(self.decode_step(cache, image[:, j]))
        return torch.stack(out, dim=1)

    # ---- mixed precision ------------------------------------------------------------------------------

    def resblocks(self) -> list[Residual]:
        """Every resblock in order: layer 0's attention, layer 0's MLP, layer 1's attention, ..."""
        return [blk for layer in self.layers for blk in (layer.attn, layer.mlp)]

    def use_resblock_scaler(self, scaler) -> None:
        """Wraps every resblock with the scaler's per-resblock gradient scaling (dalle_fast.training.amp); the
        scaler needs num_blocks == 2 * n_layers. State-dict names stay the same."""
        if scaler.num_blocks != 2 * self.cfg.n_layers:
            raise ValueError(
                f"scaler.num_blocks must be 2 * n_layers = {2 * self.cfg.n_layers}, got {scaler.num_blocks}"
            )
        for i, layer in enumerate(self.layers):
            layer.attn = scaler.residual(layer.attn.branch, 2 * i)
            layer.mlp = scaler.residual(layer.mlp.branch, 2 * i + 1)


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"{x.dtype} tensor of shape {tuple(x.shape)}"
    return type(x).__name__
