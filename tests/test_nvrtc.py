"""The NVRTC backend (dalle_fast/ops/nvrtc.py, nvrtc_ops.py): csrc/cuda/'s kernels compiled at run time.

Without a GPU: every kernel compiles for sm_80 and sm_90 (NVRTC is given the arch, never asks a device),
a broken source fails as it fails the nvcc build, the disk cache reuses, rebuilds and never loads a bad
entry, and the launch description names only kernels that are compiled. With a GPU (the runbook):
every op gives the same bits through NVRTC as through the nvcc build.

These tests skip where NVRTC cannot compile (no CuPy); DALLE_FAST_REQUIRE_NVRTC=1 (set by .ci/run, which
installs the cuda-runtime extra) turns that skip into a failure.
"""

import multiprocessing
import os
import shutil
import struct
from concurrent.futures import ProcessPoolExecutor

import pytest
import torch

from dalle_fast import _C
from dalle_fast.ops import nvrtc, nvrtc_ops, support

WHY_NOT = nvrtc.unavailable_reason()
if WHY_NOT is not None and os.environ.get("DALLE_FAST_REQUIRE_NVRTC") == "1":
    raise RuntimeError(f"DALLE_FAST_REQUIRE_NVRTC=1 but NVRTC cannot compile the kernels: {WHY_NOT}")
pytestmark = pytest.mark.skipif(WHY_NOT is not None, reason=f"NVRTC unavailable: {WHY_NOT}")

FAST_SOURCE = "grad_scaling"  # the quickest of the four to compile (well under a second)


def _whole_elf(cubin: bytes) -> bool:
    """An ELF64 image that ends exactly where its last header table ends (a cubin cut short does not)."""
    if not cubin.startswith(nvrtc.CUBIN_MAGIC) or len(cubin) < 64:
        return False
    phoff, shoff = struct.unpack_from("<QQ", cubin, 0x20)
    phentsize, phnum, shentsize, shnum = struct.unpack_from("<HHHH", cubin, 0x36)
    return len(cubin) == max(phoff + phentsize * phnum, shoff + shentsize * shnum)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DALLE_FAST_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def sources(tmp_path, monkeypatch):
    """A copy of the kernel sources that nvrtc compiles instead of the real ones, to edit."""
    root = tmp_path / "csrc"
    shutil.copytree(nvrtc.source_root() / "cuda", root / "cuda")
    shutil.copyfile(nvrtc.source_root() / "layout.h", root / "layout.h")
    monkeypatch.setattr(nvrtc, "source_root", lambda: root)
    return root


@pytest.fixture
def count_compiles(monkeypatch):
    calls = []
    real = nvrtc.compile_source

    def counting(source, arch):
        calls.append((source, arch))
        return real(source, arch)

    monkeypatch.setattr(nvrtc, "compile_source", counting)
    return calls


@pytest.mark.slow  # ~7 minutes of CPU per arch, the attention forward most of it (benchmarks/RESULTS_nvrtc.md)
def test_every_kernel_compiles_for_sm80_and_sm90():
    """Every source for both archs, MAX_JOBS at a time (NVRTC compiles on one thread), longest first."""
    names = _C.kernel_names()
    jobs = [(source, arch) for source in names for arch in (80, 90)]  # attention_fwd first: the longest
    workers = max(1, min(len(jobs), int(os.environ.get("MAX_JOBS") or 1)))
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        results = list(pool.map(nvrtc.compile_source, *zip(*jobs, strict=True)))
    for (source, arch), c in zip(jobs, results, strict=True):
        assert (c.source, c.arch) == (source, arch) and _whole_elf(c.cubin), (source, arch)
        assert set(c.symbols) == set(names[source]) and all(c.symbols.values()), (source, arch)


@pytest.mark.parametrize("arch", [80, 90])
def test_a_quick_source_compiles_for_each_arch(arch):
    c = nvrtc.compile_source(FAST_SOURCE, arch)
    assert _whole_elf(c.cubin) and len(c.symbols) == len(_C.kernel_names()[FAST_SOURCE])


