"""dalle_fast.sparse_attention against the dense pure-PyTorch reference: values, gradients, opcheck,
torch.compile, bad input. CUDA cases skip cleanly where no GPU (or no CUDA kernel) is present."""

import itertools
import os
import random
import subprocess
import sys

import pytest
import torch

import dalle_fast
from dalle_fast import MASK_KINDS, block_sparse_attention, sparse_attention, sparse_attention_reference, to_column_order
from dalle_fast.ops.masks import allowed_keys, attention_mask, block_layout

# (text_len, image_size): text lengths off block boundaries, grids from 4 to 32 (the big ones are slow).
SHAPES = [(6, 4), (0, 5), (37, 7), (1, 9), (77, 8), (130, 12)]
SLOW_SHAPES = [(256, 16), (19, 32)]


def _has_cuda_kernels():
    return torch.cuda.is_available() and torch._C._dispatch_has_kernel_for_dispatch_key(
        "dalle_fast::sparse_attention_fwd", "CUDA"
    )


DEVICES = [
    "cpu",
    pytest.param(
        "cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not _has_cuda_kernels(), reason="no CUDA kernels")]
    ),
]


def make_qkv(T, W, dtype=torch.float32, device="cpu", batch=2, heads=3, head_dim=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = T + W * W
    return [
        torch.randn(batch, heads, n, head_dim, generator=g).to(device=device, dtype=dtype).requires_grad_()
        for _ in range(3)
    ]


def attention_and_grads(fn, q, k, v, grad):
    out = fn(q, k, v)
    return (out, *torch.autograd.grad(out, (q, k, v), grad))


def max_err(a, b):
    return (a.float() - b.float()).abs().max().item()


def delta_error_bound(q, k, v, grad, out, mask, scale):
    """Elementwise bounds on how far the kernels' dq and dk may be from the exact gradients because of the
    one step in which they differ from plain PyTorch: delta.

    The softmax backward needs each row's delta_i = sum_j P_ij dP_ij. The kernels (as FlashAttention) take
    it as rowsum(grad * out) in fp32, with out the forward's output as the backward receives it: rounded
    to the inputs' dtype. Plain PyTorch sums its own P dP, which cancels dP exactly where a row's softmax
    is (nearly) one-hot: there the exact dS_ij = P_ij (dP_ij - delta_i) and the gradients are ~0, and so
    is plain PyTorch's error. The kernels' delta is off by grad_i . (out_i - O_i) (O the exact output),
    and fp32 rounding of that dot product and of dP_ij adds at most head_dim * u32 times their sums of
    absolute products. dS carries these times P_ij into dq_i = scale sum_j dS_ij k_j and
    dk_j = scale sum_i dS_ij q_i. mask[i, j]: query i sees key j, in the order of the tensors.
    """
    q, k, v, grad, out = (t.detach().double() for t in (q, k, v, grad, out))
    rounding = q.shape[-1] * torch.finfo(torch.float32).eps / 2
    p = (q @ k.mT * scale).masked_fill(~mask, float("-inf")).softmax(-1)
    delta_err = (grad * (out - p @ v)).sum(-1).abs() + rounding * (grad * out).abs().sum(-1)
    w = p * (delta_err.unsqueeze(-1) + rounding * (grad.abs() @ v.abs().mT))  # P_ij times dS_ij's error
    return abs(scale) * w @ k.abs(), abs(scale) * w.mT @ q.abs()


def check_against_reference(
    kind, T, W, dtype, device, head_dim=32, kernel_size=11, scale=None, batch=2, heads=3, seed=0, qk_std=1.0
):
    q, k, v = make_qkv(T, W, dtype, device, batch=batch, heads=heads, head_dim=head_dim, seed=seed)
    if qk_std != 1.0:  # sharper (or flatter) softmax rows
        q, k = ((x.detach() * qk_std).requires_grad_() for x in (q, k))
    g = torch.Generator().manual_seed(seed + 1)
    grad = torch.randn(q.shape, generator=g).to(device=device, dtype=dtype)
    got = attention_and_grads(lambda *x: sparse_attention(*x, kind, T, W, kernel_size, scale), q, k, v, grad)
    # fp32 reference from fp32 copies of the same inputs.
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = attention_and_grads(
        lambda *x: sparse_attention_reference(*x, kind, T, W, kernel_size, scale), q32, k32, v32, grad.float()
    )
    if dtype == torch.float32:
        for name, a, b in zip(("out", "dq", "dk", "dv"), got, ref, strict=True):
            torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-4, msg=lambda m, n=name: f"{n}: {m}")
        return
    # Low precision: at most twice the error of the plain PyTorch computation in the same dtype (the
    # FlashAttention rule), plus, for dq and dk, what the kernels' delta explains (delta_error_bound).
    plain = attention_and_grads(
        lambda *x: sparse_attention_reference(*x, kind, T, W, kernel_size, scale, upcast=False), q, k, v, grad
    )
    mask = attention_mask(kind, T, W, kernel_size).to(device)
    scale = head_dim**-0.5 if scale is None else scale
    dq_bound, dk_bound = delta_error_bound(q, k, v, grad, got[0], mask, scale)
    for name, a, b, p in zip(("out", "dq", "dk", "dv"), got, ref, plain, strict=True):
        assert a.dtype == dtype
        err = (a.double() - b.double()).abs()
        allowed = 2 * max_err(p, b) + 1e-5 + {"dq": dq_bound, "dk": dk_bound}.get(name, 0.0)
        worst = (err - allowed).argmax()
        assert (err <= allowed).all(), (
            f"{name}: kernel error {err.flatten()[worst]:.3g} > {torch.as_tensor(allowed).flatten()[worst]:.3g} "
            f"allowed (plain PyTorch's max error {max_err(p, b):.3g})"
        )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T,W", SHAPES)
