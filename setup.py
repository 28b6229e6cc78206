"""Builds dalle_fast._C from csrc/: CPU kernels always, CUDA kernels when a matching toolkit is found.

Environment knobs:
  DALLE_FAST_CPU_ONLY=1          build without CUDA even when a toolkit is present
  DALLE_FAST_CUDA_ARCHS="80;90"  SM architectures to compile for (archs nvcc does not know are skipped)
  MAX_JOBS=N                     parallel compile jobs (read by torch's ninja builder)
  CUDA_HOME=/path/to/cuda        toolkit to use, when auto-detection picks the wrong one
"""

import glob
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).parent.resolve()
CSRC = ROOT / "csrc"
# One C++ standard for g++ and nvcc (CMakeLists.txt and the emulator build in tests/test_cuda_emulated.py
# use the same): torch's headers require C++20 (ATen/ATen.h stops with an #error below it), and the
# headers that .cpp and .cu files share (layout.h, cuda/host_setup.h) should mean the same in both.
CXX_STD = "-std=c++20"


def log(msg: str) -> None:
    print(f"[dalle_fast setup] {msg}", file=sys.stderr)


def _is_toolkit(path: str | None) -> bool:
    if not path:
        return False
    p = Path(path)
    has_lib = any((p / d / "libcudart.so").exists() for d in ("lib64", "lib", "targets/x86_64-linux/lib"))
    return (p / "bin" / "nvcc").exists() and (p / "include" / "cuda_runtime.h").exists() and has_lib