def test_a_syntax_error_fails_the_compile(sources):
    path = sources / "cuda" / f"{FAST_SOURCE}.cu"
    path.write_text(path.read_text().replace("const float s = scales[block];", "const float s = scales[block]", 1))
    with pytest.raises(nvrtc.NvrtcError, match=rf"(?s){FAST_SOURCE}\.cu.*error"):
        nvrtc.compile_source(FAST_SOURCE, 80)


def test_arguments_are_checked():
    with pytest.raises(ValueError, match="source must be one of"):
        nvrtc.compile_source("no_such_file", 80)
    with pytest.raises(ValueError, match="arch must be"):
        nvrtc.compile_source(FAST_SOURCE, "sm_80")


def test_cache_reuses_then_rebuilds_on_a_changed_source_or_arch(cache, sources, count_compiles):
    first = nvrtc.compiled(FAST_SOURCE, 80)
    assert first.seconds > 0 and count_compiles == [(FAST_SOURCE, 80)]
    again = nvrtc.compiled(FAST_SOURCE, 80)
    assert again.seconds == 0.0 and again.cubin == first.cubin and again.symbols == first.symbols
    assert count_compiles == [(FAST_SOURCE, 80)]  # loaded, not compiled

    nvrtc.compiled(FAST_SOURCE, 90)  # another arch
    assert count_compiles[-1] == (FAST_SOURCE, 90) and len(count_compiles) == 2

    header = sources / "cuda" / "kernel_params.h"  # an included header counts too
    header.write_text(header.read_text() + "\n// changed\n")
    nvrtc.compiled(FAST_SOURCE, 80)
    assert len(count_compiles) == 3
    assert len(list(cache.glob(f"{FAST_SOURCE}-sm_80-*.cubin"))) == 2  # old and new sources keep their own


@pytest.mark.parametrize("damage", ["flip_a_cubin_byte", "truncate", "garbage", "empty", "wrong_key"])
def test_cache_rebuilds_a_corrupt_entry(cache, count_compiles, damage):
    good = nvrtc.compiled(FAST_SOURCE, 80)
    (entry,) = cache.glob(f"{FAST_SOURCE}-sm_80-*.cubin")
    data = bytearray(entry.read_bytes())
    if damage == "flip_a_cubin_byte":
        data[-100] ^= 0x40
    elif damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "garbage":
        data = bytearray(os.urandom(len(data)))
    elif damage == "empty":
        data = bytearray()
    else:  # a valid entry of other sources written under this name
        data = data.replace(nvrtc.cache_key(FAST_SOURCE, 80).encode(), b"0" * 64, 1)
    entry.write_bytes(bytes(data))
    rebuilt = nvrtc.compiled(FAST_SOURCE, 80)
    assert len(count_compiles) == 2 and rebuilt.seconds > 0 and rebuilt.cubin == good.cubin
    assert nvrtc.compiled(FAST_SOURCE, 80).seconds == 0.0  # the rewritten entry is valid again
    assert not list(cache.glob("*.tmp"))


# ---- the launch description names compiled kernels only -----------------------------------------------------

P = 1 << 20  # a stand-in device address: nothing is launched


def _every_launch(monkeypatch):
    """Launches the description gives over every dtype, head dim, forward warp layout, backward stage count
    and decode width."""
    for dtype in (0, 1):
        for d in _C.CUDA_HEAD_DIMS:
            for rows in ("32", "16"):  # the forward's warp layouts (host_setup.h, forward_rows_per_warp)
                monkeypatch.setenv("DALLE_FAST_FWD_ROWS_PER_WARP", rows)
                yield from _C.forward_launches(*[P] * 6, 2, 80, d, 0.1, dtype, "row", 16, 8, 11)
            for smem_limit in (227 * 1024, 99 * 1024):  # H100 / A100: double buffers; sm_86: single at 128
                yield from _C.backward_launches(*[P] * 11, smem_limit, 2, 80, d, 0.1, dtype, "conv", 16, 8, 11)
    for dtype in (0, 1, 2):
        for d in range(1, _C.CUDA_MAX_DECODE_HEAD_DIM + 1):
            yield from _C.decode_launches(*[P] * 5, "row", 16, 8, 11, 79, 2, 80, d, 0.1, dtype, 1)
        yield from _C.decode_launches(*[P] * 5, "causal", 16, 64, 11, 4000, 1, 4112, 64, 0.1, dtype, 132)  # splits
    yield from _C.grad_scale_launches(P, P, 1000, 1, P, 0)
    yield from _C.grad_unscale_filter_launches(P, P, 1000, 2, P, 0, P)
    yield from _C.multi_unscale_check_launches(P, P, 3, P, P)
    yield from _C.scale_update_launches(P, P, P, 5, 2.0, 0.5, 10, 1.0, 65536.0)
    yield from _C.adamw_launches(P, P, 3, P, P, P, P, 0.9, 0.999, 1e-8)