@pytest.mark.parametrize("kind", MASK_KINDS)
def test_values_and_gradients(kind, T, W, dtype, device):
    if device == "cuda" and dtype == torch.float32:
        dtype = torch.float16  # the CUDA kernels take fp16 / bf16
    check_against_reference(kind, T, W, dtype, device)


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("T,W", SLOW_SHAPES)
@pytest.mark.parametrize("kind", MASK_KINDS)
def test_values_and_gradients_large(kind, T, W, device):
    check_against_reference(kind, T, W, torch.float32 if device == "cpu" else torch.bfloat16, device)


def test_low_precision_rule_on_random_cases():
    """check_against_reference's low-precision rule on 300 random small cases (fixed seeds): every kind,
    fp16 and bf16, odd text lengths, grids of 2 to 8, head dims 8 to 64, scales from 0.3 to 2 and q, k
    spreads up to 4, which make many softmax rows nearly one-hot: the cases where plain PyTorch's dS
    cancels to ~0 and the kernels' delta (delta_error_bound) is what separates them."""
    rng = random.Random(26)
    for seed in range(300):
        kind, dtype = rng.choice(MASK_KINDS), rng.choice([torch.float16, torch.bfloat16])
        T, W, head_dim = rng.randint(0, 20), rng.randint(2, 8), rng.choice([8, 16, 24, 32, 64])
        kernel_size, scale = rng.choice([3, 5, 11]), rng.choice([None, 0.3, 1.0, 2.0])
        qk_std = rng.choice([0.5, 1, 2, 4])
        batch, heads = rng.randint(1, 2), rng.randint(1, 3)
        check_against_reference(
            kind, T, W, dtype, "cpu", head_dim, kernel_size, scale, batch=batch, heads=heads, seed=seed, qk_std=qk_std
        )


@pytest.mark.parametrize("head_dim", [32, 64, 128, 24])
@pytest.mark.parametrize("kind", ["row", "conv"])
def test_head_dims(kind, head_dim):
    check_against_reference(kind, 11, 6, torch.float32, "cpu", head_dim=head_dim)


