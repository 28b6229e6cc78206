"""What dalle_fast._C says about the build: the head dims and the minimum compute capability of the CUDA
kernels (csrc/cuda/capabilities.h, present in CPU-only builds too) and whether this build has them. The
head dims must be exactly what the CUDA launchers accept: checked here under the emulator, and on a GPU
through the op itself."""

import ctypes
import re

import pytest
import torch
from test_cuda_emulated import KIND_ID, _build_emulator

from dalle_fast import _C, ops
from dalle_fast.ops import support

# Every head dim the decode kernel takes, a superset of the attention kernels' candidates.
HEAD_DIM_RANGE = range(1, 257)


def test_attributes_and_types():
    dims = _C.CUDA_HEAD_DIMS
    assert type(dims) is tuple and dims and all(type(d) is int for d in dims)
    assert list(dims) == sorted(set(dims)) and dims[0] > 0
    cc = _C.CUDA_MIN_COMPUTE_CAPABILITY
    assert type(cc) is tuple and len(cc) == 2 and all(type(x) is int for x in cc)
    assert cc[0] >= 1 and 0 <= cc[1] <= 9
    assert type(_C.WITH_CUDA) is bool


def test_with_cuda_matches_the_registered_kernels():
    """WITH_CUDA is the nvcc build; the ops have CUDA kernels exactly when a backend (nvcc, or NVRTC, whose
    Python kernels register at import) was chosen."""
    assert support.NVCC_BUILD == _C.WITH_CUDA
    for op in ("sparse_attention_fwd", "sparse_attention_bwd", "sparse_attention_decode", "adamw_step_"):
        has = torch._C._dispatch_has_kernel_for_dispatch_key(f"dalle_fast::{op}", "CUDA")
        assert has == (support.CUDA_BACKEND is not None), op


def test_python_reads_them_from_the_extension(pretend_gpu):
    assert ops.CUDA_HEAD_DIMS == _C.CUDA_HEAD_DIMS
    major, minor = _C.CUDA_MIN_COMPUTE_CAPABILITY
    pretend_gpu((major, minor))
    assert ops.cuda_unusable_reason() is None
    pretend_gpu((major - 1, 9))
    assert f"compute capability {major}.{minor} or newer" in ops.cuda_unusable_reason()


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    return _build_emulator(tmp_path_factory)


def test_emulated_launchers_accept_exactly_the_head_dims(emu):
    """Forward and backward launchers over batch * heads = 0 (nothing runs, no pointer is read): success
    for a listed head dim, cudaErrorInvalidValue (1) for any other; shared memory is sized for exactly
    the listed ones."""
    null = ctypes.c_void_p(0)
    # causal mask of 5 text tokens and a 4 x 4 image (kernel_size 11 unused), fp16, batch * heads = 0
    call = (KIND_ID["causal"], ctypes.c_int64(5), ctypes.c_int64(4), ctypes.c_int64(11), 0, ctypes.c_int64(0))
    accepted = {"forward": [], "backward": [], "smem": []}
    for d in HEAD_DIM_RANGE:
        rc = emu.lib.emu_attention_forward(*call, d, ctypes.c_float(1.0), *[null] * 5)
        assert rc in (0, 1), (d, rc, emu.lib.emu_last_error())
        accepted["forward"] += [d] if rc == 0 else []
        rc = emu.lib.emu_attention_backward(*call, d, ctypes.c_float(1.0), *[null] * 10)
        assert rc in (0, 1), (d, rc, emu.lib.emu_last_error())
        accepted["backward"] += [d] if rc == 0 else []
        accepted["smem"] += [d] if emu.lib.emu_forward_smem_bytes(d) > 0 else []
    assert accepted == dict.fromkeys(accepted, list(_C.CUDA_HEAD_DIMS))


@pytest.mark.cuda
@pytest.mark.skipif(ops.cuda_unusable_reason() is not None, reason="no usable CUDA device or kernels")
def test_cuda_op_accepts_exactly_the_head_dims():
    other = next(d for d in range(16, 257, 16) if d not in _C.CUDA_HEAD_DIMS)
    for d in (*_C.CUDA_HEAD_DIMS, other):
        q = torch.randn(1, 1, 5 + 4 * 4, d, device="cuda", dtype=torch.float16)
        if d in _C.CUDA_HEAD_DIMS:
            torch.ops.dalle_fast.sparse_attention_fwd(q, q, q, "causal", 5, 4, 11, d**-0.5)
        else:
            with pytest.raises(RuntimeError, match=f"must be one of {re.escape(str(_C.CUDA_HEAD_DIMS))} on CUDA"):
                torch.ops.dalle_fast.sparse_attention_fwd(q, q, q, "causal", 5, 4, 11, d**-0.5)


def test_doctor_says_which_backend_and_how_to_fix_none(monkeypatch, capsys):
    from dalle_fast import doctor

    doctor.main([])
    out = capsys.readouterr().out
    assert out.startswith(f"torch {torch.__version__}") and "CUDA ops: " in out and "--device auto: " in out
    monkeypatch.setattr(support, "CUDA_BACKEND", "nvrtc")
    assert any("compiled at first use by NVRTC" in line for line in doctor.report())
    monkeypatch.setattr(support, "CUDA_BACKEND", None)
    monkeypatch.setattr(support, "_NO_BACKEND_REASON", "dalle_fast was built without CUDA kernels")
    lines = doctor.report()
    assert "CUDA ops: none: dalle_fast was built without CUDA kernels" in lines
    if torch.version.cuda is not None:  # a CPU torch has nothing to fix here
        assert any(line.startswith("fix: pip install cupy-cuda") for line in lines)
