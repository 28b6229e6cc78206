"""dalle_fast.sparse_attention: attention under the DALL-E masks, backed by custom ops.

The ops (schemas in csrc/registration.cpp) work on "kernel order": raster order for causal, row and
conv, TRANSPOSED image states for column. `sparse_attention` takes raster order for every kind and
does the transposition for column itself; `block_sparse_attention` is the lower-level entry point for
callers (the model) that keep their image states transposed and want to skip the round trip.
`sparse_attention_decode` is one query row against a key/value cache (sampling), in kernel order.
"""

from __future__ import annotations

import math

import torch

from dalle_fast import _C  # noqa: F401  (loads the library: registers torch.ops.dalle_fast)
from dalle_fast.ops.masks import allowed_keys, attention_mask, check_mask_args
from dalle_fast.ops.support import CUDA_DTYPES, CUDA_HEAD_DIMS, require_cuda_kernels

# Head dims and dtypes the CPU kernels take (the CUDA ones: dalle_fast.ops.support).
_CPU_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_CPU_MAX_HEAD_DIM = 256
_SCALE_MAX = torch.finfo(torch.float32).max / 2  # room for the CUDA kernels' factor log2(e)


def _check_tensors(q, k, v, q_dims: int, q_layout: str, kv_layout: str, kv_shape) -> None:
    """ValueError naming the argument unless q, k, v are tensors, q has q_dims dimensions (`q_layout`
    names them), and k and v have the shape kv_shape(q) (`kv_layout` describes it), q's dtype and device."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if q.dim() != q_dims:
        raise ValueError(f"q must be {q_dims}-D {q_layout}, got shape {tuple(q.shape)}")
    want = kv_shape(q)
    for name, t in (("k", k), ("v", v)):
        if tuple(t.shape) != want:
            raise ValueError(f"{name} must have {kv_layout} {want}, got {tuple(t.shape)}")
        if t.dtype != q.dtype:
            raise ValueError(f"{name} must have the dtype of q ({q.dtype}), got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} must be on the device of q ({q.device}), got {t.device}")


def _check_inputs(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kind: str, text_len: int, image_size: int, kernel_size: int
) -> None:
    """ValueError naming the argument for anything the kernels cannot take."""
    check_mask_args(kind, text_len, image_size, kernel_size)
    _check_tensors(q, k, v, 4, "[batch, heads, seq_len, head_dim]", "the shape of q", lambda q: tuple(q.shape))
    n = text_len + image_size * image_size
    if q.shape[2] != n:
        raise ValueError(
            f"q.shape[2] (seq_len) must equal text_len + image_size**2 = {text_len} + {image_size}**2 = {n}, "
            f"got {q.shape[2]}"
        )
    head_dim = q.shape[3]
    if q.device.type == "cuda":
        if q.dtype not in CUDA_DTYPES:
            raise ValueError(f"q.dtype must be one of {CUDA_DTYPES} on CUDA, got {q.dtype}")
        if head_dim not in CUDA_HEAD_DIMS:
            raise ValueError(f"head_dim (q.shape[3]) must be one of {CUDA_HEAD_DIMS} on CUDA, got {head_dim}")
    elif q.device.type in ("cpu", "meta"):
        if q.dtype not in _CPU_DTYPES:
            raise ValueError(f"q.dtype must be one of {_CPU_DTYPES} on CPU, got {q.dtype}")
        if not 1 <= head_dim <= _CPU_MAX_HEAD_DIM:
            raise ValueError(f"head_dim (q.shape[3]) must be in [1, {_CPU_MAX_HEAD_DIM}] on CPU, got {head_dim}")
    else:
        raise ValueError(f"q must be on a CPU or CUDA device, got {q.device}")


def _resolve_scale(q: torch.Tensor, scale) -> float:
    """scale, or head_dim**-0.5 when it is None; ValueError unless it is a real number well inside
    float32's range (the kernels' precision): a NaN or infinite scale has no softmax to compute."""
    if scale is None:
        return q.shape[-1] ** -0.5
    if isinstance(scale, bool):
        raise ValueError(f"scale must be a real number or None, got {scale!r}")
    try:
        value = float(scale)
    except (TypeError, ValueError, RuntimeError):  # RuntimeError: a tensor of several elements
        raise ValueError(f"scale must be a real number or None, got {scale!r}") from None
    if not math.isfinite(value) or abs(value) > _SCALE_MAX:
        raise ValueError(f"scale must be finite with |scale| <= {_SCALE_MAX:.6g}, got {value}")
    return value


def to_column_order(x: torch.Tensor, text_len: int, image_size: int) -> torch.Tensor:
    """Swaps rows and columns of the image part of x [..., seq_len, dim]; text untouched.

    Its own inverse: maps raster states to transposed ones (the column kernel's order) and back.
    """
    img = x[..., text_len:, :].unflatten(-2, (image_size, image_size)).transpose(-3, -2).flatten(-3, -2)
    return torch.cat([x[..., :text_len, :], img], dim=-2)


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kind: str,
    text_len: int,
    image_size: int,
    kernel_size: int = 11,
    scale: float | None = None,
) -> torch.Tensor:
    """Like sparse_attention, but inputs and output are in kernel order: for kind "column" the image
    states are already transposed (see to_column_order). Differentiable."""
    _check_inputs(q, k, v, kind, text_len, image_size, kernel_size)
    scale = _resolve_scale(q, scale)
    require_cuda_kernels(q.device, "sparse_attention_fwd")
    out, _ = torch.ops.dalle_fast.sparse_attention_fwd(q, k, v, kind, text_len, image_size, kernel_size, scale)
    return out


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kind: str,
    text_len: int,
    image_size: int,
    kernel_size: int = 11,
    scale: float | None = None,
    *,
    reference: bool = False,
) -> torch.Tensor:
    """softmax(q k^T * scale, masked by attention_mask(kind, ...)) v, in raster order for every kind.

    q, k, v: [batch, heads, text_len + image_size**2, head_dim]. scale defaults to head_dim**-0.5.
    reference=True runs the dense pure-PyTorch reference instead of the kernels (for debugging).

    A key the mask hides from a query never affects that query's output or gradients, nor does the query
    affect the key's gradients, even where either holds a NaN or an infinity; at visible pairs non-finite
    values propagate as usual (docs/kernels.md#non-finite-values).
    """
    if reference:
        return sparse_attention_reference(q, k, v, kind, text_len, image_size, kernel_size, scale)
    if kind == "column":
        _check_inputs(q, k, v, kind, text_len, image_size, kernel_size)
        qt, kt, vt = (to_column_order(t, text_len, image_size) for t in (q, k, v))
        out = block_sparse_attention(qt, kt, vt, kind, text_len, image_size, kernel_size, scale)
        return to_column_order(out, text_len, image_size)
    return block_sparse_attention(q, k, v, kind, text_len, image_size, kernel_size, scale)


def sparse_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kind: str,
    text_len: int,
    image_size: int,
    kernel_size: int = 11,
    scale: float | None = None,
    *,
    upcast: bool = True,
    transposed: bool = False,
) -> torch.Tensor:
    """Dense masked attention in plain PyTorch: the definition the kernels are tested against.

    upcast=True computes in fp32 and casts the result back; upcast=False computes in the input dtype
    (the "plain PyTorch in low precision" baseline of the tests). transposed=True: column-kind inputs
    are in kernel order. O(N^2) memory.

    A key the mask hides from a query never affects that query's output, nor, in the backward, its
    gradient or the hidden key's (docs/kernels.md#non-finite-values): the products that sum over
    (query, key) pairs (P V and the three gradient products) skip hidden pairs instead of adding 0 * x,
    which is NaN when x is not finite. Non-finite values at visible pairs propagate as usual. Gradients
    are first order only, as the kernels'.
    """
    check_mask_args(kind, text_len, image_size, kernel_size)
    scale = _resolve_scale(q, scale)
    mask = attention_mask(kind, text_len, image_size, kernel_size, transposed=transposed).to(q.device)
    dt = torch.float32 if upcast else q.dtype
    s = _PairScores.apply(q.to(dt), k.to(dt), mask) * scale
    p = s.masked_fill(~mask, float("-inf")).softmax(dim=-1)
    return _MaskedMatmul.apply(p, v.to(dt), mask).to(q.dtype)


def _masked_matmul(w: torch.Tensor, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """out[..., i, :] = sum over the j with allowed[i, j] of w[..., i, j] * x[..., j, :].

    A pair that is not allowed adds nothing, whatever w and x hold there; an allowed pair adds w * x in
    IEEE arithmetic (NaN stays NaN, 0 * inf is NaN, w * inf is +-inf by w's sign). A plain w @ x would
    add 0 * x for the hidden pairs, which is NaN for a non-finite x. So: one product with hidden weights
    and non-finite x set to 0 (every finite term, exactly the plain product when x is finite), plus the
    non-finite terms of the allowed pairs, found by counting them with 0/1 indicator products (exact in
    fp32 up to 2^24 terms) and added as NaN, +inf or -inf.
    """
    finite = x.isfinite()
    out = w.masked_fill(~allowed, 0) @ x.masked_fill(~finite, 0)
    if bool(finite.all()):
        return out
    allowed = allowed.expand_as(w)
    # Which kind of term each allowed weight makes with an infinite x: +-inf by its sign, NaN for 0 or NaN.
    pos, neg = allowed & (w > 0), allowed & (w < 0)
    zero = allowed & ~(w > 0) & ~(w < 0)
    nan_x, pinf_x, ninf_x = x.isnan(), x == float("inf"), x == float("-inf")

    def any_term(a, b):  # does some allowed pair meet a (weights) and b (values)?
        return (a.float() @ b.float()) > 0

    to_nan = any_term(allowed, nan_x) | any_term(zero, pinf_x | ninf_x)
    to_pinf = any_term(pos, pinf_x) | any_term(neg, ninf_x)
    to_ninf = any_term(pos, ninf_x) | any_term(neg, pinf_x)
    to_nan |= to_pinf & to_ninf
    terms = torch.zeros_like(out).masked_fill(to_pinf, float("inf")).masked_fill(to_ninf, float("-inf"))
    terms = terms.masked_fill(to_nan, float("nan"))
    return torch.where(to_nan | to_pinf | to_ninf, out + terms, out)


class _MaskedMatmul(torch.autograd.Function):
    """_masked_matmul with its gradients under the same rule: dw is w's gradient at allowed pairs and 0
    at hidden ones (each entry is one row of g against one row of x), dx sums over allowed pairs only."""

    @staticmethod
    def forward(ctx, w, x, allowed):
        ctx.save_for_backward(w, x, allowed)
        return _masked_matmul(w, x, allowed)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        w, x, allowed = ctx.saved_tensors
        dw = (g @ x.transpose(-1, -2)).masked_fill(~allowed, 0)
        dx = _masked_matmul(w.transpose(-1, -2), g, allowed.transpose(-1, -2))
        return dw, dx, None


class _PairScores(torch.autograd.Function):
    """a @ b^T, one entry per (query, key) pair, whose gradients sum over allowed pairs only: a hidden
    pair's gradient (0 after the -inf mask) never meets a non-finite row of the other operand."""

    @staticmethod
    def forward(ctx, a, b, allowed):
        ctx.save_for_backward(a, b, allowed)
        return a @ b.transpose(-1, -2)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        a, b, allowed = ctx.saved_tensors
        da = _masked_matmul(g, b, allowed)
        db = _masked_matmul(g.transpose(-1, -2), a, allowed.transpose(-1, -2))
        return da, db, None


def _check_decode_inputs(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kind: str, text_len: int, image_size: int, kernel_size: int,
    position: int,
) -> None:  # fmt: skip
    """ValueError naming the argument for anything the decode kernels cannot take."""
    check_mask_args(kind, text_len, image_size, kernel_size)
    n = text_len + image_size * image_size
    _check_tensors(
        q, k, v, 3, "[batch, heads, head_dim] (one query per row)", "shape [batch, heads, seq_len, head_dim] =",
        lambda q: (q.shape[0], q.shape[1], n, q.shape[2]),
    )  # fmt: skip
    if not isinstance(position, int) or not 0 <= position < n:
        raise ValueError(f"position must be an int in [0, seq_len = {n}), got {position!r}")
    if q.dtype not in _CPU_DTYPES:
        raise ValueError(f"q.dtype must be one of {_CPU_DTYPES}, got {q.dtype}")
    if not 1 <= q.shape[2] <= _CPU_MAX_HEAD_DIM:
        raise ValueError(f"head_dim (q.shape[2]) must be in [1, {_CPU_MAX_HEAD_DIM}], got {q.shape[2]}")
    if q.device.type not in ("cpu", "cuda", "meta"):
        raise ValueError(f"q must be on a CPU or CUDA device, got {q.device}")


def sparse_attention_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kind: str,
    text_len: int,
    image_size: int,
    position: int,
    kernel_size: int = 11,
    scale: float | None = None,
    *,
    reference: bool = False,
) -> torch.Tensor:
    """Attention of one query per (batch, head) against a key/value cache, in kernel order.

    q: [batch, heads, head_dim], the query at kernel-order index `position` (for "column", transposed image
    states: image token (r, c) sits at text_len + c * image_size + r). k, v: [batch, heads, seq_len,
    head_dim], the cache in the same order; only the keys the mask gives row `position` are read, so
    entries after it may hold anything. Equals row `position` of block_sparse_attention on the full
    sequence. fp32 arithmetic; the result has q's dtype. reference=True: dense PyTorch instead.
    """
    if reference:
        return sparse_attention_decode_reference(q, k, v, kind, text_len, image_size, position, kernel_size, scale)
    _check_decode_inputs(q, k, v, kind, text_len, image_size, kernel_size, position)
    scale = _resolve_scale(q, scale)
    require_cuda_kernels(q.device, "sparse_attention_decode")
    return torch.ops.dalle_fast.sparse_attention_decode(
        q, k, v, kind, text_len, image_size, kernel_size, scale, position
    )


def sparse_attention_decode_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kind: str, text_len: int, image_size: int, position: int,
    kernel_size: int, scale: float,
) -> torch.Tensor:  # fmt: skip
    """sparse_attention_decode without its Python checks of the arguments (the op still checks shapes, dtypes
    and the position in C++, raising RuntimeError), for a sampling loop that calls it once per layer and
    token with arguments it checked on its first call (at batch 1 the Python checks are several percent of a
    decode step). Everything else should call sparse_attention_decode."""
    return torch.ops.dalle_fast.sparse_attention_decode(
        q, k, v, kind, text_len, image_size, kernel_size, scale, position
    )


def sparse_attention_decode_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kind: str,
    text_len: int,
    image_size: int,
    position: int,
    kernel_size: int = 11,
    scale: float | None = None,
) -> torch.Tensor:
    """sparse_attention_decode in plain PyTorch (fp32): the row of the dense transposed mask, softmax, sum.
    Keys the row may not see never affect it or its gradients, as in sparse_attention_reference. O(seq_len^2)
    for the mask; for tests and debugging."""
    check_mask_args(kind, text_len, image_size, kernel_size)
    scale = _resolve_scale(q, scale)
    mask = attention_mask(kind, text_len, image_size, kernel_size, transposed=kind == "column")[position]
    mask = mask.to(q.device).unsqueeze(0)  # (1, N): the mask of a one-row query block
    s = _PairScores.apply(q.float().unsqueeze(-2), k.float(), mask) * scale  # (B, H, 1, N)
    p = s.masked_fill(~mask, float("-inf")).softmax(-1)
    return _MaskedMatmul.apply(p, v.float(), mask).squeeze(-2).to(q.dtype)