CUDA_ONLY = [pytest.mark.cuda, pytest.mark.skipif(not _has_cuda_kernels(), reason="no CUDA kernels")]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [32, 64, 128])
@pytest.mark.parametrize("kind", MASK_KINDS)
@pytest.mark.parametrize("_", [pytest.param(None, marks=CUDA_ONLY)])
def test_cuda_head_dims(_, kind, head_dim, dtype):
    # (On a 99 KiB GPU, sm_86 / sm_89, head dim 128's backward runs single-buffered: docs/kernels.md.)
    check_against_reference(kind, 70, 9, dtype, "cuda", head_dim=head_dim)


@pytest.mark.parametrize("kind", MASK_KINDS)
@pytest.mark.parametrize("_", [pytest.param(None, marks=CUDA_ONLY)])
def test_cuda_single_buffered_backward_gives_the_same_bits(_, kind, monkeypatch):
    """Head dim 128's single-buffered backward (what 99 KiB GPUs run), forced on this GPU: the same
    arithmetic as the double-buffered one, so the same bits."""
    q, k, v = make_qkv(70, 9, torch.bfloat16, "cuda", head_dim=128)
    grad = torch.randn_like(q)
    run = lambda: attention_and_grads(lambda *x: sparse_attention(*x, kind, 70, 9), q, k, v, grad)  # noqa: E731
    want = run()
    monkeypatch.setenv("DALLE_FAST_BWD_STAGES", "1")
    for a, b in zip(want, run(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("_", [pytest.param(None, marks=CUDA_ONLY)])
def test_cuda_deterministic_and_matches_cpu(_):
    q, k, v = make_qkv(37, 8, torch.bfloat16, "cuda", head_dim=64)
    grad = torch.randn_like(q)
    a = attention_and_grads(lambda *x: sparse_attention(*x, "conv", 37, 8), q, k, v, grad)
    b = attention_and_grads(lambda *x: sparse_attention(*x, "conv", 37, 8), q, k, v, grad)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)  # no atomics: bitwise repeatable
    cpu = attention_and_grads(
        lambda *x: sparse_attention(*x, "conv", 37, 8),
        *(t.detach().cpu().requires_grad_() for t in (q, k, v)),
        grad.cpu(),
    )
    for x, y in zip(a, cpu, strict=True):
        torch.testing.assert_close(x.cpu().float(), y.float(), atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("head_dim", [32, 64])
@pytest.mark.parametrize("kind", MASK_KINDS)
@pytest.mark.parametrize("_", [pytest.param(None, marks=CUDA_ONLY)])
def test_cuda_forward_warp_layouts_agree(_, kind, head_dim, monkeypatch):
    """The forward's 2-warp (32 rows per warp, the default) and 4-warp (16 rows) layouts do the same
    arithmetic per row: the same bits."""
    q, k, v = make_qkv(70, 9, torch.float16, "cuda", head_dim=head_dim)
    outs = []
    for rows in ("32", "16"):
        monkeypatch.setenv("DALLE_FAST_FWD_ROWS_PER_WARP", rows)
        outs.append(torch.ops.dalle_fast.sparse_attention_fwd(q, k, v, kind, 70, 9, 11, head_dim**-0.5))
    for a, b in zip(*outs, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kind", MASK_KINDS)
@pytest.mark.parametrize("_", [pytest.param(None, marks=CUDA_ONLY)])
def test_cuda_opcheck(_, kind):
    T, W = 7, 9
    q, k, v = make_qkv(T, W, torch.float16, "cuda", batch=1, heads=2, head_dim=64)
    args = (q, k, v, kind, T, W, 11, 0.125)
    torch.library.opcheck(torch.ops.dalle_fast.sparse_attention_fwd.default, args)
    out, lse = torch.ops.dalle_fast.sparse_attention_fwd(*args)
    bwd_args = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(), lse, kind, T, W, 11, 0.125)
    torch.library.opcheck(torch.ops.dalle_fast.sparse_attention_bwd.default, bwd_args)


@pytest.mark.parametrize("_", [pytest.param(None, marks=CUDA_ONLY)])
def test_cuda_torch_compile(_):
    torch._dynamo.reset()
    T, W = 9, 4
    q, k, v = make_qkv(T, W, torch.bfloat16, "cuda", head_dim=32)

    def step(q, k, v):
        return sparse_attention(q, k, v, "row", T, W).float().square().sum()

    loss = torch.compile(step, fullgraph=True)(q, k, v)
    torch.testing.assert_close(loss, step(q, k, v))


# ---- non-finite values: a masked key never affects an output ---------------------------------------

NONFINITE = [float("nan"), float("inf"), float("-inf")]
OPERANDS = ("q", "k", "v", "grad_out")


def _with_value(tensors, which, t, value):
    """Copies of (q, k, v, grad_out) with element (batch 1, head 0, token t, dim 3) of `which` set to value."""
    out = [x.detach().clone() for x in tensors]
    out[OPERANDS.index(which)][1, 0, t, 3] = value
    return out


def _attention_and_grads(fn, q, k, v, grad):
    return attention_and_grads(fn, *(x.clone().requires_grad_() for x in (q, k, v)), grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T,W", [(6, 4), (37, 7), (70, 9)])
@pytest.mark.parametrize("kind", MASK_KINDS)
def test_masked_nonfinite_values_never_reach_an_output(kind, T, W, dtype, unreached):
    """A NaN or infinity in q, k, v or grad_out changes no output or gradient that no visible (query, key)
    pair links it to, bit for bit, in the kernels and in the reference alike; where it is visible it
    propagates as in the reference: the same entries are non-finite (NaN where the reference has NaN,
    for a NaN), and the rows that see a NaN in q, k or v are NaN."""
    n = T + W * W
    q, k, v = make_qkv(T, W, dtype, batch=2, heads=2, head_dim=24, seed=T)
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    mask = attention_mask(kind, T, W)
    kernel = lambda *x: sparse_attention(*x, kind, T, W)  # noqa: E731
    reference = lambda *x: sparse_attention_reference(*x, kind, T, W)  # noqa: E731
    finite = {fn: _attention_and_grads(fn, q, k, v, grad) for fn in (kernel, reference)}
    for which, value, t in itertools.product(OPERANDS, NONFINITE, (T, n // 2, n - 2)):
        case = f"{value} in {which}[1, 0, {t}]"
        poisoned = _with_value((q, k, v, grad), which, t, value)
        got = {fn: _attention_and_grads(fn, *poisoned) for fn in (kernel, reference)}
        for fn, name in ((kernel, "kernel"), (reference, "reference")):
            for result, a, b in zip(("out", "dq", "dk", "dv"), finite[fn], got[fn], strict=True):
                rows = unreached(mask, which, t)[result]
                assert torch.equal(a[:, :, rows], b[:, :, rows]), f"{name} {result}, {case}"
        for result, a, b in zip(("out", "dq", "dk", "dv"), got[kernel], got[reference], strict=True):
            same = a.isnan() if value != value else ~a.isfinite()
            want = b.isnan() if value != value else ~b.isfinite()
            assert torch.equal(same, want), f"{result} non-finite where the reference is not, {case}"
            both = a.isfinite() & b.isfinite()
            torch.testing.assert_close(a[both].float(), b[both].float(), atol=3e-2, rtol=3e-2)
        if value != value and which != "grad_out":
            seen_by = ~unreached(mask, which, t)["out"]
            assert got[kernel][0][1, 0, seen_by].isnan().any(-1).all(), f"a row that sees {case} is not NaN"


def test_fp16_and_custom_scale_and_kernel_size():
    check_against_reference("conv", 9, 7, torch.float16, "cpu")
    check_against_reference("row", 9, 7, torch.float32, "cpu", scale=0.3)
    check_against_reference("conv", 9, 7, torch.float32, "cpu", kernel_size=5)
    for scale in (-0.3, 0.0):  # legal too: a negative scale favours dissimilar keys, zero weighs all alike
        check_against_reference("row", 9, 7, torch.float32, "cpu", scale=scale)


def test_conv_window_wider_than_the_grid():
    """A conv kernel_size past 2 image_size + 1 gives the same mask as that size (every earlier image
    token), in the dense mask, the decode keys, the layout and the kernels, without sizes that grow with it."""
    T, W, huge = 5, 4, 10**9 + 1
    assert torch.equal(attention_mask("conv", T, W, huge), attention_mask("causal", T, W))
    for i in (T + 2, T + 13):
        assert allowed_keys("conv", T, W, huge, i) == allowed_keys("causal", T, W, 11, i)
    layout, causal = block_layout("conv", 70, W, huge, 16), block_layout("causal", 70, W, 11, 16)
    assert torch.equal(layout.q_kblock, causal.q_kblock) and torch.equal(layout.q_full, causal.q_full)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, T + W * W, 16, generator=g) for _ in range(3))
    torch.testing.assert_close(
        sparse_attention(q, k, v, "conv", T, W, huge), sparse_attention(q, k, v, "causal", T, W), atol=1e-6, rtol=0
    )
    i = T + W * W - 2
    torch.testing.assert_close(
        dalle_fast.sparse_attention_decode(q[:, :, i], k, v, "conv", T, W, i, huge),
        dalle_fast.sparse_attention_decode(q[:, :, i], k, v, "causal", T, W, i),
        atol=1e-6,
        rtol=0,
    )


@pytest.mark.parametrize("scale", [-0.3, 0.0, 1.7])
@pytest.mark.parametrize("kind", ["row", "conv"])
@pytest.mark.parametrize("_", [pytest.param(None, marks=CUDA_ONLY)])
def test_cuda_any_scale(_, kind, scale):
    check_against_reference(kind, 37, 7, torch.float16, "cuda", head_dim=64, scale=scale)


def test_non_contiguous_inputs():
    T, W = 13, 5
    n = T + W * W
    q, k, v = (torch.randn(2, n, 3, 32).transpose(1, 2) for _ in range(3))  # [B, H, N, D] views
    assert not q.is_contiguous()
    for kind in MASK_KINDS:
        torch.testing.assert_close(
            sparse_attention(q, k, v, kind, T, W), sparse_attention_reference(q, k, v, kind, T, W), atol=2e-5, rtol=1e-4
        )


def test_lower_level_op_takes_transposed_states():
    T, W = 10, 6
    q, k, v = (t.detach() for t in make_qkv(T, W))
    qt, kt, vt = (to_column_order(t, T, W) for t in (q, k, v))
    out_t = block_sparse_attention(qt, kt, vt, "column", T, W)
    torch.testing.assert_close(to_column_order(out_t, T, W), sparse_attention_reference(q, k, v, "column", T, W))
    torch.testing.assert_close(
        out_t, sparse_attention_reference(qt, kt, vt, "column", T, W, transposed=True), atol=2e-5, rtol=1e-4
    )
    torch.testing.assert_close(to_column_order(qt, T, W), q)  # the transposition is its own inverse


def test_deterministic():
    q, k, v = make_qkv(21, 6)
    grad = torch.randn_like(q)
    a = attention_and_grads(lambda *x: sparse_attention(*x, "row", 21, 6), q, k, v, grad)
    b = attention_and_grads(lambda *x: sparse_attention(*x, "row", 21, 6), q, k, v, grad)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)


def test_empty_batch():
    q = torch.randn(0, 2, 6 + 16, 32, requires_grad=True)
    out = sparse_attention(q, q, q, "row", 6, 4)
    assert out.shape == q.shape
    out.sum().backward()
    assert q.grad.shape == q.shape


@pytest.mark.parametrize("kind", MASK_KINDS)
def test_opcheck(kind):
    T, W = 7, 4
    q, k, v = make_qkv(T, W, batch=1, heads=2)
    args = (q, k, v, kind, T, W, 11, 32**-0.5)
    torch.library.opcheck(torch.ops.dalle_fast.sparse_attention_fwd.default, args)
    out, lse = torch.ops.dalle_fast.sparse_attention_fwd(*args)
    bwd_args = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(), lse, kind, T, W, 11, 32**-0.5)
    torch.library.opcheck(torch.ops.dalle_fast.sparse_attention_bwd.default, bwd_args)


def _compiled_step(backend):
    T, W = 9, 4

    def step(q, k, v):
        out = sparse_attention(q, k, v, "column", T, W) + sparse_attention(q, k, v, "conv", T, W)
        return (out * out).sum()

    compiled = torch.compile(step, fullgraph=True, backend=backend)
    q, k, v = make_qkv(T, W)
    loss = compiled(q, k, v)
    grads = torch.autograd.grad(loss, (q, k, v))
    ref_loss = step(q, k, v)
    ref_grads = torch.autograd.grad(ref_loss, (q, k, v))
    torch.testing.assert_close(loss, ref_loss)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b)


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    _compiled_step("aot_eager")


