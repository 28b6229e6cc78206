"""The CUDA kernels of csrc/cuda/, run on the CPU under the host emulator in csrc/testing/cuda_emulator/.

The .cu files are compiled unchanged with g++ against that emulator of the CUDA execution model (a fiber
per CUDA thread, real barriers, warp collectives, per-block shared memory) and called through the same
launchers the torch glue calls. So on a machine without a GPU these tests execute the kernels' own index
arithmetic, masking, online softmax, tile loads and stores, and multi-tensor bookkeeping, and compare the
results with the fp32 references (attention) or bit for bit with the references (gradient scaling).
They also run kernels under eight thread schedules and require identical bits (a race, or any order
dependence, changes them), poison shared memory before each block, fence inputs and outputs with guard
values, and hold the kernels to sm_80's shared-memory limit.

They do not replace the GPU runbook (benchmarks/gpu_runbook.sh): timing, the hardware's tensor-core
fragment layouts and rounding, and compute-sanitizer need a real GPU. Skipped when g++ or the CUDA
headers (cuda_fp16.h, from a toolkit or torch's nvidia-* wheels) are missing.
"""

import ctypes
import itertools
import os
import platform
import shutil
import site
import subprocess
from pathlib import Path

import pytest
import torch
from test_sparse_attention import delta_error_bound

from dalle_fast import MASK_KINDS, block_sparse_attention, sparse_attention_reference
from dalle_fast.ops import grad_scaling as amp
from dalle_fast.ops.attention import sparse_attention_decode
from dalle_fast.ops.masks import attention_mask
from dalle_fast.ops.support import CUDA_HEAD_DIMS

ROOT = Path(__file__).resolve().parents[1]
EMU = ROOT / "csrc" / "testing" / "cuda_emulator"
KERNELS = ["attention_fwd.cu", "attention_bwd.cu", "decode.cu", "grad_scaling.cu"]
KIND_ID = {"causal": 0, "row": 1, "column": 2, "conv": 3}
ATTN_DTYPE_ID = {torch.float16: 0, torch.bfloat16: 1}
FLOAT_KIND = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # FloatKind and DecodeDType
# Thread schedules of the emulator: 0 to 3 run warps one at a time, ascending (0, 2) or descending (1, 3),
# with cp.async copies landing at their issue (0, 3) or at their wait (1, 2); n >= 4 interleaves warps
# in random bursts seeded with n, landing copies at their wait when n is odd.
SCHEDULES = [0, 1, 2, 3, 4, 5, 6, 7]
CUDA_ERROR = {"invalid value": 1, "illegal address": 700, "misaligned address": 716, "launch failure": 719}
SM80_SMEM_OPTIN = 166912  # bytes of shared memory per block an A100 (sm_80) allows
SM86_SMEM_OPTIN = 101376  # ... an RTX 3090 / 4090 (sm_86, sm_89): 99 KiB
GUARD = 64  # elements of guard before and after every buffer handed to a kernel


