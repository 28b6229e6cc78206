"""python -m dalle_fast.doctor: what this install can run on a GPU, and why, in a few lines.

torch and its CUDA, the GPU and its compute capability, which backend runs the ops' CUDA kernels (the
nvcc build, NVRTC at run time, or none) and, where none, the command that fixes it.
"""

from __future__ import annotations

import argparse
import importlib.metadata

import torch

from dalle_fast import _C
from dalle_fast.ops import nvrtc, support


def _cupy_version() -> str:
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"] or ""
        if name.lower().startswith("cupy"):
            return f"{name} {dist.version}"
    return "CuPy"


def report() -> list[str]:
    """The doctor's lines."""
    lines = [f"torch {torch.__version__}, CUDA {torch.version.cuda or 'none (a CPU build)'}"]
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(0)
        need = "{}.{}".format(*support.CUDA_MIN_COMPUTE_CAPABILITY)
        lines.append(f"GPU: {torch.cuda.get_device_name(0)}, compute capability {major}.{minor} (kernels need {need}+)")
    else:
        lines.append("GPU: none visible to torch")
    nvcc = "with CUDA kernels (nvcc)" if _C.WITH_CUDA else "without CUDA kernels (no matching nvcc at install time)"
    lines.append(f"extension: built {nvcc}; NVRTC: {nvrtc.unavailable_reason() or 'can compile them'}")
    if support.CUDA_BACKEND == "nvcc":
        lines.append("CUDA ops: the nvcc build's kernels")
    elif support.CUDA_BACKEND == "nvrtc":
        lines.append(
            f"CUDA ops: compiled at first use by NVRTC ({_cupy_version()}), cached in {nvrtc.cache_dir()} "
            f"(DALLE_FAST_CACHE)"
        )
    else:
        lines.append(f"CUDA ops: none: {support._NO_BACKEND_REASON}")
    why = support.cuda_unusable_reason()
    lines.append("--device auto: " + ("cuda" if why is None else f"cpu, since {why}"))
    if support.CUDA_BACKEND is None and torch.version.cuda is not None:
        lines.append(
            f"fix: pip install {nvrtc.cupy_package()}   (from a checkout: {support.INSTALL_NVRTC}; "
            "or reinstall with an nvcc of torch's CUDA major version: README, GPU)"
        )
    return lines


def main(argv: list[str] | None = None) -> None:
    argparse.ArgumentParser(prog="python -m dalle_fast.doctor", description=__doc__.splitlines()[0]).parse_args(argv)
    print("\n".join(report()))


if __name__ == "__main__":
    main()