def test_cuda_kernel_check_compiles_without_graph_breaks():
    """The check that a CUDA build is present runs inside compiled graphs on CUDA; here, with no GPU, the
    same check on a CUDA device is traced with fullgraph=True (a dispatcher query per call would fail)."""
    from dalle_fast.ops import support as ops

    def f(x):
        ops.require_cuda_kernels(torch.device("cuda"), "sparse_attention_fwd")
        ops.require_cuda_kernels(torch.device("cuda"), "sparse_attention_decode")
        return x + 1

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="eager")
    if ops.CUDA_BACKEND is not None:
        torch.testing.assert_close(compiled(torch.ones(2)), torch.full((2,), 2.0))
    else:  # no backend: the clear error, not a tracing failure
        with pytest.raises(RuntimeError, match="has no CUDA kernel"):
            compiled(torch.ones(2))


@pytest.mark.slow
def test_torch_compile_inductor():
    torch._dynamo.reset()
    _compiled_step("inductor")


def test_portable_gemm_fallback_matches_reference():
    """The kernel's non-BLAS GEMM path (used where torch exports no sgemm) gives the same results."""
    code = (
        "import torch, dalle_fast as d\n"
        "torch.manual_seed(0)\n"
        "q, k, v = (torch.randn(1, 2, 6 + 25, 16, requires_grad=True) for _ in range(3))\n"
        "for kind in d.MASK_KINDS:\n"
        "    o = d.sparse_attention(q, k, v, kind, 6, 5); r = d.sparse_attention_reference(q, k, v, kind, 6, 5)\n"
        "    g = torch.autograd.grad(o.sum(), (q, k, v)); h = torch.autograd.grad(r.sum(), (q, k, v))\n"
        "    for a, b in zip((o, *g), (r, *h)): torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)\n"
    )
    env = dict(os.environ, DALLE_FAST_PORTABLE_GEMM="1")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