# ---- fake (meta) kernels and autograd for the custom ops -------------------------------------------


@torch.library.register_fake("dalle_fast::sparse_attention_fwd")
def _fwd_fake(q, k, v, kind, text_len, image_size, kernel_size, scale):
    _check_inputs(q, k, v, kind, text_len, image_size, kernel_size)
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.register_fake("dalle_fast::sparse_attention_bwd")
def _bwd_fake(grad_out, q, k, v, out, lse, kind, text_len, image_size, kernel_size, scale):
    _check_inputs(q, k, v, kind, text_len, image_size, kernel_size)
    return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape)


def _fwd_setup_context(ctx, inputs, output):
    q, k, v, kind, text_len, image_size, kernel_size, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.mask_args = (kind, text_len, image_size, kernel_size, scale)
    ctx.mark_non_differentiable(lse)


def _fwd_backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = torch.ops.dalle_fast.sparse_attention_bwd(grad_out, q, k, v, out, lse, *ctx.mask_args)
    return dq, dk, dv, None, None, None, None, None


torch.library.register_autograd("dalle_fast::sparse_attention_fwd", _fwd_backward, setup_context=_fwd_setup_context)


@torch.library.register_fake("dalle_fast::sparse_attention_decode")
def _decode_fake(q, k, v, kind, text_len, image_size, kernel_size, scale, position):
    _check_decode_inputs(q, k, v, kind, text_len, image_size, kernel_size, position)
    return q.new_empty(q.shape)