def find_cuda_home() -> str | None:
    """Locates the toolkit folder itself.

    torch guesses dirname(dirname(which nvcc)), which is wrong when nvcc on PATH is a wrapper outside
    the toolkit (e.g. /usr/local/bin/nvcc -> /usr/local/cuda-13.0/bin/nvcc): the link then fails on
    -lcudart. Ask nvcc where it really lives instead.
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if _is_toolkit(os.environ.get(var)):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    if nvcc:
        try:
            out = subprocess.run(
                [nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                capture_output=True,
                text=True,
                timeout=60,
            )
            m = re.search(r"^#\$ TOP=(.+)$", out.stdout + out.stderr, re.MULTILINE)
            if m and _is_toolkit(os.path.realpath(m.group(1).strip())):
                return os.path.realpath(m.group(1).strip())
        except (OSError, subprocess.SubprocessError):
            pass
        if _is_toolkit(str(Path(os.path.realpath(nvcc)).parent.parent)):
            return str(Path(os.path.realpath(nvcc)).parent.parent)
    for cand in ["/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)]:
        if _is_toolkit(cand):
            return cand
    return None


def nvcc_version(cuda_home: str) -> tuple[int, int] | None:
    try:
        out = subprocess.run([f"{cuda_home}/bin/nvcc", "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+)\.(\d+)", out.stdout)
    return (int(m.group(1)), int(m.group(2))) if m else None


def nvidia_wheel_includes() -> list[str]:
    """Header folders of the nvidia-* wheels torch depends on (cuBLAS, cuSPARSE, ...).

    ATen's CUDA headers include cuBLAS/cuSPARSE headers that a minimal system toolkit may lack; the
    wheels ship them. They are added with -idirafter so the toolkit's own headers still win.
    """
    purelib = Path(sysconfig.get_paths()["purelib"])
    found = []
    for base in {purelib, *(Path(p) for p in sys.path if p.endswith("site-packages"))}:
        found += sorted(str(p) for p in base.glob("nvidia/*/include") if p.is_dir())
    return sorted(set(found))


def cuda_arch_flags(cuda_home: str) -> list[str]:
    wanted = os.environ.get("DALLE_FAST_CUDA_ARCHS", "80;90")
    archs = [a.strip().replace(".", "").replace("sm_", "") for a in re.split(r"[;, ]+", wanted) if a.strip()]
    try:
        out = subprocess.run(
            [f"{cuda_home}/bin/nvcc", "--list-gpu-arch"], capture_output=True, text=True, timeout=60
        ).stdout
        known = set(re.findall(r"compute_(\d+a?)", out))
    except (OSError, subprocess.SubprocessError):
        known = set(archs)
    flags = []
    for a in sorted(set(archs), key=lambda a: int(a.rstrip("a"))):
        if a not in known:
            log(f"skipping CUDA arch sm_{a}: this nvcc does not know it")
            continue
        flags.append(f"-gencode=arch=compute_{a},code=sm_{a}")
    if flags:
        # PTX of the newest arch too, so GPUs newer than every listed arch can JIT the kernels.
        newest = flags[-1].split("arch=compute_")[1].split(",")[0]
        flags.append(f"-gencode=arch=compute_{newest},code=compute_{newest}")
    else:
        raise RuntimeError(f"DALLE_FAST_CUDA_ARCHS={wanted!r} names no arch this nvcc supports ({sorted(known)})")
    return flags


def build_extension():
    cpu_only = os.environ.get("DALLE_FAST_CPU_ONLY", "0") not in ("", "0")
    cuda_home = None if cpu_only else find_cuda_home()
    if cuda_home:
        # Must be set before torch.utils.cpp_extension is imported: it reads CUDA_HOME once, at import.
        os.environ["CUDA_HOME"] = cuda_home

    import torch
    from torch.utils import cpp_extension

    # host_setup.cpp (the launch description, torch- and CUDA-free) is in every build: the NVRTC backend of
    # a build without CUDA kernels asks it for its launches through python_module.cpp.
    cpu_sources = [
        "csrc/registration.cpp",
        "csrc/layout.cpp",
        "csrc/python_module.cpp",
        "csrc/cuda/host_setup.cpp",
        *sorted(str(p.relative_to(ROOT)) for p in (CSRC / "cpu").glob("*.cpp")),
    ]
    # -ffp-contract=off: no fused multiply-adds, so CPU kernels round like their PyTorch references.
    # -fopenmp: at::parallel_for is inline and only runs in parallel when compiled with OpenMP; the
    # runtime is shared with torch's (same libgomp.so.1 soname).
    cxx_flags = [
        CXX_STD,
        "-O3",
        "-fno-math-errno",
        "-fno-trapping-math",
        "-ffp-contract=off",
        "-fopenmp",
        "-Wall",
        "-Wno-unused-parameter",
    ]
    link_flags = ["-fopenmp"]
    use_cuda = False
    if cuda_home and torch.version.cuda:
        version = nvcc_version(cuda_home)
        torch_major = int(torch.version.cuda.split(".")[0])
        if version and version[0] == torch_major:
            use_cuda = True
        else:
            log(f"CUDA toolkit {version} at {cuda_home} does not match torch's CUDA {torch.version.cuda}; CPU only")
    elif not cpu_only:
        log("no CUDA toolkit found or torch is a CPU build; building CPU kernels only")

    if not use_cuda:
        return cpp_extension.CppExtension(
            "dalle_fast._C",
            cpu_sources,
            include_dirs=[str(CSRC)],
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags,
        )

    log(f"building CUDA kernels with the toolkit at {cuda_home}")
    cuda_sources = sorted(
        str(p.relative_to(ROOT))
        for p in (CSRC / "cuda").iterdir()
        if p.suffix in (".cu", ".cpp") and str(p.relative_to(ROOT)) not in cpu_sources
    )
    wheel_inc = [f"-idirafter{p}" for p in nvidia_wheel_includes()]
    nvcc_flags = [
        "-O3",
        CXX_STD,
        # No --use_fast_math: it flushes subnormals to zero in every kernel, and the gradient-scaling
        # kernels must round exactly like their references. The attention kernels ask for the fast
        # exponential explicitly (ptx::exp2_approx).
        "-lineinfo",
        "--expt-relaxed-constexpr",
        *cuda_arch_flags(cuda_home),
    ]
    return cpp_extension.CUDAExtension(
        "dalle_fast._C",
        cpu_sources + cuda_sources,
        include_dirs=[str(CSRC)],
        extra_compile_args={"cxx": cxx_flags + ["-DDALLE_FAST_WITH_CUDA"] + wheel_inc, "nvcc": nvcc_flags},
        extra_link_args=link_flags,
    )


def kernel_sources() -> list[Path]:
    """What the NVRTC backend (dalle_fast/ops/nvrtc.py) compiles at run time: the kernels of csrc/cuda/, the
    headers they include, and NVRTC's standard-header stand-ins."""
    cuda = CSRC / "cuda"
    files = [CSRC / "layout.h", *(p for p in cuda.iterdir() if p.suffix in (".cu", ".cuh", ".h"))]
    return sorted(files + [p for p in (cuda / "nvrtc_include").iterdir() if p.is_file()])


class BuildPyWithKernels(build_py):
    """build_py that also copies the kernel sources into the package as dalle_fast/csrc/ (same tree as csrc/),
    so that a wheel install can compile them with NVRTC; an editable install reads csrc/ itself."""

    def run(self):
        super().run()
        for src in kernel_sources():
            dst = Path(self.build_lib) / "dalle_fast" / src.relative_to(ROOT)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)


def main():
    ext = build_extension()  # first: it fixes CUDA_HOME before torch.utils.cpp_extension reads it
    from torch.utils.cpp_extension import BuildExtension

    setup(
        ext_modules=[ext],
        cmdclass={
            "build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None),
            "build_py": BuildPyWithKernels,
        },
    )


if __name__ == "__main__":
    main()
