"""The CUDA kernels without a local nvcc: csrc/cuda/'s .cu files compiled at first use by NVRTC (through
CuPy's binding), cached on disk, and launched on torch's current stream.

Nothing here knows an op. What to compile (`_C.kernel_names()`) and each launch of an op call (kernel,
blocks, threads, shared memory, argument bytes) come from the C++ launch description that the nvcc
launchers use (csrc/cuda/host_setup.h, exposed by csrc/python_module.cpp); nvrtc_ops.py turns op calls into
those launches. The NVRTC options mirror setup.py's nvcc flags, so both backends build the same code.

Cache: one file per (source, arch) under $DALLE_FAST_CACHE or ~/.cache/dalle_fast/nvrtc, named by a hash
of every kernel source, the arch, NVRTC's version and the options. A file is written to a temporary name
and renamed, and read back only when its header, length and checksum agree; anything else is compiled
again and replaced.
"""

from __future__ import annotations

import ctypes
import glob
import hashlib
import importlib.util
import json
import os
import site
import sys
import sysconfig
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from dalle_fast import _C
from dalle_fast.files import atomic_write

PACKAGE = Path(__file__).resolve().parents[1]
# NVRTC spellings of setup.py's nvcc flags (-std=c++20 -lineinfo, no fast math). -default-device: NVRTC
# treats unannotated functions (the constexpr helpers of host_setup.h) as device functions, as nvcc
# with --expt-relaxed-constexpr lets device code call them.
OPTIONS = ("-std=c++20", "-lineinfo", "-default-device")
CUBIN_MAGIC = b"\x7fELF"
ENTRY_MAGIC = b"dalle_fast nvrtc cubin 1\n"


class NvrtcError(RuntimeError):
    """A kernel source failed to compile, or NVRTC / CuPy / the CUDA headers could not be found."""


# ---- where things are -------------------------------------------------------------------------------------


def source_root() -> Path:
    """The folder holding layout.h and cuda/: dalle_fast/csrc in an installed wheel (setup.py copies the
    sources there), else the repository's csrc/ (an editable install or a source tree)."""
    for root in (PACKAGE / "csrc", PACKAGE.parent / "csrc"):
        if (root / "cuda" / "attention_fwd.cu").is_file():
            return root
    raise NvrtcError(f"the CUDA kernel sources are not installed (looked in {PACKAGE / 'csrc'} and beside the package)")


def _site_dirs() -> list[Path]:
    dirs = [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *site.getsitepackages()]
    dirs += [p for p in sys.path if p.endswith("site-packages")]
    seen, out = set(), []
    for d in dirs:
        if d not in seen and Path(d).is_dir():
            seen.add(d)
            out.append(Path(d))
    return out


def _cuda_homes() -> list[Path]:
    homes = [os.environ.get(v) for v in ("CUDA_HOME", "CUDA_PATH")] + ["/usr/local/cuda"]
    return [Path(h) for h in homes if h and Path(h).is_dir()]


def _cuda_major() -> int | None:
    return int(torch.version.cuda.split(".")[0]) if torch.version.cuda else None


def find_nvrtc_library() -> Path | None:
    """libnvrtc of torch's CUDA major version: torch's nvidia wheels first, then a toolkit's."""
    major = _cuda_major()
    if major is None:
        return None
    cands = []
    for d in _site_dirs():
        cands += [d / f"nvidia/cu{major}/lib/libnvrtc.so.{major}", d / f"nvidia/cuda_nvrtc/lib/libnvrtc.so.{major}"]
    for h in _cuda_homes():
        cands += [h / "lib64" / f"libnvrtc.so.{major}", h / "lib" / f"libnvrtc.so.{major}"]
    return next((c for c in cands if c.is_file()), None)


def find_cuda_include() -> Path | None:
    """A folder with cuda_fp16.h and cuda_bf16.h (the kernels' only CUDA headers): torch's nvidia wheels
    first, then a toolkit's include/."""
    major = _cuda_major()
    cands = []
    for d in _site_dirs():
        cands += [d / f"nvidia/cu{major}/include", d / "nvidia/cuda_runtime/include", d / "nvidia/cuda_nvrtc/include"]
    cands += [h / "include" for h in _cuda_homes()]
    return next((c for c in cands if (c / "cuda_fp16.h").is_file() and (c / "cuda_bf16.h").is_file()), None)


def cupy_package() -> str:
    """The CuPy wheel that matches torch's CUDA, e.g. cupy-cuda13x."""
    return f"cupy-cuda{_cuda_major() or 13}x"


def unavailable_reason() -> str | None:
    """None when this install can compile the kernels with NVRTC; else what is missing, in words. Looks for
    files and packages only: it imports nothing and touches no GPU."""
    if torch.version.cuda is None:
        return "torch is a CPU build"
    if importlib.util.find_spec("cupy") is None:
        return f"CuPy is not installed (pip install {cupy_package()}, or the cuda-runtime extra)"
    if find_nvrtc_library() is None:
        return f"no libnvrtc.so.{_cuda_major()} (torch's nvidia wheels or a CUDA toolkit provide it)"
    if find_cuda_include() is None:
        return "no cuda_fp16.h / cuda_bf16.h (torch's nvidia wheels or a CUDA toolkit provide them)"
    return None


