"""ctest smoke test of the CMake-built op library: load it into torch and compare each kind with a
dense masked computation. Standalone on purpose (it must not import the dalle_fast package, whose own
copy of the library would register the same ops twice)."""

import sys

import torch


def dense_mask(kind, T, W, ks):
    n = T + W * W
    i = torch.arange(n).view(-1, 1)
    j = torch.arange(n).view(1, -1)
    p, q = i - T, j - T
    image = (p >= 0) & (q >= 0)
    if kind == "causal":
        ok = torch.ones(n, n, dtype=torch.bool)
    elif kind == "row":
        ok = p - q <= W
    elif kind == "column":  # the op takes transposed image states: a band [p - p % W, p]
        ok = q >= p - p % W
    else:
        s = ks // 2
        offsets = {dr * W + dc for dr in range(s + 1) for dc in range(-s, s + 1) if dr * W + dc >= 0}
        ok = torch.zeros(n, n, dtype=torch.bool)
        for o in offsets:
            ok |= p - q == o
    return (j <= i) & (~image | ok)


def main(path):
    torch.ops.load_library(path)
    torch.manual_seed(0)
    T, W, ks = 11, 6, 5
    n = T + W * W
    for kind in ("causal", "row", "column", "conv"):
        q, k, v = (torch.randn(2, 3, n, 16, dtype=torch.float64).float().requires_grad_() for _ in range(3))
        out, lse = torch.ops.dalle_fast.sparse_attention_fwd(q, k, v, kind, T, W, ks, 0.25)
        s = (q @ k.transpose(-1, -2) * 0.25).masked_fill(~dense_mask(kind, T, W, ks), float("-inf"))
        ref = s.softmax(-1) @ v
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(lse, s.logsumexp(-1), atol=2e-5, rtol=1e-4)
        g = torch.randn_like(out)
        got = torch.ops.dalle_fast.sparse_attention_bwd(g, q, k, v, out, lse, kind, T, W, ks, 0.25)
        want = torch.autograd.grad(ref, (q, k, v), g)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)
        print(f"{kind}: ok")


if __name__ == "__main__":
    main(sys.argv[1])
