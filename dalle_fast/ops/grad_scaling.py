"""The per-resblock gradient-scaling ops (the paper's Section 2.4 and Appendix D): their plain-PyTorch
references, the autograd boundary of a resblock, and the ops' fake kernels.

The kernels are custom ops (schemas in csrc/registration.cpp, CPU kernels in csrc/cpu/, CUDA ones in
csrc/cuda/); the *_reference functions define them in plain PyTorch, operation for operation, and the
CPU kernels match them bit for bit. The scaler and optimizer that use them are
dalle_fast.training.amp (ResblockGradScaler, BlockAdamW, ScaledResidual).
"""

from __future__ import annotations

import math

import torch

from dalle_fast import _C  # noqa: F401  (registers torch.ops.dalle_fast)

GROWTH = 2.0 ** (1.0 / 1000.0)  # per clean update
BACKOFF = math.sqrt(2.0)  # divisor on a nonfinite gradient
WINDOW = 125  # updates after a division during which the scale is not divided again
INIT_EXP, MIN_EXP, MAX_EXP = 13, 7, 24  # scales start at M * 2^13, clamped to [M * 2^7, M * 2^24]


# ---- references (plain PyTorch; the CPU kernels agree with them bit for bit) -------------------------


def grad_scale_reference(grad: torch.Tensor, scales: torch.Tensor, block: int) -> torch.Tensor:
    return (grad.float() * scales[block]).to(grad.dtype)


def grad_unscale_filter_reference(
    grad: torch.Tensor, scales: torch.Tensor, block: int, found_inf: torch.Tensor
) -> torch.Tensor:
    v = grad.float()
    finite = torch.isfinite(v)
    found_inf[block] |= ~finite.all()
    return torch.where(finite, v * scales[block].reciprocal(), torch.zeros_like(v)).to(grad.dtype)


def multi_unscale_check_reference(
    grads: list[torch.Tensor], blocks: list[int], scales: torch.Tensor, found_inf: torch.Tensor
) -> None:
    inv = scales.reciprocal()
    for g, b in zip(grads, blocks, strict=True):
        v = g.float()
        found_inf[b] |= ~torch.isfinite(v).all()
        g.copy_((v * inv[b]).to(g.dtype))


def scale_update_reference(
    scales: torch.Tensor, cooldown: torch.Tensor, found_inf: torch.Tensor, min_scale: float, max_scale: float
) -> None:
    blocked = cooldown > 0
    cooldown.sub_(blocked.int())
    divide = found_inf & ~blocked
    grown = scales * torch.tensor(GROWTH, dtype=torch.float32)
    shrunk = scales / torch.tensor(BACKOFF, dtype=torch.float32)
    new = torch.where(divide, shrunk, torch.where(found_inf, scales, grown)).clamp(min_scale, max_scale)
    scales.copy_(new)
    cooldown.copy_(torch.where(divide, torch.full_like(cooldown, WINDOW), cooldown))


def adamw_step_reference(
    params, grads, exp_avg, exp_avg_sq, blocks, found_inf, step_size, bias_correction2_sqrt, decay, beta1, beta2, eps
) -> None:
    for p, g, m, v, b in zip(params, grads, exp_avg, exp_avg_sq, blocks, strict=True):
        if bool(found_inf[b]):
            continue
        g32 = g.float()
        p32 = p.float() * decay[b]
        m32 = m.float() * beta1 + g32 * (1.0 - beta1)
        v32 = v.float() * beta2 + (g32 * g32) * (1.0 - beta2)
        # torch's fp32 sqrt is not correctly rounded on every CPU (AVX-512 builds differ by an ulp); the
        # kernels' is, and so is fp64 sqrt rounded to fp32.
        denom = v32.double().sqrt().float() / bias_correction2_sqrt[b] + eps
        p32 = p32 - step_size[b] * (m32 / denom)
        p.copy_(p32.to(p.dtype))
        m.copy_(m32.to(m.dtype))
        v.copy_(v32.to(v.dtype))


# ---- the boundary of a resblock -----------------------------------------------------------------------


class ScaleGradIn(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient entering the branch by the block's scale."""

    @staticmethod
    def forward(ctx, y, scales, block):
        ctx.scales, ctx.block = scales, block
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad):
        return torch.ops.dalle_fast.grad_scale(grad.contiguous(), ctx.scales, ctx.block), None, None


class UnscaleGradOut(torch.autograd.Function):
    """Identity forward; backward unscales and filters the gradient leaving the branch."""

    @staticmethod
    def forward(ctx, x, scales, block, found_inf):
        ctx.scales, ctx.block, ctx.found_inf = scales, block, found_inf
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        out = torch.ops.dalle_fast.grad_unscale_filter(grad.contiguous(), ctx.scales, ctx.block, ctx.found_inf)
        return out, None, None, None


# ---- fake kernels -------------------------------------------------------------------------------------


@torch.library.register_fake("dalle_fast::grad_scale")
def _grad_scale_fake(grad, scales, block):
    return torch.empty_like(grad, memory_format=torch.contiguous_format)


@torch.library.register_fake("dalle_fast::grad_unscale_filter")
def _grad_unscale_filter_fake(grad, scales, block, found_inf):
    return torch.empty_like(grad, memory_format=torch.contiguous_format)


@torch.library.register_fake("dalle_fast::multi_unscale_check_")
def _multi_unscale_check_fake(grads, blocks, scales, found_inf):
    return None


@torch.library.register_fake("dalle_fast::resblock_scale_update_")
def _scale_update_fake(scales, cooldown, found_inf, growth, backoff, window, min_scale, max_scale):
    return None


@torch.library.register_fake("dalle_fast::adamw_step_")
def _adamw_fake(params, grads, exp_avg, exp_avg_sq, blocks, found_inf, step_size, bc2, decay, beta1, beta2, eps):
    return None