# ---- bad input ------------------------------------------------------------------------------------

T0, W0 = 6, 4
N0 = T0 + W0 * W0


def _t(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, dtype=dtype, device=device)


BAD_INPUTS = [
    ("rank", (_t(2, N0, 32), _t(2, N0, 32), _t(2, N0, 32)), {}, "4-D"),
    ("seq_len", (_t(1, 2, N0 + 1, 32),) * 3, {}, "seq_len"),
    ("k shape", (_t(1, 2, N0, 32), _t(1, 3, N0, 32), _t(1, 2, N0, 32)), {}, "k must have the shape"),
    ("dtype mix", (_t(1, 2, N0, 32), _t(1, 2, N0, 32, dtype=torch.bfloat16), _t(1, 2, N0, 32)), {}, "dtype"),
    ("device mix", (_t(1, 2, N0, 32), _t(1, 2, N0, 32, device="meta"), _t(1, 2, N0, 32)), {}, "device"),
    ("float64", (_t(1, 2, N0, 32, dtype=torch.float64),) * 3, {}, "dtype"),
    ("head_dim", (_t(1, 2, N0, 300),) * 3, {}, "head_dim"),
    ("kind", (_t(1, 2, N0, 32),) * 3, {"kind": "diagonal"}, "kind"),
    ("kernel", (_t(1, 2, N0, 32),) * 3, {"kind": "conv", "kernel_size": 6}, "kernel_size"),
    ("not a tensor", ([[1.0]], _t(1, 2, N0, 32), _t(1, 2, N0, 32)), {}, "q must be a torch.Tensor"),
]


