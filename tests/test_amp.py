"""Per-resblock gradient scaling: kernels bit-exact against their references, the paper's scale rules,
skipping exactly the overflowing block, state_dict round trips, and the underflow it exists to prevent."""

import copy
import math

import pytest
import torch
from torch import nn

from dalle_fast.ops import grad_scaling as amp
from dalle_fast.training.amp import BlockAdamW, ResblockGradScaler

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _poison(t):
    t = t.clone()
    t.view(-1)[3] = float("inf")
    t.view(-1)[7] = float("nan")
    return t


def _bits_equal(a, b):
    return torch.equal(
        a.view(torch.int16) if a.element_size() == 2 else a.view(torch.int32),
        b.view(torch.int16) if b.element_size() == 2 else b.view(torch.int32),
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_grad_scale_bit_exact(dtype):
    g = torch.randn(1000, 3).to(dtype)
    scales = torch.tensor([3.0, 8192.0, 0.37], dtype=torch.float32)
    got = torch.ops.dalle_fast.grad_scale(g, scales, 1)
    assert _bits_equal(got, amp.grad_scale_reference(g, scales, 1))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("poisoned", [False, True])
def test_grad_unscale_filter_bit_exact_and_flags(dtype, poisoned):
    g = (torch.randn(4097) * 1000).to(dtype)
    if poisoned:
        g = _poison(g)
    scales = torch.tensor([2.0**13, 1.5 * 2**10, 1.0])
    found = torch.zeros(3, dtype=torch.bool)
    found_ref = found.clone()
    got = torch.ops.dalle_fast.grad_unscale_filter(g, scales, 1, found)
    want = amp.grad_unscale_filter_reference(g, scales, 1, found_ref)
    assert _bits_equal(got, want)
    assert torch.isfinite(got.float()).all()  # Inf/NaN filtered to 0
    assert found.tolist() == [False, poisoned, False] == found_ref.tolist()


def test_multi_unscale_check_bit_exact_mixed_dtypes():
    torch.manual_seed(0)
    grads = [
        (torch.randn(n) * 1e4).to(dt)
        for n, dt in [
            (5, torch.float32),
            (70000, torch.bfloat16),
            (33, torch.float16),
            (1000, torch.float32),
            (9, torch.bfloat16),
        ]
    ]
    grads[3] = _poison(grads[3])
    blocks = [0, 1, 1, 2, 3]
    scales = torch.tensor([2.0**13, 3.0 * 2**9, 2.0**7, 1.0])
    found = torch.zeros(4, dtype=torch.bool)
    ref = [g.clone() for g in grads]
    found_ref = found.clone()
    torch.ops.dalle_fast.multi_unscale_check_(grads, blocks, scales, found)
    amp.multi_unscale_check_reference(ref, blocks, scales, found_ref)
    for a, b in zip(grads, ref, strict=True):
        assert _bits_equal(a, b) or (a.isnan() == b.isnan()).all() and _bits_equal(a.nan_to_num(), b.nan_to_num())
    assert found.tolist() == [False, False, True, False] == found_ref.tolist()


def test_unscale_takes_non_contiguous_gradients():
    """A transposed gradient (and a channels-last one) is unscaled and checked like any other, with the
    values of its contiguous copy."""
    scaler = ResblockGradScaler(2)
    torch.manual_seed(0)
    p = nn.Parameter(torch.zeros(3, 4))
    c = nn.Parameter(torch.zeros(2, 3, 4, 5))
    p.grad = (torch.randn(4, 3) * 8192).t()
    c.grad = (torch.randn(2, 3, 4, 5) * 8192).contiguous(memory_format=torch.channels_last)
    c.grad[1, 2, 3, 4] = float("inf")
    want_p, want_c = p.grad.clone() / scaler.scales[0], c.grad.clone() / scaler.scales[1]
    assert not p.grad.is_contiguous() and not c.grad.is_contiguous()
    scaler.unscale_([(p, 0), (c, 1)])
    assert torch.equal(p.grad, want_p) and torch.equal(c.grad.nan_to_num(posinf=0), want_c.nan_to_num(posinf=0))
    assert scaler.found_inf[:2].tolist() == [False, True]


def test_scale_rules():
    s = ResblockGradScaler(3, replicas=2)
    assert s.scales.tolist() == [2 * 2.0**13] * 3
    s.update(torch.tensor([False, True, False]))
    assert s.scales[0].item() == pytest.approx(2 * 2.0**13 * 2 ** (1 / 1000), rel=1e-6)
    assert s.scales[1].item() == pytest.approx(2 * 2.0**13 / math.sqrt(2), rel=1e-6)
    # Inside the 125-update window a further overflow does not divide again (and does not grow).
    before = s.scales[1].item()
    for _ in range(amp.WINDOW):
        s.update(torch.tensor([False, True, False]))
        assert s.scales[1].item() == before
    # The window is over: the next overflow divides.
    s.update(torch.tensor([False, True, False]))
    assert s.scales[1].item() == pytest.approx(before / math.sqrt(2), rel=1e-6)


def test_scale_window_counts_clean_updates_too():
    s = ResblockGradScaler(1)
    s.update(torch.tensor([True]))
    after_div = s.scales[0].item()
    for _ in range(amp.WINDOW - 1):
        s.update(torch.tensor([False]))
    s.update(torch.tensor([True]))  # 125th update after the division: still blocked
    blocked = s.scales[0].item()
    assert blocked == pytest.approx(after_div * 2 ** ((amp.WINDOW - 1) / 1000), rel=1e-5)
    s.update(torch.tensor([True]))  # 126th: divides
    assert s.scales[0].item() == pytest.approx(blocked / math.sqrt(2), rel=1e-6)


def test_scale_clamps():
    s = ResblockGradScaler(2, replicas=4)
    s.scales.copy_(torch.tensor([4 * 2.0**7, 4 * 2.0**24]))
    s.update(torch.tensor([True, False]))
    assert s.scales.tolist() == [4 * 2.0**7, 4 * 2.0**24]


def test_scale_update_bit_exact_over_a_random_run():
    g = torch.Generator().manual_seed(1)
    s = ResblockGradScaler(16, replicas=3)
    scales, cooldown = s.scales.clone(), s.cooldown.clone()
    for _ in range(600):
        found = torch.rand(16, generator=g) < 0.05
        s.update(found)
        amp.scale_update_reference(scales, cooldown, found, s.min_scale, s.max_scale)
        assert _bits_equal(s.scales, scales) and torch.equal(s.cooldown, cooldown)


def test_adamw_step_bit_exact_and_skips_blocks():
    torch.manual_seed(0)
    # 70001 elements: enough that an fp32 sqrt which is not correctly rounded shows up.
    shapes = [(17,), (300, 7), (64,), (5, 5), (70001,)]
    dts = [torch.float32, torch.bfloat16, torch.float32, torch.float16, torch.float32]
    params = [torch.randn(s).to(d) for s, d in zip(shapes, dts, strict=True)]
    grads = [torch.randn(s).to(d) for s, d in zip(shapes, dts, strict=True)]
    ms = [torch.randn(s).abs() * 0.1 for s in shapes]
    vs = [torch.randn(s).abs() * 0.01 for s in shapes]
    grads[4][:500] *= 1e-21  # subnormal g^2 (1 - beta2) and second moments: no flush to zero
    vs[4][:1000] = torch.rand(1000) * 1e-38
    blocks = [0, 1, 1, 2, 2]
    found = torch.tensor([False, True, False])
    step_size = torch.tensor([1e-3, 2e-3, 3e-4])
    bc2 = torch.tensor([0.3, 0.5, 0.9])
    decay = torch.tensor([0.9999, 0.99, 1.0])
    ref = [copy.deepcopy(x) for x in (params, grads, ms, vs)]
    torch.ops.dalle_fast.adamw_step_(params, grads, ms, vs, blocks, found, step_size, bc2, decay, 0.9, 0.96, 1e-8)
    amp.adamw_step_reference(*ref, blocks, found, step_size, bc2, decay, 0.9, 0.96, 1e-8)
    for a, b in zip(params + ms + vs, ref[0] + ref[2] + ref[3], strict=True):
        assert _bits_equal(a, b)
    assert (vs[4][:500] != 0).all() and (vs[4][:500] < torch.finfo(torch.float32).tiny).all()
    # Block 1 overflowed: its tensors are untouched.
    assert torch.equal(params[1], ref[0][1]) and torch.equal(ms[1], ref[2][1])


class Branch(nn.Module):
    def __init__(self, width, gain=1.0, half=False, gradient_only=False):
        super().__init__()
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)
        self.gain, self.half, self.gradient_only = gain, half, gradient_only

    def forward(self, x):
        if self.half:  # fp16 activations, fp32 parameters (as under autocast)
            h = torch.tanh(nn.functional.linear(x.half(), self.fc1.weight.half(), self.fc1.bias.half()))
            y = nn.functional.linear(h, self.fc2.weight.half(), self.fc2.bias.half())
        else:
            y = self.fc2(torch.tanh(self.fc1(x)))
        if self.gradient_only:  # adds nothing forward, but its gradients are scaled by the gain
            y = y - y.detach()
        return (y * self.gain).float()