def test_every_described_launch_names_a_compiled_kernel(monkeypatch):
    names = {n for ns in _C.kernel_names().values() for n in ns}
    launched = set()
    for kernel, blocks, threads, smem, args in _every_launch(monkeypatch):
        assert kernel in names and blocks > 0 and threads > 0 and smem >= 0 and args
        launched.add(kernel)
    assert launched == names  # and every compiled kernel is launched by some call


def test_launch_description_rejects_what_the_launchers_reject():
    with pytest.raises(ValueError, match="no CUDA attention kernel for head_dim 48"):
        _C.forward_launches(*[P] * 6, 2, 80, 48, 0.1, 0, "row", 16, 8, 11)
    with pytest.raises(ValueError, match="seq_len 81"):
        _C.forward_launches(*[P] * 6, 2, 81, 64, 0.1, 0, "row", 16, 8, 11)
    with pytest.raises(ValueError, match="kind must be"):
        _C.layout_image("diagonal", 16, 8, 11)
    with pytest.raises(ValueError, match="position must be"):
        _C.decode_launches(*[P] * 5, "row", 16, 8, 11, 80, 2, 80, 64, 0.1, 0, 1)
    assert _C.forward_launches(*[P] * 6, 0, 80, 64, 0.1, 0, "row", 16, 8, 11) == []  # nothing to launch


# ---- backend choice ------------------------------------------------------------------------------------------


def test_backend_choice(monkeypatch):
    for choice, nvcc_build, want in [
        ("auto", True, "nvcc"),
        ("auto", False, "nvrtc"),
        ("nvrtc", True, "nvrtc"),
        ("nvcc", True, "nvcc"),
        ("nvcc", False, None),
    ]:
        monkeypatch.setenv("DALLE_FAST_CUDA_BACKEND", choice)
        monkeypatch.setattr(support, "NVCC_BUILD", nvcc_build)
        assert support._choose_backend()[0] == want, (choice, nvcc_build)
    monkeypatch.setenv("DALLE_FAST_CUDA_BACKEND", "auto")
    monkeypatch.setattr(support, "NVCC_BUILD", False)
    monkeypatch.setattr(nvrtc, "unavailable_reason", lambda: "CuPy is not installed")
    backend, why = support._choose_backend()
    assert backend is None and "CuPy is not installed" in why and support.INSTALL_NVRTC in why
    monkeypatch.setenv("DALLE_FAST_CUDA_BACKEND", "cupy")
    with pytest.raises(ValueError, match="DALLE_FAST_CUDA_BACKEND must be one of"):
        support._choose_backend()


# ---- on a GPU: the same bits as the nvcc build ------------------------------------------------------------------

needs_both = pytest.mark.skipif(
    not (torch.cuda.is_available() and support.CUDA_BACKEND == "nvcc" and support.cuda_unusable_reason() is None),
    reason="needs a GPU and the nvcc build as the ops' backend, to compare the backends",
)


def _nvcc(op):
    """The op as registered: the nvcc build's kernel (needs_both); nvrtc_ops' functions are called directly."""
    return getattr(torch.ops.dalle_fast, op)


