"""First-use compile time of the NVRTC backend, and its cached load time, per kernel source and arch.

    python -m benchmarks.nvrtc_compile --arch 80 90 --out benchmarks/RESULTS_nvrtc.md

Needs no GPU (NVRTC is given the arch). Compiles into an empty temporary cache (DALLE_FAST_CACHE), then
loads every entry back from it (read and checksum, as a second process would). Writes a markdown table.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

from dalle_fast import _C
from dalle_fast.ops import nvrtc


def measure(arch: int) -> list[tuple[str, float, float, int]]:
    """(source, compile seconds, cached load seconds, cubin bytes) for each source."""
    rows = []
    for source in _C.kernel_names():
        first = nvrtc.compiled(source, arch)
        start = time.perf_counter()
        again = nvrtc.compiled(source, arch)
        load = time.perf_counter() - start
        assert again.seconds == 0.0, "the second use compiled again"
        rows.append((source, first.seconds, load, len(first.cubin)))
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[80], help="compute capabilities, e.g. 80 90")
    ap.add_argument("--out", type=Path, default=None, help="markdown file to write (default: print only)")
    args = ap.parse_args(argv)
    lines = [
        f"NVRTC {'.'.join(map(str, nvrtc.nvrtc_version()))}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs visible; compile = first use with an empty cache, load = the cached entry read back",
        "",
        "| arch | source | kernels | compile (s) | cached load (ms) | cubin (MB) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    with tempfile.TemporaryDirectory() as cache:
        os.environ["DALLE_FAST_CACHE"] = cache
        for arch in args.arch:
            rows = measure(arch)
            for source, seconds, load, size in rows:
                n = len(_C.kernel_names()[source])
                lines.append(f"| sm_{arch} | {source} | {n} | {seconds:.1f} | {load * 1e3:.1f} | {size / 1e6:.2f} |")
            total, load = sum(r[1] for r in rows), sum(r[2] for r in rows)
            lines.append(f"| sm_{arch} | **all** | | **{total:.1f}** | **{load * 1e3:.1f}** | |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