class Inject(torch.autograd.Function):
    """Identity forward; backward turns the gradient into Inf/NaN (a simulated overflow)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * float("inf")


class Poisoned(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(Inject.apply(x))


def make_model(scaler, n=4, width=8, poison=None):
    torch.manual_seed(0)
    branches = [Branch(width) for _ in range(n)]
    if poison is not None:
        branches[poison] = Poisoned(branches[poison])
    return nn.Sequential(nn.Linear(width, width), *[scaler.residual(b, i) for i, b in enumerate(branches)])


def test_scaled_residual_matches_plain_gradients():
    scaler = ResblockGradScaler(4)
    model = make_model(scaler)
    x = torch.randn(5, 8)
    model(x).square().sum().backward()
    scaled = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    plain = nn.Sequential(model[0], *[_Plain(m.branch) for m in model[1:]])  # same parameters, no scaling
    plain(x).square().sum().backward()
    for n, p in model.named_parameters():
        # model[0] is outside every resblock (unscaled); model[i] is resblock i - 1.
        s = 1.0 if n.startswith("0.") else scaler.scales[int(n.split(".")[0]) - 1].item()
        # Branch gradients arrive scaled by exactly 2^13 (a power of two: no rounding anywhere).
        torch.testing.assert_close(scaled[n], p.grad * s, rtol=0, atol=0)


class _Plain(nn.Module):
    def __init__(self, branch):
        super().__init__()
        self.branch = branch

    def forward(self, x):
        return x + self.branch(x)


def test_overflow_in_one_block_skips_exactly_that_block():
    scaler = ResblockGradScaler(4)
    model = make_model(scaler, poison=2)
    opt = BlockAdamW(scaler.param_groups(model), scaler, lr=1e-2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    scales_before = scaler.scales.clone()
    model(torch.randn(5, 8)).square().sum().backward()
    scaler.unscale_(opt)
    assert scaler.found_inf.tolist() == [False, False, True, False, False]
    opt.step()
    scaler.update()
    for n, p in model.named_parameters():
        in_block2 = n.startswith("3.")  # Sequential index 3 is resblock 2
        assert torch.equal(p, before[n]) == in_block2, n
    assert scaler.scales[2].item() == pytest.approx(scales_before[2].item() / math.sqrt(2), rel=1e-6)
    for b in (0, 1, 3):
        assert scaler.scales[b].item() == pytest.approx(scales_before[b].item() * 2 ** (1 / 1000), rel=1e-6)
    assert not scaler.found_inf.any()
    assert opt.block_steps.tolist() == [1.0, 1.0, 0.0, 1.0, 1.0]


def test_block_adamw_matches_torch_adamw_without_overflow():
    scaler = ResblockGradScaler(4)
    model = make_model(scaler)
    ref = copy.deepcopy(model)
    opt = BlockAdamW(scaler.param_groups(model), scaler, lr=1e-2, betas=(0.9, 0.96), weight_decay=0.1)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, betas=(0.9, 0.96), weight_decay=0.1)
    for step in range(3):
        x = torch.randn(5, 8, generator=torch.Generator().manual_seed(step))
        model(x).square().sum().backward()
        scaler.unscale_(opt)
        opt.step()
        scaler.update()
        opt.zero_grad()
        ref(x).square().sum().backward()
        ref_opt.step()
        ref_opt.zero_grad()
    for a, b in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_state_dict_round_trip():
    scaler = ResblockGradScaler(3, replicas=2)
    model = make_model(scaler, n=3, poison=1)
    opt = BlockAdamW(scaler.param_groups(model), scaler)
    model(torch.randn(2, 8)).sum().backward()
    scaler.unscale_(opt)
    opt.step()
    scaler.update()
    s2 = ResblockGradScaler(3, replicas=2)
    s2.load_state_dict(scaler.state_dict())
    assert torch.equal(s2.scales, scaler.scales) and torch.equal(s2.cooldown, scaler.cooldown)
    opt2 = BlockAdamW(scaler.param_groups(model), s2)  # same groups, resumed scaler
    opt2.load_state_dict(opt.state_dict())
    assert torch.equal(opt2.block_steps, opt.block_steps)
    with pytest.raises(ValueError, match="num_blocks"):
        ResblockGradScaler(4, replicas=2).load_state_dict(scaler.state_dict())


def _with_grad(dtype):
    p = torch.ones(3, dtype=dtype, requires_grad=True)
    p.grad = torch.ones_like(p)
    return p


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: ResblockGradScaler(0), "num_blocks"),
        (lambda: ResblockGradScaler(2, replicas=0), "replicas"),
        (lambda: ResblockGradScaler(2).update(torch.zeros(3, dtype=torch.bool)), "found_inf"),
        (lambda: ResblockGradScaler(2).update(torch.zeros(2)), "found_inf"),
        (lambda: ResblockGradScaler(2).residual(nn.Identity(), 2), "index"),
        (lambda: ResblockGradScaler(2).unscale_([(torch.ones(1, requires_grad=True), 5)]), "block"),
        (lambda: ResblockGradScaler(2).unscale_([(_with_grad(torch.float16), 0)]), "float16"),
    ],
)
def test_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_kernels_reject_bad_input():
    scales = torch.ones(3)
    with pytest.raises(RuntimeError, match="block"):
        torch.ops.dalle_fast.grad_scale(torch.ones(4), scales, 3)
    with pytest.raises(RuntimeError, match="found_inf"):
        torch.ops.dalle_fast.grad_unscale_filter(torch.ones(4), scales, 0, torch.zeros(3))
    with pytest.raises(RuntimeError, match="blocks"):
        torch.ops.dalle_fast.multi_unscale_check_([torch.ones(2)], [0, 1], scales, torch.zeros(3, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="grads"):
        torch.ops.dalle_fast.multi_unscale_check_(
            [torch.ones(2, dtype=torch.int64)], [0], scales, torch.zeros(3, dtype=torch.bool)
        )


def test_opcheck():
    scales = torch.tensor([8.0, 2.0])
    found = torch.zeros(2, dtype=torch.bool)
    g = torch.randn(33)
    torch.library.opcheck(torch.ops.dalle_fast.grad_scale.default, (g, scales, 1))
    torch.library.opcheck(torch.ops.dalle_fast.grad_unscale_filter.default, (g, scales, 0, found))
    torch.library.opcheck(
        torch.ops.dalle_fast.multi_unscale_check_.default, ([torch.randn(5), torch.randn(3)], [0, 1], scales, found)
    )
    torch.library.opcheck(
        torch.ops.dalle_fast.resblock_scale_update_.default,
        (scales.clone(), torch.zeros(2, dtype=torch.int32), found, amp.GROWTH, amp.BACKOFF, 125, 1.0, 1e9),
    )


def test_per_resblock_scaling_keeps_gradients_that_one_loss_scale_loses():
    """A deep narrow fp16 model: block 0's branch has a huge gain (its gradients overflow at any scale
    above a few), the others tiny gains (their fp16 activation gradients need a large scale). With one
    loss scale (the largest that does not overflow) the small blocks' gradients underflow to zero;
    with per-resblock scales they survive."""
    n, width = 24, 8
    gains = [3e3] + [4e-9] * (n - 1)

    def build(scaler=None):
        torch.manual_seed(0)
        branches = [Branch(width, gain=g, half=True, gradient_only=i == 0) for i, g in enumerate(gains)]
        if scaler is None:
            return nn.Sequential(*[_Plain(b) for b in branches])
        return nn.Sequential(*[scaler.residual(b, i) for i, b in enumerate(branches)])

    x = torch.randn(16, width, generator=torch.Generator().manual_seed(1)) * 0.1

    def zero_fraction(model):
        grads = [p.grad for blk in list(model)[1:] for p in blk.branch.fc1.parameters()]
        return sum(int((g == 0).sum()) for g in grads) / sum(g.numel() for g in grads)

    # One loss scale: the largest power of two whose backward has no Inf/NaN anywhere.
    best = None
    for k in range(0, 25):
        model = build()
        (model(x).sum() * 2.0**k).backward()
        if all(torch.isfinite(p.grad).all() for p in model.parameters()):
            best = (k, zero_fraction(model))
    assert best is not None
    k_global, zeros_global = best

    scaler = ResblockGradScaler(n)
    model = build(scaler)
    model(x).sum().backward()
    scaler.unscale_([(p, i) for i, blk in enumerate(model) for p in blk.branch.parameters()])
    zeros_block = zero_fraction(model)
    assert bool(scaler.found_inf[0])  # block 0 overflowed at 2^13: it alone is skipped and backs off
    assert not scaler.found_inf[1:].any()
    print(
        f"\nzero gradients in the small blocks: one loss scale (2^{k_global}) {zeros_global:.1%}, "
        f"per-resblock scales {zeros_block:.1%}"
    )
    assert zeros_global > 0.5
    assert zeros_block < 0.05


def test_the_scale_lifts_the_gradient_before_it_meets_fp16():
    """Under fp16 autocast a branch returns fp16 into the fp32 residual stream. The block's scale must
    multiply the stream's gradient while it is fp32: a gradient below fp16's range (1e-8 per element)
    reaches the branch's parameters scaled by 2^13, not flushed to zero, and unscale_ recovers it."""

    class HalfBranch(nn.Module):  # fp16 compute and output, fp32 parameters: what autocast does
        def __init__(self, width):
            super().__init__()
            self.fc = nn.Linear(width, width)

        def forward(self, x):
            return nn.functional.linear(x.half(), self.fc.weight.half(), self.fc.bias.half())

    torch.manual_seed(0)
    x = torch.randn(8, 16)
    scaler = ResblockGradScaler(1)
    branch = HalfBranch(16)
    (scaler.residual(branch, 0)(x) * 1e-8).sum().backward()
    scaler.unscale_([(p, 0) for p in branch.parameters()])
    assert not scaler.found_inf.any()
    ref = nn.Linear(16, 16)
    ref.load_state_dict(branch.fc.state_dict())
    (ref(x) * 1e-8).sum().backward()  # fp32 throughout
    assert (branch.fc.weight.grad != 0).float().mean() > 0.99
    torch.testing.assert_close(branch.fc.weight.grad, ref.weight.grad, rtol=2e-2, atol=1e-12)
    torch.testing.assert_close(branch.fc.bias.grad, ref.bias.grad, rtol=2e-2, atol=1e-12)