@pytest.mark.parametrize("name,qkv,kw,match", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_names_the_argument(name, qkv, kw, match):
    kind = kw.get("kind", "row")
    with pytest.raises(ValueError, match=match):
        sparse_attention(*qkv, kind, T0, W0, kw.get("kernel_size", 11))


def test_raw_op_checks_its_arguments():
    """Calling the registered op directly (no Python wrapper) still fails cleanly, naming the argument."""
    q = _t(1, 2, N0, 32)
    with pytest.raises(RuntimeError, match="seq_len"):
        torch.ops.dalle_fast.sparse_attention_fwd(q, q, q, "row", T0 + 1, W0, 11, 1.0)
    with pytest.raises(RuntimeError, match="kind"):
        torch.ops.dalle_fast.sparse_attention_fwd(q, q, q, "nope", T0, W0, 11, 1.0)
    with pytest.raises(RuntimeError, match="head_dim"):
        x = _t(1, 2, N0, 512)
        torch.ops.dalle_fast.sparse_attention_fwd(x, x, x, "row", T0, W0, 11, 1.0)
    out, lse = torch.ops.dalle_fast.sparse_attention_fwd(q, q, q, "row", T0, W0, 11, 1.0)
    with pytest.raises(RuntimeError, match="lse"):
        torch.ops.dalle_fast.sparse_attention_bwd(q, q, q, q, out, lse[:, :, :-1], "row", T0, W0, 11, 1.0)
    with pytest.raises(RuntimeError, match="grad_out"):
        torch.ops.dalle_fast.sparse_attention_bwd(q[..., :16], q, q, q, out, lse, "row", T0, W0, 11, 1.0)

    with pytest.raises(RuntimeError, match="scale must be finite"):
        torch.ops.dalle_fast.sparse_attention_fwd(q, q, q, "row", T0, W0, 11, float("nan"))
    with pytest.raises(RuntimeError, match="scale must be finite"):
        torch.ops.dalle_fast.sparse_attention_bwd(q, q, q, q, out, lse, "row", T0, W0, 11, float("inf"))


# 2e38: |scale| log2(e) overflows float32; True: a flag, not a scale; a tensor of two elements.
BAD_SCALES = [float("nan"), float("inf"), -float("inf"), 1e39, 2e38, "big", [1.0], True, torch.ones(2)]


@pytest.mark.parametrize("scale", BAD_SCALES, ids=repr)
def test_bad_scale_names_the_argument(scale):
    """A scale without a float32 softmax (NaN, Inf, beyond float32's range, not a number) is refused by
    the kernels' entry point and the reference alike, instead of returning NaN or uniform weights."""
    q = _t(1, 2, N0, 32)
    for fn in (sparse_attention, sparse_attention_reference):
        with pytest.raises(ValueError, match="scale must be"):
            fn(q, q, q, "row", T0, W0, scale=scale)


@pytest.mark.parametrize("_", [pytest.param(None, marks=CUDA_ONLY)])
def test_cuda_raw_op_refuses_nonfinite_scale(_):
    q = _t(1, 2, N0, 32, dtype=torch.float16, device="cuda")
    for scale in (float("nan"), float("inf"), 1e39):
        with pytest.raises(RuntimeError, match="scale must be finite"):
            torch.ops.dalle_fast.sparse_attention_fwd(q, q, q, "row", T0, W0, 11, scale)


def test_package_exports():
    assert callable(dalle_fast.sparse_attention)
    assert set(dalle_fast.MASK_KINDS) == {"causal", "row", "column", "conv"}