def _cuda_include():
    """A folder with cuda_fp16.h and the runtime headers it includes, or None."""
    candidates = [Path(os.environ[v]) / "include" for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(Path(nvcc).resolve().parents[1] / "include")
    candidates.append(Path("/usr/local/cuda/include"))
    for sp in site.getsitepackages():
        candidates += sorted(Path(sp).glob("nvidia/*/include"))
    need = ("cuda_fp16.h", "cuda_bf16.h", "driver_types.h", "cuda_runtime_api.h", "vector_types.h")
    return next((c for c in candidates if all((c / n).exists() for n in need)), None)


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    return _build_emulator(tmp_path_factory)


def _build_emulator(tmp_path_factory, *defines):
    include, cxx = _cuda_include(), shutil.which("g++")
    if include is None or cxx is None:
        pytest.skip("the CUDA emulator needs g++ and the CUDA headers (cuda_fp16.h)")
    lib = tmp_path_factory.mktemp("cuda_emulator") / "libdalle_fast_cuda_emu.so"
    cmd = [
        cxx, "-std=c++20", *defines, "-O2", "-ffp-contract=off", "-fPIC", "-shared", "-Wall", "-Wno-unknown-pragmas",
        # CUDA code reads and writes through reinterpreted pointers (uint4 tile loads, packed stores),
        # which nvcc honours; g++ would optimise them away under strict aliasing.
        "-fno-strict-aliasing",
        # Misaligned accesses and indices past fixed-size arrays trap (the emulator reports the trap as a
        # launch failure); large frames probe the thread stack's guard page instead of jumping past it.
        "-fsanitize=alignment,bounds", "-fsanitize-undefined-trap-on-error", "-fstack-clash-protection",
        # The fiber switch returns onto other stacks, which a CET shadow stack forbids: do not mark the
        # library shadow-stack compatible (some toolchains do by default).
        "-fcf-protection=none",
        # Bind the library's calls to its own cudaGetLastError, not the real runtime torch has loaded.
        "-Wl,-Bsymbolic",
        f"-I{EMU / 'include'}", f"-I{include}", "-include", str(EMU / "cuda_emu.h"),
        "-x", "c++", *[str(ROOT / "csrc" / "cuda" / k) for k in KERNELS], str(EMU / "selftest.cu"),
        "-x", "none", str(ROOT / "csrc" / "layout.cpp"), str(ROOT / "csrc" / "cuda" / "host_setup.cpp"),
        str(EMU / "cuda_emu.cpp"), str(EMU / "emu_api.cpp"),
        "-o", str(lib),
    ]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, "building the emulated kernels failed:\n" + res.stderr[-6000:]
    return Emulator(ctypes.CDLL(str(lib)))


class Emulator:
    """ctypes wrappers of emu_api.cpp; every call checks the launch and returns torch tensors."""

    def __init__(self, lib):
        self.lib = lib
        lib.emu_last_error.restype = ctypes.c_char_p
        lib.emu_forward_smem_bytes.restype = ctypes.c_size_t
        lib.emu_backward_smem_bytes.restype = ctypes.c_size_t
        lib.emu_backward_smem_bytes.argtypes = [ctypes.c_int32, ctypes.c_size_t]
        lib.emu_last_block_threads.restype = ctypes.c_longlong
        lib.emu_fibers.restype = ctypes.c_char_p
        lib.emu_launches_as_described.restype = ctypes.c_int64
        self.schedule(0)
        lib.emu_set_smem_optin(ctypes.c_longlong(SM80_SMEM_OPTIN))

    def schedule(self, schedule):
        self.lib.emu_set_schedule(schedule)

    def check(self, rc, what):
        """The call succeeded, and launched exactly what host_setup.h's launch description (which the NVRTC
        backend launches from) says for it: the same kernels' shapes, in the same order."""
        assert rc == 0, f"{what}: cudaError {rc}: {self.lib.emu_last_error().decode()}"
        first = self.lib.emu_launches_as_described()
        assert first == -1, f"{what}: launch {first} differs from host_setup.h's description of the call"

    def forward(self, q, k, v, kind, text_len, image_size, kernel_size, scale):
        b, h, n, d = q.shape
        out, lse = _output(q.shape, q.dtype), _output((b, h, n), torch.float32)
        rc = self.lib.emu_attention_forward(
            KIND_ID[kind], _i64(text_len), _i64(image_size), _i64(kernel_size), ATTN_DTYPE_ID[q.dtype], _i64(b * h),
            d, ctypes.c_float(scale), *_ptrs(_input(q), _input(k), _input(v), out, lse),
        )  # fmt: skip
        self.check(rc, "forward")
        return _unguard(out), _unguard(lse)

    def backward(self, grad_out, q, k, v, out, lse, kind, text_len, image_size, kernel_size, scale):
        b, h, n, d = q.shape
        delta = _output((b, h, n), torch.float32)  # rowsum(dO * O), the backward's first kernel writes it
        dq, dk, dv = (_output(q.shape, q.dtype) for _ in range(3))
        rc = self.lib.emu_attention_backward(
            KIND_ID[kind], _i64(text_len), _i64(image_size), _i64(kernel_size), ATTN_DTYPE_ID[q.dtype], _i64(b * h),
            d, ctypes.c_float(scale),
            *_ptrs(_input(q), _input(k), _input(v), _input(grad_out), _input(out), _input(lse), delta, dq, dk, dv),
        )  # fmt: skip
        self.check(rc, "backward")
        want = (grad_out.float() * out.float()).sum(-1)
        torch.testing.assert_close(_unguard(delta), want, atol=1e-4, rtol=1e-5, equal_nan=True)
        return _unguard(dq), _unguard(dk), _unguard(dv)

    def decode(self, q, k, v, kind, text_len, image_size, position, kernel_size, scale, splits=1):
        b, h, n, d = k.shape
        out = _output(q.shape, q.dtype)
        rc = self.lib.emu_attention_decode(
            KIND_ID[kind], _i64(text_len), _i64(image_size), _i64(kernel_size), _i64(position), FLOAT_KIND[q.dtype],
            _i64(b * h), n, d, ctypes.c_float(scale), *_ptrs(_input(q), _input(k), _input(v), out), splits,
        )  # fmt: skip
        self.check(rc, "decode")
        return _unguard(out)


def _i64(x):
    return ctypes.c_int64(x)


def _ptrs(*tensors):
    """Pointer arguments; each holds its tensor, so a temporary (a guarded copy) lives through the call."""
    ptrs = []
    for t in tensors:
        ptr = ctypes.c_void_p(t.data_ptr())
        ptr.tensor = t
        ptrs.append(ptr)
    return ptrs


# Buffers handed to a kernel sit inside a larger one: inputs between NaN guards (a read outside the
# tensor poisons the result), outputs between sentinel guards (a write outside it is caught).
_SENTINEL = -12345.0


def _guarded(t, fill):
    buf = torch.full((GUARD + t.numel() + GUARD,), fill, dtype=t.dtype)
    view = buf[GUARD : GUARD + t.numel()].view(t.shape)
    view.copy_(t)
    view._guard_buf = buf
    return view


def _input(t):
    return _guarded(t.detach().contiguous(), float("nan"))


def _output(shape, dtype):
    return _guarded(torch.full(shape, float("nan"), dtype=dtype), _SENTINEL)


def _unguard(view):
    buf = view._guard_buf
    assert (buf[:GUARD] == _SENTINEL).all() and (buf[-GUARD:] == _SENTINEL).all(), "a write outside the output"
    return view.clone()


def _bits(t):
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


def _same_bits(a, b):
    """Bit for bit equal, except that NaNs need only be NaN in both (their payloads may differ)."""
    nan = a.isnan()
    return torch.equal(nan, b.isnan()) and torch.equal(_bits(a)[~nan], _bits(b)[~nan])


# ---- the emulator catches what it claims to catch ------------------------------------------------------


def _selftest(emu, which, schedule=0):
    out = torch.arange(64, dtype=torch.float32)
    emu.schedule(schedule)
    try:
        rc = emu.lib.emu_selftest(which, ctypes.c_void_p(out.data_ptr()))
    finally:
        emu.schedule(0)
    return rc, emu.lib.emu_last_error().decode(), out


# selftest.cu: the fault each deliberately faulty kernel has, and what the emulator must say of it.
FAULTS = {
    1: ("launch failure", "barrier divergence: 32 threads wait at __syncthreads but 32 have exited"),
    2: ("launch failure", "warp divergence: in warp 0, 16 of 32 lanes wait at a warp collective"),
    3: ("launch failure", "a write outside the block's 256 bytes of dynamic shared memory"),
    7: ("misaligned address", "ldmatrix: a row address is not 16-byte aligned"),
    8: ("illegal address", "ldmatrix: a row address is outside the block's 1024 bytes of shared memory"),
    9: ("launch failure", "lane 0 waits at a shuffle while lane 1 waits at __syncwarp"),
    10: ("launch failure", "a misaligned access or an index past a fixed-size array"),
    11: ("illegal address", "illegal memory access at address 0x40"),
    12: ("launch failure", "a misaligned access or an index past a fixed-size array"),
    13: ("launch failure", "stack overflow"),
    14: ("launch failure", "a full-warp collective (a shuffle) in warp 1, which has only 16 threads"),
    16: ("invalid value", "dynamic shared memory 65536 bytes > the kernel's limit 49152"),
    17: ("invalid value", "cudaFuncSetAttribute asked for 1048576 bytes of dynamic shared memory"),
}
if platform.machine() in ("x86_64", "AMD64"):  # where integer division by zero traps (aarch64 returns 0)
    FAULTS[19] = ("launch failure", "thread 0: integer division by zero")


@pytest.mark.parametrize("which", sorted(FAULTS))
def test_emulator_reports_faults(emu, which):
    error, message = FAULTS[which]
    rc, msg, _ = _selftest(emu, which)
    assert (rc, message in msg) == (CUDA_ERROR[error], True), msg
    # The emulator is whole afterwards: a correct kernel runs, and its error is cleared.
    rc, msg, _ = _selftest(emu, 5)
    assert rc == 0 and msg == ""


@pytest.mark.slow
def test_ucontext_fibers(tmp_path_factory):
    """The portable fiber switch (ucontext, used off x86-64) does what the fast one does: faults are
    reported and the emulator stays whole, collectives and barriers give their results, races show
    through the thread order, and a real kernel meets its reference."""
    emu = _build_emulator(tmp_path_factory, "-DCUDA_EMU_UCONTEXT")
    assert emu.lib.emu_fibers().decode() == "ucontext"
    for which, (error, message) in FAULTS.items():
        rc, msg, _ = _selftest(emu, which)
        assert (rc, message in msg) == (CUDA_ERROR[error], True), (which, msg)
    rc, msg, out = _selftest(emu, 5)
    assert rc == 0 and msg == "" and out.tolist() == _LANE_SUMS_PLUS_OR, msg
    assert not torch.equal(_bits(_selftest(emu, 0, 0)[2]), _bits(_selftest(emu, 0, 1)[2]))
    check_attention(emu, "conv", 37, 7, torch.float16, 64, seed=1)


def test_emulator_poisons_unwritten_shared_memory(emu):
    rc, msg, out = _selftest(emu, 4)
    assert rc == 0 and out.isnan().all(), msg


def test_emulator_exposes_races_through_thread_order(emu):
    results = [_selftest(emu, 0, schedule) for schedule in SCHEDULES]
    assert all(rc == 0 for rc, _, _ in results)
    assert not torch.equal(_bits(results[0][2]), _bits(results[1][2]))


def test_emulator_lands_cp_async_early_or_late(emu):
    """A read of a cp.async copy before waiting for it: the copy has landed under some schedules, not
    under others (where the read sees the poison)."""
    results = [_selftest(emu, 6, schedule) for schedule in SCHEDULES]
    assert all(rc == 0 for rc, _, _ in results)
    landed = [torch.equal(out, torch.arange(64.0) % 16 * 4) for _, _, out in results]
    poisoned = [bool(out.isnan().all()) for _, _, out in results]
    assert all(a != b for a, b in zip(landed, poisoned, strict=True)) and any(landed) and any(poisoned)


# selftest 5: each thread's warp sum (butterfly shuffles) plus 1000 for the block-wide OR.
_LANE_SUMS_PLUS_OR = [sum(range(32 * (i // 32), 32 * (i // 32) + 32)) + 1000.0 for i in range(64)]


def test_emulator_collectives(emu):
    rc, msg, out = _selftest(emu, 5)
    assert rc == 0, msg
    assert out.tolist() == _LANE_SUMS_PLUS_OR
    # shfl.sync.bfly: lane ^ 1 is a neighbour; lane ^ 32 is past the warp, so each lane keeps its value.
    rc, msg, out = _selftest(emu, 15)
    assert rc == 0, msg
    assert out.tolist() == [(i ^ 1) + 1000.0 * i for i in range(64)]


@pytest.mark.parametrize("which", [20, 21])
def test_emulator_fragment_layouts_follow_the_ptx_isa(emu, which):
    """selftest 20: ldmatrix .x4, plain and .trans; 21: mma.m16n8k16 with fp16 and bf16 inputs. Their
    kernels place and read elements by the PTX ISA's fragment tables, written element by element and
    independently of the emulator's (and the attention kernels') index arithmetic: a misreading of the
    tables shared by the emulator and the kernels would fail here, not only on a GPU."""
    rc, msg, out = _selftest(emu, which)
    assert rc == 0, msg
    assert out.tolist() == [0.0] * 64, out


def test_emulator_enforces_shared_memory_limits(emu):
    rc, msg, out = _selftest(emu, 18)  # 64 KiB after cudaFuncSetAttribute
    assert rc == 0 and (out == 1).all(), msg
    emu.lib.emu_set_smem_optin(ctypes.c_longlong(40 * 1024))  # the forward at head dim 128 needs 85 KiB
    try:
        q = torch.randn(1, 1, 30, 128, generator=torch.Generator().manual_seed(0), dtype=torch.float16)
        with pytest.raises(AssertionError, match="cudaFuncSetAttribute asked for"):
            emu.forward(q, q, q, "row", 5, 5, 11, 0.1)
    finally:
        emu.lib.emu_set_smem_optin(ctypes.c_longlong(SM80_SMEM_OPTIN))


# ---- sparse attention: forward and backward ---------------------------------------------------------------


def _reference_and_plain(q, k, v, grad, kind, T, W, kernel_size, scale):
    """(fp32 reference, plain low-precision PyTorch) values and gradients, in kernel order."""
    results = []
    for upcast in (True, False):
        xs = [(t.float() if upcast else t).detach().requires_grad_() for t in (q, k, v)]
        out = sparse_attention_reference(
            *xs, kind, T, W, kernel_size, scale, upcast=upcast, transposed=kind == "column"
        )
        results.append((out, *torch.autograd.grad(out, xs, grad.float() if upcast else grad)))
    return results


def _max_err(a, b):
    return (a.float() - b.float()).abs().max().item()


def check_attention(emu, kind, T, W, dtype, head_dim, kernel_size=11, batch=1, heads=2, seed=0, scale=None):
    g = torch.Generator().manual_seed(seed)
    n = T + W * W
    q, k, v, grad = (torch.randn(batch, heads, n, head_dim, generator=g).to(dtype) for _ in range(4))
    scale = head_dim**-0.5 if scale is None else scale
    out, lse = emu.forward(q, k, v, kind, T, W, kernel_size, scale)
    dq, dk, dv = emu.backward(grad, q, k, v, out, lse, kind, T, W, kernel_size, scale)
    (ref, *ref_grads), (plain, *plain_grads) = _reference_and_plain(q, k, v, grad, kind, T, W, kernel_size, scale)
    # tests/test_sparse_attention.py's low-precision rule: twice plain PyTorch's error, plus for dq and dk
    # what the kernels' delta = rowsum(dO * out) explains (these kernels compute it the same way).
    mask = attention_mask(kind, T, W, kernel_size, transposed=kind == "column")
    bounds = dict(zip(("dq", "dk"), delta_error_bound(q, k, v, grad, out, mask, scale), strict=True))
    for name, a, b, p in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv), (ref, *ref_grads), (plain, *plain_grads),
                             strict=True):  # fmt: skip
        assert a.dtype == dtype and torch.isfinite(a).all(), name
        allowed = 2 * _max_err(p, b) + 1e-5 + bounds.get(name, 0.0)
        err = (a.double() - b.double()).abs()
        assert (err <= allowed).all(), f"{name}: kernel {_max_err(a, b)} vs plain {_max_err(p, b)}"
    # lse against the CPU kernel's, computed in fp32 from the same (rounded) inputs.
    _, lse_cpu = torch.ops.dalle_fast.sparse_attention_fwd(q.float(), k.float(), v.float(), kind, T, W, kernel_size,
                                                           scale)  # fmt: skip
    torch.testing.assert_close(lse, lse_cpu, atol=2e-3, rtol=1e-3)
    return out, lse, dq, dk, dv


@pytest.mark.parametrize("head_dim", CUDA_HEAD_DIMS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", MASK_KINDS)
def test_attention_matches_reference(emu, kind, dtype, head_dim):
    # 37 + 7 x 7 = 86 tokens: a full and a partial 64-row block, text ending mid-block.
    check_attention(emu, kind, 37, 7, dtype, head_dim)


@pytest.mark.parametrize("scale", [-0.3, 0.0, 1.7])
@pytest.mark.parametrize("kind", MASK_KINDS)
def test_attention_any_scale(emu, kind, scale):
    # The forward keeps raw scores and folds |scale| into the exponential: a negative scale negates Q's
    # fragments, a zero one must still give uniform weights over the visible keys.
    check_attention(emu, kind, 37, 7, torch.float16, 64, scale=scale, seed=3)


@pytest.mark.parametrize("head_dim", [32, 64])
@pytest.mark.parametrize("kind", MASK_KINDS)
def test_forward_rows_per_warp_variants_agree(emu, kind, head_dim, monkeypatch):
    """The forward's two warp layouts (2 warps of 32 rows, the default up to head dim 64; 4 warps of 16)
    do the same arithmetic per row, so they agree bit for bit; the 4-warp one also meets the reference."""
    results = []
    for rows, threads in (("32", 64), ("16", 128)):
        monkeypatch.setenv("DALLE_FAST_FWD_ROWS_PER_WARP", rows)
        results.append(check_attention(emu, kind, 37, 7, torch.float16, head_dim, seed=head_dim)[:2])
        q = torch.zeros(1, 1, 86, head_dim, dtype=torch.float16)
        emu.forward(q, q, q, kind, 37, 7, 11, 1.0)
        assert emu.lib.emu_last_block_threads() == threads
    for a, b in zip(*results, strict=True):
        assert torch.equal(_bits(a), _bits(b))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("T,W", [(0, 5), (1, 9), (64, 8), (130, 12)])
@pytest.mark.parametrize("kind", MASK_KINDS)
def test_attention_odd_and_sparse_shapes(emu, kind, T, W, dtype):
    # 130 + 144 = 274 tokens: 5 blocks, where the row, column and conv layouts skip blocks. fp16's finer
    # rounding makes the 2x rule the tighter check; bf16 covers the other instantiation.
    check_attention(emu, kind, T, W, dtype, 64, kernel_size=5 if W == 12 else 11, seed=T)


@pytest.mark.slow
@pytest.mark.parametrize("kind", MASK_KINDS)
def test_attention_paper_shape(emu, kind):
    # 256 text tokens + 32 x 32 image tokens, head dim 64: the layouts of the paper's model.
    check_attention(emu, kind, 256, 32, torch.bfloat16, 64, heads=1)


@pytest.mark.parametrize("head_dim", CUDA_HEAD_DIMS)
@pytest.mark.parametrize("kind", MASK_KINDS)
def test_attention_is_race_free_and_deterministic(emu, kind, head_dim):
    """Bitwise the same results under eight thread schedules. (The kernels use no atomics, so the bits
    depend on the inputs only, if they are race-free.) 20 + 13 x 13 = 189 tokens: three blocks, the last
    of which sees three layout entries in every kind, so every double buffer is refilled while in use.
    Every head dim: each has its own warp layout (2 warps of 32 rows up to 64, 4 of 16 at 128) and, in
    dK/dV, K and V fragments in registers or re-read from shared memory."""
    results = []
    try:
        for schedule in SCHEDULES:
            emu.schedule(schedule)
            results.append(check_attention(emu, kind, 20, 13, torch.float16, head_dim, kernel_size=7, batch=2, heads=1))
    finally:
        emu.schedule(0)
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            assert torch.equal(_bits(a), _bits(b))


@pytest.mark.parametrize("kind", MASK_KINDS)
def test_attention_matches_cpu_kernel(emu, kind):
    """The agreement tests/test_sparse_attention.py asks of the real GPU (test_cuda_deterministic_and_matches_cpu):
    bf16 values and gradients within 3e-2 of the CPU kernel on the same (kernel-order) inputs."""
    T, W, d = 37, 8, 64
    g = torch.Generator().manual_seed(5)
    q, k, v, grad = (torch.randn(2, 3, T + W * W, d, generator=g).to(torch.bfloat16) for _ in range(4))
    xs = [x.clone().requires_grad_() for x in (q, k, v)]
    out_cpu = block_sparse_attention(*xs, kind, T, W)
    cpu = (out_cpu, *torch.autograd.grad(out_cpu, xs, grad))
    out, lse = emu.forward(q, k, v, kind, T, W, 11, d**-0.5)
    got = (out, *emu.backward(grad, q, k, v, out, lse, kind, T, W, 11, d**-0.5))
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, cpu, strict=True):
        torch.testing.assert_close(a.float(), b.float(), atol=3e-2, rtol=3e-2, msg=lambda m, n=name: f"{n}: {m}")


def test_shared_memory_fits_sm80_and_sm86(emu):
    """Every pass fits both per-block limits; the backward double-buffers where it fits, which on a 99 KiB
    GPU is every head dim but 128 (103 KiB double-buffered)."""
    for d in CUDA_HEAD_DIMS:
        assert emu.lib.emu_forward_smem_bytes(d) <= SM86_SMEM_OPTIN
        two = emu.lib.emu_backward_smem_bytes(d, SM80_SMEM_OPTIN)
        assert two <= SM80_SMEM_OPTIN and emu.lib.emu_backward_smem_bytes(d, two) == two
        small = emu.lib.emu_backward_smem_bytes(d, SM86_SMEM_OPTIN)
        assert small <= SM86_SMEM_OPTIN and (small == two) == (d != 128)
        if d == 128:  # one byte short: single-buffered (the smaller head dims fit every sm_80+ GPU)
            assert emu.lib.emu_backward_smem_bytes(d, two - 1) < two


@pytest.mark.parametrize("kind", MASK_KINDS)
def test_single_buffered_backward_on_99_kib_gpus(emu, kind, monkeypatch):
    """Head dim 128 on a GPU allowing 99 KiB per block: the backward runs single-buffered (the emulator
    refuses a launch over the limit), matches the reference, and gives the double-buffered passes' bits
    (the same arithmetic, only the loads move) under every thread schedule. DALLE_FAST_BWD_STAGES=1
    forces it where the double buffers fit, which the GPU tests use."""
    want = check_attention(emu, kind, 20, 13, torch.float16, 128, kernel_size=7, batch=2, heads=1)
    with monkeypatch.context() as m:
        m.setenv("DALLE_FAST_BWD_STAGES", "1")
        forced = check_attention(emu, kind, 20, 13, torch.float16, 128, kernel_size=7, batch=2, heads=1)
    for a, b in zip(want, forced, strict=True):
        assert torch.equal(_bits(a), _bits(b))
    emu.lib.emu_set_smem_optin(ctypes.c_longlong(SM86_SMEM_OPTIN))
    try:
        for schedule in SCHEDULES:
            emu.schedule(schedule)
            got = check_attention(emu, kind, 20, 13, torch.float16, 128, kernel_size=7, batch=2, heads=1)
            for a, b in zip(want, got, strict=True):
                assert torch.equal(_bits(a), _bits(b)), schedule
    finally:
        emu.schedule(0)
        emu.lib.emu_set_smem_optin(ctypes.c_longlong(SM80_SMEM_OPTIN))


# ---- non-finite values: a masked key never affects an output ------------------------------------------------

OPERANDS = ("q", "k", "v", "grad_out")


def _emulated_and_reference(emu, tensors, kind, T, W, scale):
    """(out, dq, dk, dv) of the emulated kernels and of the fp32 reference (kernel order, rounded to the
    inputs' dtype) on tensors = (q, k, v, grad_out)."""
    q, k, v, grad = tensors
    out, lse = emu.forward(q, k, v, kind, T, W, 11, scale)
    got = (out, *emu.backward(grad, q, k, v, out, lse, kind, T, W, 11, scale))
    ref, *ref_grads = _reference_and_plain(q, k, v, grad, kind, T, W, 11, scale)[0]
    return got, tuple(x.to(q.dtype) for x in (ref, *ref_grads))


def check_masked_nonfinite(emu, unreached, kind, T, W, dtype, head_dim, seed=0):
    """tests/test_sparse_attention.py's rule for the CUDA kernels: a NaN or infinity in q, k, v or
    grad_out changes nothing that no visible (query, key) pair links it to, bit for bit (that includes
    the other rows of tiles whose products take the careful path, tile.cuh), and is non-finite where the
    reference is, NaN where it has NaN for a NaN. Positions in both 64-token blocks; values close to the
    reference where both are finite."""
    n = T + W * W
    g = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(1, 2, n, head_dim, generator=g).to(dtype) for _ in range(4)]
    mask = attention_mask(kind, T, W, 11, transposed=kind == "column")
    scale = head_dim**-0.5
    finite, _ = _emulated_and_reference(emu, tensors, kind, T, W, scale)
    for which, value, t in itertools.product(OPERANDS, (float("nan"), float("inf"), float("-inf")), (T, n - 2)):
        case = f"{value} in {which}[0, 1, {t}]"
        poisoned = [x.clone() for x in tensors]
        poisoned[OPERANDS.index(which)][0, 1, t, 5] = value
        got, ref = _emulated_and_reference(emu, poisoned, kind, T, W, scale)
        for result, a, b, r in zip(("out", "dq", "dk", "dv"), finite, got, ref, strict=True):
            rows = unreached(mask, which, t)[result]
            assert _same_bits(a[:, :, rows], b[:, :, rows]), f"{result} changed where it cannot see {case}"
            nonfinite = (lambda x: x.isnan()) if value != value else (lambda x: ~x.isfinite())
            assert torch.equal(nonfinite(b), nonfinite(r)), f"{result} non-finite where the reference is not, {case}"
            both = b.isfinite() & r.isfinite()
            torch.testing.assert_close(b[both].float(), r[both].float(), atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", MASK_KINDS)
def test_masked_nonfinite_values_never_reach_an_output(emu, unreached, kind, dtype):
    # 37 + 7 x 7 = 86 tokens: a full and a partial 64-token block.
    check_masked_nonfinite(emu, unreached, kind, 37, 7, dtype, 64)


@pytest.mark.slow
@pytest.mark.parametrize("head_dim", [32, 128])
@pytest.mark.parametrize("kind", MASK_KINDS)
def test_masked_nonfinite_values_every_head_dim(emu, unreached, kind, head_dim):
    # 20 + 13 x 13 = 189 tokens: three blocks; head dim 128 runs the 16-row forward layout and re-reads K
    # and V from shared memory in dK/dV.
    check_masked_nonfinite(emu, unreached, kind, 20, 13, torch.float16, head_dim, seed=head_dim)


@pytest.mark.parametrize("kind", MASK_KINDS)
def test_nonfinite_tiles_are_race_free(emu, kind):
    """The vote on non-finite tiles (__syncthreads_or) and the careful products give the same bits under
    every thread schedule."""
    T, W, n = 20, 13, 20 + 13 * 13
    g = torch.Generator().manual_seed(7)
    q, k, v, grad = (torch.randn(1, 2, n, 64, generator=g).to(torch.float16) for _ in range(4))
    q[0, 0, 100, 3], k[0, 1, 150, 9] = float("nan"), float("inf")
    v[0, 0, 70, 0], grad[0, 1, 30, 1] = float("-inf"), float("nan")
    results = []
    try:
        for schedule in SCHEDULES:
            emu.schedule(schedule)
            out, lse = emu.forward(q, k, v, kind, T, W, 11, 0.125)
            results.append((out, lse, *emu.backward(grad, q, k, v, out, lse, kind, T, W, 11, 0.125)))
    finally:
        emu.schedule(0)
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            assert _same_bits(a, b)


# ---- decode ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", MASK_KINDS)
def test_decode_matches_cpu_kernel(emu, kind, dtype):
    T, W, ks = 6, 9, 7
    n = T + W * W
    g = torch.Generator().manual_seed(3)
    # Every elements-per-lane instantiation (1, 2, 4, 8); one block per row, or 3 or 7 sharing its keys
    # (7 splits of a row with fewer keys leave some empty).
    for head_dim, splits in ((1, 3), (33, 1), (64, 7), (100, 1), (256, 3)):
        k, v = (torch.randn(2, 3, n, head_dim, generator=g).to(dtype) for _ in range(2))
        for position in (0, T - 1, T, T + W, n // 2 + 1, n - 1):
            q = torch.randn(2, 3, head_dim, generator=g).to(dtype)
            scale = head_dim**-0.5
            want = sparse_attention_decode(q, k, v, kind, T, W, position, ks, scale)
            # Keys the row may not see are never read: NaN there changes nothing.
            allowed = attention_mask(kind, T, W, ks, transposed=kind == "column")[position]
            k_hidden, v_hidden = k.clone(), v.clone()
            k_hidden[:, :, ~allowed] = float("nan")
            v_hidden[:, :, ~allowed] = float("nan")
            got = emu.decode(q, k_hidden, v_hidden, kind, T, W, position, ks, scale, splits)
            tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
            torch.testing.assert_close(got, want, atol=tol, rtol=tol)


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("kind", ["causal", "conv"])
def test_decode_long_rows_sharp_softmax_every_schedule(emu, kind, splits):
    """Rows of up to 406 keys: each warp of each split takes several steps, and a large scale keeps the
    online rescaling far from 1. Bitwise the same under every thread schedule (race-free: the block and
    split merges run in a fixed order), and within fp16 rounding of the CPU kernel."""
    T, W, ks = 6, 20, 7
    n = T + W * W
    g = torch.Generator().manual_seed(11)
    k, v = (torch.randn(1, 2, n, 64, generator=g).to(torch.float16) for _ in range(2))
    q = torch.randn(1, 2, 64, generator=g).to(torch.float16)
    for position in (n // 2, n - 1):
        want = sparse_attention_decode(q.float(), k.float(), v.float(), kind, T, W, position, ks, 1.5)
        results = []
        try:
            for schedule in SCHEDULES:
                emu.schedule(schedule)
                results.append(emu.decode(q, k, v, kind, T, W, position, ks, 1.5, splits))
        finally:
            emu.schedule(0)
        for other in results[1:]:
            assert torch.equal(_bits(results[0]), _bits(other)), position
        torch.testing.assert_close(results[0].float(), want, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("splits", [1, 2])
def test_decode_overflowing_scores(emu, splits):
    """Scores that overflow to -inf weigh nothing, also where a warp's or a split's every key has one
    (its max is still -inf there): the row's one finite score takes all the weight, as on the CPU."""
    T, W = 6, 16
    n = T + W * W
    q = torch.full((1, 1, 64), 1e19)
    k = torch.full((1, 1, n, 64), -1e19)  # q . k = -6.4e39: -inf in fp32
    k[:, :, n - 1] = 1e-19
    v = torch.randn(1, 1, n, 64, generator=torch.Generator().manual_seed(0))
    want = sparse_attention_decode(q, k, v, "causal", T, W, n - 1, 11, 1.0)
    torch.testing.assert_close(want, v[:, :, n - 1])  # the CPU kernel's answer, and the test's premise
    torch.testing.assert_close(emu.decode(q, k, v, "causal", T, W, n - 1, 11, 1.0, splits), want)


@pytest.mark.parametrize("splits", [1, 2])
def test_decode_nan_keys_propagate(emu, splits):
    """NaN in a visible key makes the row NaN, as on the CPU, whether one block or several take the row:
    a split whose every score is NaN is not mistaken for an empty one."""
    T, W = 6, 16
    n = T + W * W
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(1, 1, 64, generator=g), *(torch.randn(1, 1, n, 64, generator=g) for _ in range(2))
    k[:, :, : n // 2] = float("nan")
    assert sparse_attention_decode(q, k, v, "causal", T, W, n - 1, 11, 0.125).isnan().all()
    assert emu.decode(q, k, v, "causal", T, W, n - 1, 11, 0.125, splits).isnan().all()


def test_decode_splits_fill_the_gpu_with_enough_keys_each(emu):
    splits = emu.lib.emu_decode_splits
    assert splits(_i64(1024), _i64(1280), 132) == 1  # batch 64 x 16 heads fills 132 SMs by itself
    assert splits(_i64(512), _i64(1280), 132) == 2  # batch 32: 4 blocks per SM want 528
    assert splits(_i64(16), _i64(1280), 132) == 10  # batch 1: as many as 128 keys each allow
    assert splits(_i64(16), _i64(100_000), 132) == 33  # ceil(4 blocks per SM x 132 / 16)
    assert splits(_i64(1), _i64(100_000), 132) == 64  # the cap
    assert splits(_i64(16), _i64(200), 132) == 1  # too few keys to share
    assert splits(_i64(16), _i64(1280), 1) == 1
    assert splits(_i64(2), _i64(1280), 1) == 1  # one SM (DALLE_FAST_DECODE_SMS=1): never shared


# ---- per-resblock gradient scaling: bit-exact against the references ----------------------------------


def _poison(t):
    t = t.clone()
    t.view(-1)[3] = float("inf")
    t.view(-1)[7] = float("nan")
    return t


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_grad_scale_and_unscale_filter_bit_exact(emu, dtype):
    scales = torch.tensor([3.0, 1.5 * 2**10, 0.37])
    for poisoned in (False, True):
        g = (torch.randn(4097) * 1000).to(dtype)
        if poisoned:
            g = _poison(g)
        out = _output(g.shape, dtype)
        emu.check(emu.lib.emu_grad_scale(*_ptrs(_input(g), out), _i64(g.numel()), FLOAT_KIND[dtype],
                                         *_ptrs(_input(scales)), _i64(1)), "grad_scale")  # fmt: skip
        want = amp.grad_scale_reference(g, scales, 1)
        assert _same_bits(_unguard(out), want)  # NaN in, NaN out
        found, found_ref = torch.zeros(3, dtype=torch.bool), torch.zeros(3, dtype=torch.bool)
        out = _output(g.shape, dtype)
        emu.check(emu.lib.emu_grad_unscale_filter(*_ptrs(_input(g), out), _i64(g.numel()), FLOAT_KIND[dtype],
                                                  *_ptrs(_input(scales)), _i64(1), *_ptrs(found)),
                  "grad_unscale_filter")  # fmt: skip
        want = amp.grad_unscale_filter_reference(g, scales, 1, found_ref)
        assert torch.equal(_bits(_unguard(out)), _bits(want))
        assert found.tolist() == [False, poisoned, False] == found_ref.tolist()


def _table(tensors_per_entry):
    """(ptrs, kinds) arrays of a multi-tensor launch: [n][buffers]."""
    flat = [t for entry in tensors_per_entry for t in entry]
    ptrs = (ctypes.c_void_p * len(flat))(*[t.data_ptr() for t in flat])
    kinds = (ctypes.c_int32 * len(flat))(*[FLOAT_KIND[t.dtype] for t in flat])
    return ptrs, kinds


def _in_place(t):
    """A tensor a kernel updates in place, between sentinel guards (a write outside it shows)."""
    return _guarded(t, _SENTINEL)


def test_multi_unscale_check_bit_exact(emu):
    torch.manual_seed(0)
    # 70000 elements: two chunks of one tensor; an empty tensor is left out of the table, as by the glue.
    sizes = [(5, torch.float32), (70000, torch.bfloat16), (33, torch.float16), (1000, torch.float32)]
    sizes.append((0, torch.float16))
    grads = [(torch.randn(n) * 1e4).to(dt) for n, dt in sizes]
    grads[3] = _poison(grads[3])
    grads = [_in_place(g) for g in grads]
    blocks = [0, 1, 1, 2, 3]
    scales = torch.tensor([2.0**13, 3.0 * 2**9, 2.0**7, 1.0])
    ref = [g.clone() for g in grads]
    found, found_ref = torch.zeros(4, dtype=torch.bool), torch.zeros(4, dtype=torch.bool)
    ptrs, kinds = _table([[g] for g in grads])
    numels = (ctypes.c_int64 * len(grads))(*[g.numel() for g in grads])
    emu.check(emu.lib.emu_multi_unscale_check(len(grads), ptrs, kinds, numels, (ctypes.c_int32 * 5)(*blocks),
                                              *_ptrs(scales, found)), "multi_unscale_check")  # fmt: skip
    amp.multi_unscale_check_reference(ref, blocks, scales, found_ref)
    for a, b in zip(grads, ref, strict=True):
        assert torch.equal(_bits(_unguard(a)), _bits(b))
    assert found.tolist() == [False, False, True, False] == found_ref.tolist()


def test_scale_update_bit_exact_over_a_random_run(emu):
    g = torch.Generator().manual_seed(1)
    n, replicas = 300, 3  # 300 blocks: two thread blocks of 256, the second partly idle
    scales = torch.full((n,), replicas * 2.0**13)
    cooldown = torch.zeros(n, dtype=torch.int32)
    ref_scales, ref_cooldown = scales.clone(), cooldown.clone()
    lo, hi = replicas * 2.0**7, replicas * 2.0**24
    for _ in range(300):
        found = torch.rand(n, generator=g) < 0.05
        emu.check(emu.lib.emu_scale_update(*_ptrs(scales, cooldown, found), _i64(n), ctypes.c_float(amp.GROWTH),
                                           ctypes.c_float(amp.BACKOFF), amp.WINDOW, ctypes.c_float(lo),
                                           ctypes.c_float(hi)), "scale_update")  # fmt: skip
        amp.scale_update_reference(ref_scales, ref_cooldown, found, lo, hi)
        assert torch.equal(_bits(scales), _bits(ref_scales)) and torch.equal(cooldown, ref_cooldown)


def test_adamw_step_bit_exact_and_skips_blocks(emu):
    torch.manual_seed(0)
    shapes = [(17,), (300, 7), (64,), (5, 5), (70001,)]
    dts = [torch.float32, torch.bfloat16, torch.float32, torch.float16, torch.float32]
    params = [torch.randn(s).to(d) for s, d in zip(shapes, dts, strict=True)]
    grads = [torch.randn(s).to(d) for s, d in zip(shapes, dts, strict=True)]
    ms = [torch.randn(s).abs() * 0.1 for s in shapes]
    vs = [torch.randn(s).abs() * 0.01 for s in shapes]
    grads[4][:500] *= 1e-21  # subnormal g^2 (1 - beta2)
    vs[4][:1000] = torch.rand(1000) * 1e-38  # subnormal second moments
    params, grads, ms, vs = ([_in_place(t) for t in group] for group in (params, grads, ms, vs))
    blocks = [0, 1, 1, 2, 0]
    found = torch.tensor([False, True, False])
    step_size, bc2 = torch.tensor([1e-3, 2e-3, 3e-4]), torch.tensor([0.3, 0.5, 0.9])
    decay = torch.tensor([0.9999, 0.99, 1.0])
    ref = [[t.clone() for t in group] for group in (params, grads, ms, vs)]
    before = [t.clone() for t in params]
    ptrs, kinds = _table(list(zip(params, grads, ms, vs, strict=True)))
    numels = (ctypes.c_int64 * len(params))(*[p.numel() for p in params])
    emu.check(emu.lib.emu_adamw_step(len(params), ptrs, kinds, numels, (ctypes.c_int32 * len(blocks))(*blocks),
                                     *_ptrs(found, step_size, bc2, decay), ctypes.c_double(0.9), ctypes.c_double(0.96),
                                     ctypes.c_double(1e-8)), "adamw_step")  # fmt: skip
    amp.adamw_step_reference(*ref, blocks, found, step_size, bc2, decay, 0.9, 0.96, 1e-8)
    for a, b in zip(params + grads + ms + vs, ref[0] + ref[1] + ref[2] + ref[3], strict=True):
        assert torch.equal(_bits(_unguard(a)), _bits(b))
    # Block 1 overflowed: its parameters are untouched; the others moved.
    assert torch.equal(params[1], before[1]) and torch.equal(params[2], before[2])
    assert all(not torch.equal(params[i], before[i]) for i in (0, 3, 4))