# ---- CUDA (skipped without a GPU) ---------------------------------------------------------------------

cuda = pytest.mark.skipif(
    not (
        torch.cuda.is_available()
        and torch._C._dispatch_has_kernel_for_dispatch_key("dalle_fast::multi_unscale_check_", "CUDA")
    ),
    reason="no CUDA kernels",
)


@cuda
@pytest.mark.cuda
def test_cuda_kernels_match_cpu_kernels():
    """The CUDA kernels use round-to-nearest intrinsics throughout (no contraction, exact reciprocal,
    no flush of subnormals), so they agree with the CPU kernels bit for bit, down to subnormal results."""
    torch.manual_seed(0)
    grads = [_poison(torch.randn(70001) * 100), torch.randn(300).half(), torch.randn(5).bfloat16()]
    grads.append(torch.randn(2000) * 1e-36)  # unscaled by 1536: subnormal fp32
    blocks, scales = [0, 1, 2, 1], torch.tensor([2.0**13, 3 * 2.0**9, 2.0**7])
    found_c, found_g = torch.zeros(3, dtype=torch.bool), torch.zeros(3, dtype=torch.bool, device="cuda")
    gc = [g.clone() for g in grads]
    gg = [g.cuda() for g in grads]
    torch.ops.dalle_fast.multi_unscale_check_(gc, blocks, scales, found_c)
    torch.ops.dalle_fast.multi_unscale_check_(gg, blocks, scales.cuda(), found_g)
    for a, b in zip(gc, gg, strict=True):
        torch.testing.assert_close(a, b.cpu(), rtol=0, atol=0, equal_nan=True)
    assert (gc[3] != 0).sum() > 1900 and (gc[3].abs() < torch.finfo(torch.float32).tiny).all()
    assert found_c.tolist() == found_g.cpu().tolist() == [True, False, False]
    g = torch.randn(4099).half()
    torch.testing.assert_close(
        torch.ops.dalle_fast.grad_scale(g.cuda(), scales.cuda(), 1).cpu(), torch.ops.dalle_fast.grad_scale(g, scales, 1)
    )
    s_c = ResblockGradScaler(8)
    s_g = ResblockGradScaler(8, device="cuda")
    gen = torch.Generator().manual_seed(0)
    for _ in range(300):
        f = torch.rand(8, generator=gen) < 0.1
        s_c.update(f)
        s_g.update(f.cuda())
    assert torch.equal(s_c.scales, s_g.scales.cpu()) and torch.equal(s_c.cooldown, s_g.cooldown.cpu())