_binding_lock = threading.Lock()
_binding = None
_libnvrtc = None  # the same library through ctypes: CuPy's getCUBIN drops the cubin's last byte


def nvrtc_binding():
    """CuPy's NVRTC binding, with torch's libnvrtc (and its builtins library) loaded first, so that it is
    the one CuPy finds whatever LD_LIBRARY_PATH says."""
    global _binding, _libnvrtc
    with _binding_lock:
        if _binding is None:
            if (why := unavailable_reason()) is not None:
                raise NvrtcError(f"cannot compile the CUDA kernels with NVRTC: {why}")
            lib = find_nvrtc_library()
            builtins = sorted(p for p in glob.glob(str(lib.parent / "libnvrtc-builtins.so.*")) if ".alt." not in p)
            for path in builtins:
                ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            _libnvrtc = ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)
            from cupy_backends.cuda.libs import nvrtc  # optional dependency: the cuda-runtime extra

            _binding = nvrtc
    return _binding


def _cubin(prog: int) -> bytes:
    """The compiled program's cubin, all of it (nvrtcGetCUBINSize bytes; CuPy's getCUBIN returns one fewer,
    as if it were a NUL-terminated string, which cuts the ELF's last program header short)."""
    nvrtc_binding()
    size = ctypes.c_size_t()
    if _libnvrtc.nvrtcGetCUBINSize(ctypes.c_void_p(prog), ctypes.byref(size)) != 0:
        raise NvrtcError("nvrtcGetCUBINSize failed")
    buf = ctypes.create_string_buffer(size.value)
    if _libnvrtc.nvrtcGetCUBIN(ctypes.c_void_p(prog), buf) != 0:
        raise NvrtcError("nvrtcGetCUBIN failed")
    return buf.raw


def nvrtc_version() -> tuple[int, int]:
    return tuple(nvrtc_binding().getVersion())


# ---- compiling and caching -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Compiled:
    """One source compiled for one arch: the cubin, and each kernel's symbol by its name expression."""

    source: str
    arch: int
    cubin: bytes
    symbols: dict[str, str]
    seconds: float  # compile time, or 0.0 when read from the cache


def cache_dir() -> Path:
    return Path(os.environ.get("DALLE_FAST_CACHE") or Path.home() / ".cache" / "dalle_fast" / "nvrtc")


def _check_arch(arch: int) -> None:
    if not isinstance(arch, int) or arch < 10:
        raise ValueError(f"arch must be a compute capability as major * 10 + minor (e.g. 80), got {arch!r}")


def cache_key(source: str, arch: int) -> str:
    """Hash of everything the cubin depends on: every kernel source and header, the arch, NVRTC's version,
    the options and the kernels asked for."""
    root = source_root()
    h = hashlib.sha256()
    files = sorted([root / "layout.h", *(root / "cuda").rglob("*")], key=lambda p: str(p.relative_to(root)))
    for p in files:
        if p.is_file() and p.suffix in ("", ".h", ".cuh", ".cu"):
            h.update(str(p.relative_to(root)).encode() + b"\0" + p.read_bytes() + b"\0")
    names = _C.kernel_names()[source]
    h.update(json.dumps([source, arch, nvrtc_version(), OPTIONS, names]).encode())
    return h.hexdigest()


def _entry_path(source: str, arch: int, key: str) -> Path:
    return cache_dir() / f"{source}-sm_{arch}-{key[:24]}.cubin"