def _decode_setup_context(ctx, inputs, output):
    q, k, v, kind, text_len, image_size, kernel_size, scale, position = inputs
    ctx.save_for_backward(q, k, v)
    ctx.args = (kind, text_len, image_size, kernel_size, scale, position)


def _decode_backward(ctx, grad_out):
    """Gradients of one decode row, in fp32 over the row's allowed keys only (an index, no N x N mask);
    every other cache entry gets zero."""
    q, k, v = ctx.saved_tensors
    kind, text_len, image_size, kernel_size, scale, position = ctx.args
    idx = torch.tensor(allowed_keys(kind, text_len, image_size, kernel_size, position), device=q.device)
    kk, vv, qf, g = k.index_select(2, idx).float(), v.index_select(2, idx).float(), q.float(), grad_out.float()
    p = ((kk @ qf.unsqueeze(-1)).squeeze(-1) * scale).softmax(-1)  # (B, H, L)
    dp = (vv @ g.unsqueeze(-1)).squeeze(-1)
    ds = p * (dp - (p * dp).sum(-1, keepdim=True)) * scale
    dq = (ds.unsqueeze(-2) @ kk).squeeze(-2)
    dk = k.new_zeros(k.shape, dtype=torch.float32).index_copy(2, idx, ds.unsqueeze(-1) * qf.unsqueeze(-2))
    dv = v.new_zeros(v.shape, dtype=torch.float32).index_copy(2, idx, p.unsqueeze(-1) * g.unsqueeze(-2))
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None, None


torch.library.register_autograd(
    "dalle_fast::sparse_attention_decode", _decode_backward, setup_context=_decode_setup_context
)