@cuda
@pytest.mark.cuda
def test_cuda_adamw_step_matches_cpu_kernel_bit_for_bit():
    """Also where the second moment decays into subnormals, as it does for a parameter whose gradient
    has stayed near zero for thousands of steps."""
    torch.manual_seed(0)
    shapes, dts = [(70001,), (300, 7), (33,)], [torch.float32, torch.bfloat16, torch.float16]
    params = [torch.randn(s).to(d) for s, d in zip(shapes, dts, strict=True)]
    grads = [torch.randn(s).to(d) for s, d in zip(shapes, dts, strict=True)]
    grads[0][:1000] *= 1e-21  # g^2 (1 - beta2) is subnormal
    ms = [torch.randn(s).abs() * 0.1 for s in shapes]
    vs = [torch.randn(s).abs() * 0.01 for s in shapes]
    vs[0][:2000] = torch.rand(2000) * 1e-38  # subnormal second moments
    args = ([0, 1, 1], torch.tensor([False, True]), torch.tensor([1e-3, 2e-3]), torch.tensor([0.3, 0.5]))
    args += (torch.tensor([0.9999, 0.99]), 0.9, 0.96, 1e-8)
    on_gpu = [[t.cuda() for t in group] for group in (params, grads, ms, vs)]
    torch.ops.dalle_fast.adamw_step_(*on_gpu, args[0], *[a.cuda() for a in args[1:5]], *args[5:])
    torch.ops.dalle_fast.adamw_step_(params, grads, ms, vs, *args)
    for a, b in zip(params + ms + vs, on_gpu[0] + on_gpu[2] + on_gpu[3], strict=True):
        assert _bits_equal(a, b.cpu())
    assert (vs[0][:1000] != 0).all() and (vs[0][:1000] < torch.finfo(torch.float32).tiny).all()


@cuda
@pytest.mark.cuda
def test_cuda_training_step_has_no_host_sync():
    scaler = ResblockGradScaler(4, device="cuda")
    model = make_model(scaler, poison=1).cuda()
    opt = BlockAdamW(scaler.param_groups(model), scaler, lr=1e-2)
    for _ in range(2):  # the first step uploads hyperparameters; both must be sync-free
        model(torch.randn(5, 8, device="cuda")).square().sum().backward()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            scaler.unscale_(opt)
            opt.step()
            scaler.update()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        opt.zero_grad()
    assert opt.block_steps.tolist() == [2.0, 0.0, 2.0, 2.0, 2.0]