@pytest.mark.cuda
@needs_both
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", _C.CUDA_HEAD_DIMS)
@pytest.mark.parametrize("kind", ["causal", "row", "column", "conv"])
def test_attention_same_bits_as_nvcc(kind, head_dim, dtype):
    torch.manual_seed(0)
    text_len, image_size, heads = 70, 12, 3
    n = text_len + image_size**2
    q, k, v, g = (torch.randn(2, heads, n, head_dim, device="cuda", dtype=dtype) for _ in range(4))
    args = (kind, text_len, image_size, 11, head_dim**-0.5)
    out, lse = nvrtc_ops.sparse_attention_fwd(q, k, v, *args)
    want_out, want_lse = _nvcc("sparse_attention_fwd")(q, k, v, *args)
    assert torch.equal(out, want_out) and torch.equal(lse, want_lse)
    grads = nvrtc_ops.sparse_attention_bwd(g, q, k, v, out, lse, *args)
    want = _nvcc("sparse_attention_bwd")(g, q, k, v, out, lse, *args)
    assert all(torch.equal(a, b) for a, b in zip(grads, want, strict=True))
    for position in (0, text_len, n - 1):
        for dt in (dtype, torch.float32):
            qd, kd, vd = q[:, :, position].to(dt), k.to(dt), v.to(dt)
            got = nvrtc_ops.sparse_attention_decode(qd, kd, vd, *args, position)
            assert torch.equal(got, _nvcc("sparse_attention_decode")(qd, kd, vd, *args, position))


@pytest.mark.cuda
@needs_both
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_grad_scaling_same_bits_as_nvcc(dtype):
    torch.manual_seed(0)
    scales = torch.tensor([1024.0, 0.5, 3.0], device="cuda")
    g = torch.randn(100_003, device="cuda").to(dtype)
    g[7] = float("inf")
    assert torch.equal(nvrtc_ops.grad_scale(g, scales, 1), _nvcc("grad_scale")(g, scales, 1))
    found = [torch.zeros(3, dtype=torch.bool, device="cuda") for _ in range(2)]
    a = nvrtc_ops.grad_unscale_filter(g, scales, 2, found[0])
    assert torch.equal(a, _nvcc("grad_unscale_filter")(g, scales, 2, found[1])) and torch.equal(*found)
    grads = [[torch.randn(n, device="cuda").to(dtype) for n in (70_000, 0, 5)] for _ in range(2)]
    grads[1] = [t.clone() for t in grads[0]]
    found = [torch.zeros(3, dtype=torch.bool, device="cuda") for _ in range(2)]
    nvrtc_ops.multi_unscale_check_(grads[0], [0, 1, 2], scales, found[0])
    _nvcc("multi_unscale_check_")(grads[1], [0, 1, 2], scales, found[1])
    assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True)) and torch.equal(*found)
    state = [(scales.clone(), torch.zeros(3, dtype=torch.int32, device="cuda")) for _ in range(2)]
    flags = torch.tensor([True, False, False], device="cuda")
    nvrtc_ops.resblock_scale_update_(*state[0], flags, 2.0, 0.5, 1, 1.0, 65536.0)
    _nvcc("resblock_scale_update_")(*state[1], flags, 2.0, 0.5, 1, 1.0, 65536.0)
    assert torch.equal(state[0][0], state[1][0]) and torch.equal(state[0][1], state[1][1])
    bufs = [
        [[torch.randn(n, device="cuda") for n in (70_000, 3)] for _ in range(4)] for _ in range(2)
    ]  # params, grads, exp_avg, exp_avg_sq
    bufs[1] = [[t.clone() for t in ts] for ts in bufs[0]]
    for ts in bufs:
        ts[3] = [t.abs() for t in ts[3]]
    hyper = [torch.tensor([1e-3, 2e-3], device="cuda"), torch.tensor([0.5, 0.7], device="cuda")]
    hyper.append(torch.tensor([0.99, 1.0], device="cuda"))
    skip = torch.tensor([False, True], device="cuda")
    nvrtc_ops.adamw_step_(*bufs[0], [0, 1], skip, *hyper, 0.9, 0.999, 1e-8)
    _nvcc("adamw_step_")(*bufs[1], [0, 1], skip, *hyper, 0.9, 0.999, 1e-8)
    assert all(torch.equal(a, b) for x, y in zip(*bufs, strict=True) for a, b in zip(x, y, strict=True))
