"""What the attention benchmarks run: this op and its peers on the same inputs and mask."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dalle_fast import attention_mask, sparse_attention


@dataclass(frozen=True)
class Shape:
    name: str
    text_len: int
    image_size: int
    batch: int
    heads: int
    head_dim: int

    @property
    def seq_len(self) -> int:
        return self.text_len + self.image_size**2


PAPER = Shape("paper", 256, 32, 1, 8, 64)  # 256 text + 32x32 image tokens, head dim 64
SMALL = Shape("small", 64, 16, 2, 4, 64)
# The main job's stage 2 at --grid 16 --width 128 --dalle-batch 32: 20 text + 16x16 image tokens, 4 heads of
# 32 (run it with --dtype bf16, as the trainer's autocast does).
MAIN = Shape("main", 20, 16, 32, 4, 32)


def make_inputs(shape: Shape, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    dims = (shape.batch, shape.heads, shape.seq_len, shape.head_dim)
    q, k, v = (torch.randn(*dims, generator=g).to(device=device, dtype=dtype).requires_grad_() for _ in range(3))
    grad = torch.randn(*dims, generator=g).to(device=device, dtype=dtype)
    return q, k, v, grad


def flops(shape: Shape, kind: str, backward: bool) -> float:
    """FLOPs counted on the unmasked pairs only: 2 GEMMs forward, 5 more backward (x 2 per MAC)."""
    pairs = int(attention_mask(kind, shape.text_len, shape.image_size).sum())
    fwd = 4.0 * pairs * shape.head_dim * shape.batch * shape.heads
    return fwd * 3.5 if backward else fwd


def flex_mask_mod(kind: str, T: int, W: int, kernel_size: int = 11):
    """The DALL-E mask as a FlexAttention mask_mod (raster order for every kind)."""
    s = kernel_size // 2

    def mod(b, h, q, kv):
        causal = kv <= q
        text_key = kv < T
        p, r = q - T, kv - T
        if kind == "causal":
            return causal
        if kind == "row":
            return causal & (text_key | (p - r <= W))
        if kind == "column":
            return causal & (text_key | (p % W == r % W))
        o = p - r
        dr_lo = torch.where(o - s <= 0, 0, (o - s + W - 1) // W)
        dr_hi = torch.clamp((o + s) // W, max=s)
        return causal & (text_key | (dr_lo <= dr_hi))

    return mod


def make_impls(shape: Shape, kind: str, device: str, with_flex: bool = True):
    """name -> forward function of (q, k, v). Peers see exactly the same mask."""
    T, W = shape.text_len, shape.image_size
    mask = attention_mask(kind, T, W).to(device)
    impls = {
        "dalle_fast": lambda q, k, v: sparse_attention(q, k, v, kind, T, W),
        "sdpa_dense_causal": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        "sdpa_bool_mask": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
    }
    if with_flex:
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention

            n = shape.seq_len
            block_mask = create_block_mask(flex_mask_mod(kind, T, W), None, None, n, n, device=device)
            # A fresh compile per mask: otherwise each new mask_mod recompiles the same frame until
            # dynamo's recompile limit drops FlexAttention to its slow eager path.
            torch._dynamo.reset()
            compiled = torch.compile(flex_attention, dynamic=False)
            impls["flex_attention"] = lambda q, k, v: compiled(q, k, v, block_mask=block_mask)
        except Exception as e:  # older torch, or no compiler: report the peer as missing
            print(f"FlexAttention unavailable: {type(e).__name__}: {e}")
    return impls


def time_interleaved(fns: dict, warmup: int = 2, iters: int = 10, device: str = "cpu") -> dict:
    """Best time in ms of each fn, taking turns run by run so that every implementation sees the same
    machine conditions (on a shared machine, load that comes and goes otherwise lands on whoever runs then).
    A fn that raises is reported as None.

    On the CPU a run is one call, timed by the wall clock. On CUDA a run is `reps` calls queued back to
    back between two CUDA events (reps chosen from a warm-up call to fill about 2 ms, at most 50), divided
    by reps: the GPU's time per call, with Python's per-call overhead hidden behind the queued kernels as
    it is in a model, where the host runs ahead of the GPU."""
    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    live, reps = {}, {}
    for name, fn in fns.items():
        try:
            for _ in range(warmup):
                fn()
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            reps[name] = min(50, max(1, round(2e-3 / max(time.perf_counter() - t0, 1e-6)))) if cuda else 1
            live[name] = fn
        except Exception as e:  # a peer that cannot run this case
            print(f"{name}: {type(e).__name__}: {str(e)[:120]}")
    best = {name: float("inf") for name in live}
    for _ in range(iters):
        for name, fn in live.items():
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(reps[name]):
                    fn()
                end.record()
                end.synchronize()
                ms = start.elapsed_time(end) / reps[name]
            else:
                t0 = time.perf_counter()
                fn()
                ms = (time.perf_counter() - t0) * 1e3
            best[name] = min(best[name], ms)
    return {name: best.get(name) for name in fns}


def forward_fn(impl, q, k, v):
    # Detached inputs: inference mode for every peer (FlexAttention on CPU refuses inputs that require grad).
    q, k, v = (t.detach() for t in (q, k, v))

    def run():
        with torch.no_grad():
            impl(q, k, v)

    return run


def forward_backward_fn(impl, q, k, v, grad):
    def run():
        out = impl(q, k, v)
        torch.autograd.grad(out, (q, k, v), grad)

    return run