def _read_entry(path: Path, key: str) -> tuple[bytes, dict[str, str]] | None:
    """The cached cubin and symbols, or None when the file is missing or not a complete entry of this key."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    if not data.startswith(ENTRY_MAGIC):
        return None
    head_end = data.find(b"\n", len(ENTRY_MAGIC))
    try:
        head = json.loads(data[len(ENTRY_MAGIC) : head_end])
        cubin = data[head_end + 1 :]
        ok = (
            head["key"] == key
            and len(cubin) == head["length"]
            and hashlib.sha256(cubin).hexdigest() == head["sha256"]
            and cubin.startswith(CUBIN_MAGIC)
        )
    except (ValueError, KeyError, TypeError):
        return None
    return (cubin, dict(head["symbols"])) if ok else None


def _write_entry(path: Path, key: str, cubin: bytes, symbols: dict[str, str]) -> None:
    head = {"key": key, "length": len(cubin), "sha256": hashlib.sha256(cubin).hexdigest(), "symbols": symbols}
    entry = ENTRY_MAGIC + json.dumps(head, sort_keys=True).encode() + b"\n" + cubin
    atomic_write(path, lambda tmp: tmp.write_bytes(entry))  # readers see the old file or the whole new one


def compile_source(source: str, arch: int) -> Compiled:
    """Compiles csrc/cuda/<source>.cu for sm_<arch> with NVRTC, with no cache. Needs no GPU: the arch is
    given, never asked of a device."""
    _check_arch(arch)
    names = _C.kernel_names()
    if source not in names:
        raise ValueError(f"source must be one of {sorted(names)}, got {source!r}")
    nvrtc = nvrtc_binding()
    supported = set(nvrtc.getSupportedArchs())
    if arch not in supported:
        raise NvrtcError(f"NVRTC {nvrtc_version()} cannot compile for sm_{arch} (it knows {sorted(supported)})")
    root = source_root()
    path = root / "cuda" / f"{source}.cu"
    opts = [
        f"--gpu-architecture=sm_{arch}",
        *OPTIONS,
        f"--include-path={root / 'cuda' / 'nvrtc_include'}",
        f"--include-path={root / 'cuda'}",
        f"--include-path={find_cuda_include()}",
    ]
    start = time.perf_counter()
    prog = nvrtc.createProgram(path.read_text(), str(path), [], [])
    try:
        for name in names[source]:
            nvrtc.addNameExpression(prog, name)
        try:
            nvrtc.compileProgram(prog, opts)
        except nvrtc.NVRTCError as e:
            raise NvrtcError(f"NVRTC failed to compile {path} for sm_{arch}:\n{nvrtc.getProgramLog(prog)}") from e
        cubin = _cubin(prog)
        symbols = {name: nvrtc.getLoweredName(prog, name) for name in names[source]}
    finally:
        nvrtc.destroyProgram(prog)
    return Compiled(source, arch, cubin, symbols, time.perf_counter() - start)


_compiled_lock = threading.Lock()


def compiled(source: str, arch: int) -> Compiled:
    """compile_source through the disk cache: a valid entry is loaded, anything else compiled and stored."""
    _check_arch(arch)
    with _compiled_lock:
        key = cache_key(source, arch)
        path = _entry_path(source, arch, key)
        if (entry := _read_entry(path, key)) is not None:
            return Compiled(source, arch, entry[0], entry[1], 0.0)
        result = compile_source(source, arch)
        _write_entry(path, key, result.cubin, result.symbols)
        return result


# ---- loading and launching -------------------------------------------------------------------------------------


class Kernels:
    """The kernels loaded into one device's primary context (the one torch uses), each source compiled or
    read from the cache at its first launch."""

    def __init__(self, device_index: int):
        from cupy_backends.cuda.api import driver, runtime  # optional dependency: the cuda-runtime extra

        self.driver, self.runtime = driver, runtime
        self.device_index = device_index
        major, minor = torch.cuda.get_device_capability(device_index)
        self.arch = major * 10 + minor
        self.source_of = {name: src for src, names in _C.kernel_names().items() for name in names}
        self.modules: dict[str, tuple[int, dict[str, str]]] = {}
        self.functions: dict[str, int] = {}
        self.smem_set: dict[int, int] = {}
        self.lock = threading.Lock()

    def _make_current(self) -> None:
        """The driver calls need the device's primary context current on this thread. torch makes it current
        when it switches devices, but may skip that on a thread that is already "on" the device without ever
        having used it (autograd's worker threads); cudaSetDevice always makes it current."""
        if self.driver.ctxGetCurrent() == 0:
            self.runtime.setDevice(self.device_index)

    def function(self, kernel: str) -> int:
        with self.lock:
            if kernel not in self.functions:
                source = self.source_of[kernel]
                if source not in self.modules:
                    c = compiled(source, self.arch)
                    with torch.cuda.device(self.device_index):  # the module lives in the current context
                        self._make_current()
                        self.modules[source] = (self.driver.moduleLoadData(c.cubin), c.symbols)
                module, symbols = self.modules[source]
                self.functions[kernel] = self.driver.moduleGetFunction(module, symbols[kernel])
            return self.functions[kernel]

    def launch(self, launches: list, stream: int) -> None:
        """Launches, in order, on `stream` (a cudaStream_t as an integer): [(kernel, blocks, threads, smem,
        (argument bytes, ...)), ...] as the _C launch functions return them."""
        d = self.driver
        self._make_current()
        for kernel, blocks, threads, smem, args in launches:
            f = self.function(kernel)
            if self.smem_set.get(f) != smem:  # what prepare_launch (tile.cuh) sets before each nvcc launch
                d.funcSetAttribute(f, d.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem)
                self.smem_set[f] = smem
            buffers = [ctypes.create_string_buffer(a, len(a)) for a in args]
            params = (ctypes.c_void_p * len(buffers))(*(ctypes.addressof(b) for b in buffers))
            d.launchKernel(f, blocks, 1, 1, threads, 1, 1, smem, stream, ctypes.addressof(params), 0)


_kernels: dict[int, Kernels] = {}
_kernels_lock = threading.Lock()


def kernels(device: torch.device) -> Kernels:
    index = device.index if device.index is not None else torch.cuda.current_device()
    with _kernels_lock:
        if index not in _kernels:
            _kernels[index] = Kernels(index)
        return _kernels[index]


def launch(device: torch.device, launches: list) -> None:
    """Runs the launches on `device`'s current torch stream."""
    if launches:
        kernels(device).launch(launches, torch.cuda.current_stream(device).cuda_stream)
