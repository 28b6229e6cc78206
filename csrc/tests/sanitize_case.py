"""A small case of every CUDA kernel (attention forward in both warp layouts, dK/dV, dQ for every kind,
dtype and head dim, double-buffered and at head dim 128 single-buffered too; the decode kernels, one
block per row and several; the gradient-scaling kernels), for compute-sanitizer:
`compute-sanitizer --tool memcheck python csrc/tests/sanitize_case.py`.
Odd sizes on purpose (text length and grid off the 64-token blocks) so padding paths run, and three
blocks (181 tokens) so the double-buffered tile loads refill a buffer."""

import contextlib
import os

import torch

import dalle_fast


@contextlib.contextmanager
def env(name, value):
    """The variable set for the block (the kernels' launchers read it per call)."""
    os.environ[name] = value
    try:
        yield
    finally:
        del os.environ[name]


def main():
    torch.manual_seed(0)
    T, W = 37, 12
    n = T + W * W
    for dtype in (torch.float16, torch.bfloat16):
        for d in dalle_fast._C.CUDA_HEAD_DIMS:  # every head dim the kernels are built for
            for kind in dalle_fast.MASK_KINDS:
                q, k, v = (torch.randn(1, 2, n, d, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
                out = dalle_fast.sparse_attention(q, k, v, kind, T, W)
                out.backward(torch.randn_like(out))
                if d == 128:  # the single-buffered backward of GPUs with 99 KiB per block
                    with env("DALLE_FAST_BWD_STAGES", "1"):
                        out = dalle_fast.sparse_attention(q, k, v, kind, T, W)
                        out.backward(torch.randn_like(out))
                if d <= 64:  # the forward's other warp layout (4 warps of 16 rows)
                    with env("DALLE_FAST_FWD_ROWS_PER_WARP", "16"):
                        dalle_fast.sparse_attention(q, k, v, kind, T, W)
    # Decode: one query row against a cache, every kind, fp32/fp16/bf16, head dims on and off 32.
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for d in (16, 64, 100):
            k, v = (torch.randn(2, 3, n, d, device="cuda", dtype=dtype) for _ in range(2))
            q = torch.randn(2, 3, d, device="cuda", dtype=dtype)
            for kind in dalle_fast.MASK_KINDS:
                for position in (0, T - 1, T, T + 40, n - 1):
                    dalle_fast.sparse_attention_decode(q, k, v, kind, T, W, position, 5)
    # Decode with several blocks sharing a row's keys (batch 1, one head; the causal row's 293 keys make 2
    # splits) and the merge kernel.
    W2 = 16
    for d in (64, 256):
        k, v = (torch.randn(1, 1, T + W2 * W2, d, device="cuda", dtype=torch.float16) for _ in range(2))
        q = torch.randn(1, 1, d, device="cuda", dtype=torch.float16)
        dalle_fast.sparse_attention_decode(q, k, v, "causal", T, W2, T + W2 * W2 - 1)
    # Per-resblock gradient scaling: boundary ops, multi-tensor unscale + check, scale update, AdamW.
    from torch import nn

    from dalle_fast.training.amp import BlockAdamW, ResblockGradScaler

    scaler = ResblockGradScaler(3, device="cuda")
    model = nn.Sequential(*[scaler.residual(nn.Linear(40, 40), i) for i in range(3)]).cuda()
    opt = BlockAdamW(scaler.param_groups(model), scaler)
    model(torch.randn(7, 40, device="cuda").half().float()).sum().backward()
    scaler.unscale_(opt)
    opt.step()
    scaler.update()
    torch.cuda.synchronize()
    print("sanitize case done")


if __name__ == "__main__":
    main()
