"""Where work runs and in which precision: one policy for training, sampling and evaluation.

`choose_device(name, ...)` turns a device name (auto | cpu | cuda | cuda:N) into a torch.device for a
piece of work that says what it needs: nothing but PyTorch layers (the dVAE, the CLIP), this build's
CUDA kernels (sparse attention, the decode op, per-resblock scaling), and for attention, the head dim
the kernels must cover. "auto" takes the GPU when the work can run there and the CPU otherwise, with a
warning that says why when a GPU is present but cannot be used; an explicit CUDA device that cannot
run the work is a ValueError that says why.

`choose_precision(name, device, ...)` resolves "auto" the same way everywhere and refuses combinations
that cannot run.
"""

from __future__ import annotations

import contextlib
import warnings

import torch

from dalle_fast.ops.support import CUDA_HEAD_DIMS, cpu_has_native_bf16, cuda_unusable_reason

DEVICE_NAMES = "auto, cpu, cuda or cuda:N"
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def parse_device(name: str) -> torch.device:
    """A device name as torch.device, without asking whether it is present (config checks use it)."""
    if name == "auto":
        return torch.device("cpu")  # a placeholder: choose_device decides
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device must be {DEVICE_NAMES}, got {name!r}") from e
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be {DEVICE_NAMES}, got {name!r}")
    return torch.device("cpu") if device.type == "cpu" else device  # cpu:N names the same CPU


def cuda_refusal(device: torch.device | str = "cuda", kernels: bool = False, head_dim: int | None = None) -> str | None:
    """Why work with these needs cannot run on the CUDA `device`, or None when it can.

    kernels: the work runs this build's CUDA kernels; head_dim: and its attention kernels must cover
    this head dim (None: no attention kernel is needed)."""
    device = torch.device(device)
    if not torch.cuda.is_available():
        return "no CUDA device is available"
    if device.index is not None and device.index >= torch.cuda.device_count():
        return f"this machine has {torch.cuda.device_count()} CUDA device(s)"
    if kernels and (why := cuda_unusable_reason(device)) is not None:
        return why
    if head_dim is not None and head_dim not in CUDA_HEAD_DIMS:
        return (
            f"head_dim {head_dim} has no CUDA attention kernel (head dims {CUDA_HEAD_DIMS}): run on the CPU, "
            "or use dense attention or a head dim the kernels cover"
        )
    return None


def choose_device(name: str, kernels: bool = False, head_dim: int | None = None) -> torch.device:
    """The device for work with these needs (see cuda_refusal); name is auto, cpu, cuda or cuda:N."""
    if name == "auto":
        why = cuda_refusal("cuda", kernels, head_dim)
        if why is None:
            return torch.device("cuda")
        if torch.cuda.is_available():
            warnings.warn(f"device auto: running on the CPU, since {why}", stacklevel=2)
        return torch.device("cpu")
    device = parse_device(name)
    if device.type == "cuda" and (why := cuda_refusal(device, kernels, head_dim)) is not None:
        raise ValueError(f"device {name!r}: {why}")
    return device


def choose_precision(name: str, device: torch.device, sharded: bool = False, cuda_kernels: bool = True) -> str:
    """fp32 | bf16 | fp16 for training on `device`. auto: on CUDA fp16 (the paper's, with per-resblock
    scaling), bf16 when sharded (the scaling does not combine with sharding); on a CPU bf16 where it
    multiplies bf16 in hardware (ops.support.cpu_has_native_bf16: faster than fp32 there), else fp32.
    cuda_kernels: the model's attention runs this build's CUDA kernels, which take fp16 and bf16 only."""
    if name not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {name!r}")
    if name == "auto":
        if device.type == "cuda":
            return "bf16" if sharded else "fp16"
        return "bf16" if cpu_has_native_bf16() else "fp32"
    if device.type == "cpu" and name == "fp16":
        raise ValueError("precision fp16 needs a CUDA device (CPU: fp32 or bf16)")
    if device.type == "cuda" and name == "fp32" and cuda_kernels:
        raise ValueError("precision fp32 on CUDA: the CUDA attention kernels take fp16/bf16; use bf16 or fp16")
    return name


def autocast(device: torch.device, precision: str):
    """The autocast context of a resolved precision (fp32: none)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.float16 if precision == "fp16" else torch.bfloat16)
