"""What this build and this machine can run: the CUDA kernels' dtypes and head dims, which backend runs
them (the nvcc build's, or NVRTC's at run time), whether a GPU can run them, and whether the CPU multiplies
bf16 in hardware."""

from __future__ import annotations

import os

import torch

from dalle_fast import _C  # loads the library: registers torch.ops.dalle_fast
from dalle_fast.ops import nvrtc

CUDA_DTYPES = (torch.float16, torch.bfloat16)  # what the CUDA attention kernels take
CUDA_HEAD_DIMS = _C.CUDA_HEAD_DIMS  # the CUDA kernels' (csrc/cuda/capabilities.h), for every build
CUDA_MIN_COMPUTE_CAPABILITY = _C.CUDA_MIN_COMPUTE_CAPABILITY

# Whether the extension was built with the CUDA kernels (by nvcc, registered in C++), read once at import,
# before nvrtc_ops may register its own: torch.compile cannot trace the dispatcher query (it returns a bool,
# not a tensor), so asking it per call would break every compiled graph on CUDA.
NVCC_BUILD = all(
    torch._C._dispatch_has_kernel_for_dispatch_key(f"dalle_fast::{op}", "CUDA")
    for op in ("sparse_attention_fwd", "sparse_attention_decode")
)
BACKEND_CHOICES = ("auto", "nvcc", "nvrtc")
INSTALL_NVRTC = 'pip install -e ".[cuda-runtime]"'  # CUDA 13 torch; CUDA 12: the cuda12-runtime extra


def _choose_backend() -> tuple[str | None, str | None]:
    """(backend, None), or (None, why there is none and the command that fixes it). DALLE_FAST_CUDA_BACKEND:
    auto (default) takes the nvcc build's kernels when it has them, else NVRTC when it can compile; nvcc or
    nvrtc insists on one."""
    choice = os.environ.get("DALLE_FAST_CUDA_BACKEND", "auto") or "auto"
    if choice not in BACKEND_CHOICES:
        raise ValueError(f"DALLE_FAST_CUDA_BACKEND must be one of {BACKEND_CHOICES}, got {choice!r}")
    no_nvcc = (
        f"dalle_fast was built without CUDA kernels (at install time no nvcc matched torch's CUDA {torch.version.cuda})"
    )
    if choice == "nvcc" or (choice == "auto" and NVCC_BUILD):
        return ("nvcc", None) if NVCC_BUILD else (None, f"{no_nvcc}; DALLE_FAST_CUDA_BACKEND=nvcc allows no other")
    if (why := nvrtc.unavailable_reason()) is None:
        return "nvrtc", None
    if choice == "nvrtc":
        return None, f"DALLE_FAST_CUDA_BACKEND=nvrtc, but NVRTC cannot compile the kernels: {why}"
    fix = f"pip install {nvrtc.cupy_package()} (from a checkout: {INSTALL_NVRTC})"
    return None, f"{no_nvcc}, and NVRTC cannot compile them at run time: {why}. Fix: {fix}"


# Which backend runs the ops' CUDA kernels: "nvcc", "nvrtc" (dalle_fast/ops/nvrtc_ops.py registers them),
# or None; chosen once, at import.
CUDA_BACKEND, _NO_BACKEND_REASON = _choose_backend()


def cuda_unusable_reason(device: torch.device | str = "cuda") -> str | None:
    """None when the CUDA kernels can run on `device` (through the nvcc build or NVRTC); else why not, in
    words (no GPU, neither backend, or a GPU older than CUDA_MIN_COMPUTE_CAPABILITY). The device policy
    uses it."""
    if not torch.cuda.is_available():
        return "no CUDA device is available"
    if CUDA_BACKEND is None:
        return _NO_BACKEND_REASON
    major, minor = torch.cuda.get_device_capability(torch.device(device))
    if (major, minor) < CUDA_MIN_COMPUTE_CAPABILITY:
        need = "{}.{}".format(*CUDA_MIN_COMPUTE_CAPABILITY)
        return f"the CUDA kernels need compute capability {need} or newer; this GPU is {major}.{minor}"
    return None


def require_cuda_kernels(device: torch.device, op: str) -> None:
    """RuntimeError for a CUDA device when neither backend can run `op`'s CUDA kernel."""
    if device.type == "cuda" and CUDA_BACKEND is None:
        raise RuntimeError(f"dalle_fast has no CUDA kernel for {op}: {_NO_BACKEND_REASON}; or use reference=True")


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX). Elsewhere bf16 is emulated and
    slower than fp32, so automatic precision choices stay fp32 there."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)
