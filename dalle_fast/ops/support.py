"""What this build and this machine can run: the CUDA kernels' dtypes and head dims, whether the build
has them, whether a GPU can run them, and whether the CPU multiplies bf16 in hardware."""

from __future__ import annotations

import torch

from dalle_fast import _C  # loads the library: registers torch.ops.dalle_fast

CUDA_DTYPES = (torch.float16, torch.bfloat16)  # what the CUDA attention kernels take
CUDA_HEAD_DIMS = _C.CUDA_HEAD_DIMS  # the CUDA kernels' (csrc/cuda/capabilities.h), for every build
CUDA_MIN_COMPUTE_CAPABILITY = _C.CUDA_MIN_COMPUTE_CAPABILITY

# Which ops this build has CUDA kernels for, read once: torch.compile cannot trace the dispatcher query
# (it returns a bool, not a tensor), so asking it per call would break every compiled graph on CUDA.
_HAS_CUDA_KERNEL = {
    op: torch._C._dispatch_has_kernel_for_dispatch_key(f"dalle_fast::{op}", "CUDA")
    for op in ("sparse_attention_fwd", "sparse_attention_decode")
}


def cuda_unusable_reason(device: torch.device | str = "cuda") -> str | None:
    """None when this build's CUDA kernels can run on `device`; else why not, in words (no GPU, a build
    without CUDA kernels, or a GPU older than CUDA_MIN_COMPUTE_CAPABILITY). The device policy uses it."""
    if not torch.cuda.is_available():
        return "no CUDA device is available"
    if not all(_HAS_CUDA_KERNEL.values()):
        return (
            "dalle_fast was built without CUDA kernels (at install time no nvcc matched torch's CUDA "
            f"{torch.version.cuda}; see README, Install)"
        )
    major, minor = torch.cuda.get_device_capability(torch.device(device))
    if (major, minor) < CUDA_MIN_COMPUTE_CAPABILITY:
        need = "{}.{}".format(*CUDA_MIN_COMPUTE_CAPABILITY)
        return f"the CUDA kernels need compute capability {need} or newer; this GPU is {major}.{minor}"
    return None


def require_cuda_kernels(device: torch.device, op: str) -> None:
    """RuntimeError for a CUDA device when the extension was built without CUDA kernels."""
    if device.type == "cuda" and not _HAS_CUDA_KERNEL[op]:
        raise RuntimeError(
            "dalle_fast was built without CUDA kernels (no matching CUDA toolkit at install time); "
            "reinstall with a toolkit present, or use reference=True"
        )


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX). Elsewhere bf16 is emulated and
    slower than fp32, so automatic precision choices stay fp32 there."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)
