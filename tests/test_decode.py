"""dalle_fast.sparse_attention_decode (one query row against a key/value cache) against the full sparse
attention and the dense reference: values for every position and kind, gradients, opcheck, compile, bad
input. CUDA cases skip cleanly where no GPU (or no CUDA kernel) is present."""

import pytest
import torch
from test_sparse_attention import CUDA_ONLY, DEVICES, max_err

from dalle_fast import MASK_KINDS, block_sparse_attention, sparse_attention_decode
from dalle_fast.ops.attention import sparse_attention_decode_reference
from dalle_fast.ops.masks import allowed_keys, attention_mask

# (text_len, image_size): no text, odd text lengths, grids of 4 to 9 (conv kernel 11 and 5).
SHAPES = [(6, 4), (0, 5), (37, 7), (1, 9)]


def make_cache(T, W, dtype=torch.float32, device="cpu", batch=2, heads=3, head_dim=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = T + W * W
    k, v = (torch.randn(batch, heads, n, head_dim, generator=g).to(device=device, dtype=dtype) for _ in range(2))
    q = torch.randn(batch, heads, n, head_dim, generator=g).to(device=device, dtype=dtype)
    return q, k, v


@pytest.mark.parametrize("kind", MASK_KINDS)
def test_allowed_keys_are_the_mask_row(kind):
    T, W, ks = 5, 4, 3
    mask = attention_mask(kind, T, W, ks, transposed=kind == "column")
    for i in range(T + W * W):
        assert list(allowed_keys(kind, T, W, ks, i)) == mask[i].nonzero().squeeze(1).tolist(), i


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T,W", SHAPES)
@pytest.mark.parametrize("kind", MASK_KINDS)
def test_every_row_equals_the_full_attention(kind, T, W, dtype, device):
    """Row i of the decode op is row i of block_sparse_attention on the whole sequence (kernel order),
    for every i; low precision within twice the error of plain PyTorch in that precision."""
    ks = 5 if W > 6 else 11
    q, k, v = make_cache(T, W, dtype, device)
    ref = sparse_attention_decode_reference
    full = block_sparse_attention(q.float().cpu(), k.float().cpu(), v.float().cpu(), kind, T, W, ks)
    for i in range(T + W * W):
        got = sparse_attention_decode(q[:, :, i], k, v, kind, T, W, i, ks)
        assert got.dtype == dtype and got.shape == q[:, :, i].shape
        want = full[:, :, i]
        if dtype == torch.float32:
            torch.testing.assert_close(got.cpu(), want, atol=2e-5, rtol=2e-4, msg=lambda m, i=i: f"row {i}: {m}")
            torch.testing.assert_close(ref(q[:, :, i], k, v, kind, T, W, i, ks).cpu(), want, atol=2e-5, rtol=2e-4)
        else:
            # plain PyTorch in the low precision: the reference's arithmetic without the fp32 upcast
            mask = attention_mask(kind, T, W, ks, transposed=kind == "column")[i].to(device)
            s = (k @ q[:, :, i].unsqueeze(-1)).squeeze(-1) * q.shape[-1] ** -0.5
            plain = (s.masked_fill(~mask, float("-inf")).softmax(-1).unsqueeze(-2) @ v).squeeze(-2)
            assert max_err(got.cpu(), want) <= 2 * max_err(plain.cpu(), want) + 1e-5, i


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", MASK_KINDS)
def test_reads_only_the_allowed_keys(kind, device):
    """Every cache entry the row may not see is NaN or infinite: the output and its gradients must not
    change (masked work is skipped, not multiplied by zero), which also means entries after the query are
    never read; the reference follows the same rule."""
    T, W, ks = 6, 5, 3
    q, k, v = make_cache(T, W, torch.float16 if device == "cuda" else torch.float32, device)
    grad = torch.randn_like(q[:, :, 0])
    nonfinite = (float("nan"), float("inf"), float("-inf"), float("nan"))
    for i, value in zip((T - 1, T, T + 7, T + W * W - 1), nonfinite, strict=True):
        keep = torch.tensor(allowed_keys(kind, T, W, ks, i), device=device)
        hidden = torch.ones(T + W * W, dtype=torch.bool, device=device)
        hidden[keep] = False
        kn, vn = k.clone(), v.clone()
        kn[:, :, hidden] = value
        vn[:, :, hidden] = -value
        for fn in (sparse_attention_decode, sparse_attention_decode_reference):
            results = []
            for kc, vc in ((k, v), (kn, vn)):
                xs = [x.clone().requires_grad_() for x in (q[:, :, i], kc, vc)]
                out = fn(*xs, kind, T, W, i, ks)
                results.append((out, *torch.autograd.grad(out, xs, grad)))
            for name, a, b in zip(("out", "dq", "dk", "dv"), *results, strict=True):
                assert torch.equal(a, b), f"{fn.__name__} {name}, row {i}, {value}"


@pytest.mark.parametrize("_", [pytest.param(None, marks=CUDA_ONLY)])
@pytest.mark.parametrize("head_dim", [64, 256])
@pytest.mark.parametrize("kind", MASK_KINDS)
def test_cuda_key_splits_agree(_, kind, head_dim, monkeypatch):
    """The paper's shape at batch 1: several blocks share a row's keys (flash-decoding) and a second kernel
    merges them. Split and unsplit (DALLE_FAST_DECODE_SMS=1) results both meet the fp32 reference, and
    the NaN-hidden keys stay unread."""
    T, W = 256, 32
    q, k, v = make_cache(T, W, torch.float16, "cuda", batch=1, heads=2, head_dim=head_dim)
    # 2 rows on 132 SMs: as many splits as 128 keys each allow (the 256 text keys alone make 2), so the
    # merge kernel runs (seen by the profiler, when it records kernels at all).
    monkeypatch.setenv("DALLE_FAST_DECODE_SMS", "132")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        sparse_attention_decode(q[:, :, -1], k, v, kind, T, W, T + W * W - 1)
        torch.cuda.synchronize()
    names = [e.name for e in prof.events()]
    if any("decode_kernel" in name for name in names):
        assert any("decode_merge_kernel" in name for name in names), names
    for i in (T + 40, T + W * W // 2, T + W * W - 1):
        want = sparse_attention_decode_reference(q[:, :, i].float(), k.float(), v.float(), kind, T, W, i)
        hidden = torch.ones(T + W * W, dtype=torch.bool, device="cuda")
        hidden[torch.tensor(allowed_keys(kind, T, W, 11, i), device="cuda")] = False
        kn, vn = k.clone(), v.clone()
        kn[:, :, hidden] = float("nan")
        vn[:, :, hidden] = float("nan")
        results = []
        for sms in ("1", "132"):
            monkeypatch.setenv("DALLE_FAST_DECODE_SMS", sms)
            results.append(sparse_attention_decode(q[:, :, i], kn, vn, kind, T, W, i))
        for got in results:
            torch.testing.assert_close(got.float(), want, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("kind", MASK_KINDS)
def test_gradients_match_the_reference(kind):
    T, W, ks = 7, 5, 3
    q, k, v = (t.requires_grad_() for t in make_cache(T, W))
    for i in (3, T, T + 12, T + W * W - 1):
        grad = torch.randn(q.shape[0], q.shape[1], q.shape[3])
        got = torch.autograd.grad(sparse_attention_decode(q[:, :, i], k, v, kind, T, W, i, ks), (q, k, v), grad)
        want = torch.autograd.grad(
            sparse_attention_decode_reference(q[:, :, i], k, v, kind, T, W, i, ks), (q, k, v), grad
        )
        for name, a, b in zip(("dq", "dk", "dv"), got, want, strict=True):
            torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-4, msg=lambda m, n=name, i=i: f"{n} row {i}: {m}")
        assert got[1].abs().sum() > 0  # the check has teeth


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", MASK_KINDS)
def test_opcheck(kind, device):
    T, W = 5, 4
    dtype = torch.float16 if device == "cuda" else torch.float32
    q, k, v = (t.requires_grad_() for t in make_cache(T, W, dtype, device, batch=1, heads=2))
    for i in (2, T + 9):
        args = (q[:, :, i].detach().requires_grad_(), k, v, kind, T, W, 3, 0.25, i)
        torch.library.opcheck(torch.ops.dalle_fast.sparse_attention_decode.default, args)


@pytest.mark.parametrize("device", DEVICES)
def test_head_dims_scale_and_kernel_sizes(device):
    for head_dim in (1, 16, 24, 64, 100, 128, 256):
        q, k, v = make_cache(9, 6, head_dim=head_dim, batch=1, heads=2, device=device)
        for i in (4, 9 + 20):
            got = sparse_attention_decode(q[:, :, i], k, v, "conv", 9, 6, i, 5, scale=0.3)
            want = sparse_attention_decode_reference(q[:, :, i], k, v, "conv", 9, 6, i, 5, scale=0.3)
            torch.testing.assert_close(got.cpu(), want.cpu(), atol=2e-5, rtol=2e-4)
    # A conv kernel wider than the grid (every row of the image's past in reach) and a huge one.
    q, k, v = make_cache(3, 12, batch=1, heads=2, device=device)
    for ks in (25, 125):
        for i in (3 + 70, 3 + 143):
            got = sparse_attention_decode(q[:, :, i], k, v, "conv", 3, 12, i, ks)
            want = sparse_attention_decode_reference(q[:, :, i], k, v, "conv", 3, 12, i, ks)
            torch.testing.assert_close(got.cpu(), want.cpu(), atol=2e-5, rtol=2e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_cache_and_empty_batch(device):
    T, W = 6, 4
    k, v = (torch.randn(2, T + W * W, 3, 16, device=device).transpose(1, 2) for _ in range(2))  # [B, H, N, D] views
    q = torch.randn(2, 16, 3, device=device).transpose(1, 2)
    assert not k.is_contiguous() and not q.is_contiguous()
    for kind in MASK_KINDS:
        torch.testing.assert_close(
            sparse_attention_decode(q, k, v, kind, T, W, T + 9),
            sparse_attention_decode_reference(q, k, v, kind, T, W, T + 9),
            atol=2e-5,
            rtol=1e-4,
        )
    e = torch.randn(0, 3, T + W * W, 16, device=device)
    assert sparse_attention_decode(e[:, :, 0], e, e, "row", T, W, 3).shape == (0, 3, 16)


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    T, W = 6, 4
    q, k, v = make_cache(T, W)

    def step(q, k, v):
        return sparse_attention_decode(q, k, v, "column", T, W, T + 5) * 2

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(q[:, :, T + 5], k, v), step(q[:, :, T + 5], k, v))


@pytest.mark.parametrize("device", DEVICES)
def test_deterministic(device):
    q, k, v = make_cache(37, 8, torch.bfloat16, device, head_dim=64)
    a = sparse_attention_decode(q[:, :, 70], k, v, "causal", 37, 8, 70)
    b = sparse_attention_decode(q[:, :, 70], k, v, "causal", 37, 8, 70)
    assert torch.equal(a, b)


# ---- bad input ------------------------------------------------------------------------------------

T0, W0 = 6, 4
N0 = T0 + W0 * W0


def _t(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, dtype=dtype, device=device)


BAD = [
    ("q rank", (_t(1, 2, N0, 8), _t(1, 2, N0, 8), _t(1, 2, N0, 8)), 3, "q must be 3-D"),
    ("k seq_len", (_t(1, 2, 8), _t(1, 2, N0 + 1, 8), _t(1, 2, N0 + 1, 8)), 3, "k must have shape"),
    ("v heads", (_t(1, 2, 8), _t(1, 2, N0, 8), _t(1, 3, N0, 8)), 3, "v must have shape"),
    ("dtype", (_t(1, 2, 8), _t(1, 2, N0, 8, dtype=torch.float16), _t(1, 2, N0, 8)), 3, "dtype"),
    ("float64", (_t(1, 2, 8, dtype=torch.float64),) + (_t(1, 2, N0, 8, dtype=torch.float64),) * 2, 3, "dtype"),
    ("position", (_t(1, 2, 8), _t(1, 2, N0, 8), _t(1, 2, N0, 8)), N0, "position"),
    ("negative position", (_t(1, 2, 8), _t(1, 2, N0, 8), _t(1, 2, N0, 8)), -1, "position"),
    ("head_dim", (_t(1, 2, 300), _t(1, 2, N0, 300), _t(1, 2, N0, 300)), 3, "head_dim"),
]


@pytest.mark.parametrize("name,qkv,position,match", BAD, ids=[b[0] for b in BAD])
def test_bad_input_names_the_argument(name, qkv, position, match):
    with pytest.raises(ValueError, match=match):
        sparse_attention_decode(*qkv, "row", T0, W0, position)


def test_raw_op_checks_its_arguments():
    q, k = _t(1, 2, 8), _t(1, 2, N0, 8)
    op = torch.ops.dalle_fast.sparse_attention_decode
    with pytest.raises(RuntimeError, match="position"):
        op(q, k, k, "row", T0, W0, 11, 1.0, N0)
    with pytest.raises(RuntimeError, match="seq_len"):
        op(q, k, k, "row", T0 + 1, W0, 11, 1.0, 3)
    with pytest.raises(RuntimeError, match="kind"):
        op(q, k, k, "nope", T0, W0, 11, 1.0, 3)
    with pytest.raises(RuntimeError, match="q must be 3-D"):
        op(k, k, k, "row", T0, W0, 11, 1.0, 3)
    with pytest.raises(RuntimeError, match="scale must be finite"):
        op(q, k, k, "row", T0, W0, 11, float("nan"), 3)


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), 1e39])
def test_bad_scale_names_the_argument(scale):
    q, k = _t(1, 2, 8), _t(1, 2, N0, 8)
    for fn in (sparse_attention_decode, sparse_attention_decode_reference):
        with pytest.raises(ValueError, match="scale must be finite"):
            fn(q, k, k, "row", T0, W0, 3, scale=scale)
