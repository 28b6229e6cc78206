"""A small case of every CUDA kernel (forward, dK/dV, dQ) for every kind, dtype and head dim, for
compute-sanitizer: `compute-sanitizer --tool memcheck python csrc/tests/sanitize_case.py`.
Odd sizes on purpose (text length and grid off the 64-token blocks) so padding paths run."""

import torch

import dalle_fast


def main():
    torch.manual_seed(0)
    T, W = 37, 9
    n = T + W * W
    for dtype in (torch.float16, torch.bfloat16):
        for d in (32, 64, 128):
            for kind in dalle_fast.MASK_KINDS:
                q, k, v = (torch.randn(1, 2, n, d, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
                out = dalle_fast.sparse_attention(q, k, v, kind, T, W)
                out.backward(torch.randn_like(out))
    torch.cuda.synchronize()
    print("sanitize case done")


if __name__ == "__main__":
    main()
