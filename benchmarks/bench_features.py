"""Feature statistics of an image folder with the shapes extractor: images/s, and peak memory against the
image count. Writes benchmarks/RESULTS_features.md.

    python -m benchmarks.bench_features                         # 2,000 and 10,000 images of 64 px, 1 thread
    python -m benchmarks.bench_features --counts 500 2000 --threads 2

Renders `max(counts)` shapes scenes as PNG files into a temporary folder, then for each count runs, in a
fresh process, what `python -m dalle_fast.evaluate fid` runs for one folder: read the first COUNT PNGs
(decode, 8-bit RGB), the shapes extractor in batches of 100, float64 running sums (blur 0). Reported:
images/s of the whole pass and of the extractor calls alone, and the process's peak resident memory
(VmHWM), which must not grow with the count (the statistics are D + D^2 numbers whatever the count).

The extractor is the shapes judge at 64 px trained for --extractor-steps updates (100 by default: its
speed does not depend on how well it is trained), cached like `--extractor shapes` caches it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.peak_memory import status_kib

HERE = Path(__file__).parent


def child(folder: str, count: int, extractor_file: str, threads: int) -> dict:
    """One measured pass, in this (fresh) process; prints a JSON line."""
    from dalle_fast.evaluation.extractors import load_extractor
    from dalle_fast.evaluation.fid import folder_stats
    from dalle_fast.evaluation.image_sets import ImageFolder

    torch.set_num_threads(threads)
    ext = load_extractor(extractor_file)
    inner = ext.module
    spent = [0.0]

    def timed(x):
        t0 = time.perf_counter()
        out = inner(x)
        spent[0] += time.perf_counter() - t0
        return out

    ext.module = timed
    before = status_kib("VmHWM")
    t0 = time.perf_counter()
    stats = folder_stats(ImageFolder(folder, limit=count), ext, [0.0], 100, 10)
    seconds = time.perf_counter() - t0
    return {
        "count": stats.features[0.0].n,
        "seconds": seconds,
        "images_per_s": stats.features[0.0].n / seconds,
        "extractor_images_per_s": stats.features[0.0].n / spent[0],
        "peak_rss_mb": status_kib("VmHWM") / 1024,
        "peak_rss_before_mb": before / 1024,
        "dim": stats.features[0.0].dim,
    }


def render(folder: Path, count: int, size: int) -> None:
    from dalle_fast.data.shapes import ShapesDataset

    ds = ShapesDataset("val", count, size, seed=3)
    for i in range(count):
        ds.render(i).convert("RGB").resize((size, size)).save(folder / f"{i:05d}.png")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--counts", type=int, nargs="+", default=[2000, 10000])
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--extractor-steps", type=int, default=100)
    ap.add_argument("--cache", default="", help="cache of the extractor; empty: ~/.cache/dalle_fast")
    ap.add_argument("--out", default=str(HERE / "RESULTS_features.md"))
    ap.add_argument("--child", nargs=3, metavar=("FOLDER", "COUNT", "EXTRACTOR"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), args.child[2], args.threads)))
        return

    from dalle_fast.evaluation.extractors import default_cache, file_sha256, shapes_extractor_file

    torch.set_num_threads(args.threads)
    ext = shapes_extractor_file(Path(args.cache or default_cache()), args.size, args.extractor_steps)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        render(Path(tmp), max(args.counts), args.size)
        print(f"rendered {max(args.counts)} PNGs in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        for count in args.counts:
            cmd = [sys.executable, "-m", "benchmarks.bench_features", "--threads", str(args.threads),
                   "--child", tmp, str(count), str(ext)]  # fmt: skip
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            print(rows[-1], file=sys.stderr)
    load = os.getloadavg()
    lines = [
        "# Feature statistics with the shapes extractor",
        "",
        f"`python -m benchmarks.bench_features --counts {' '.join(map(str, args.counts))} --size {args.size} "
        f"--threads {args.threads} --extractor-steps {args.extractor_steps}`",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores ({platform.processor() or 'cpu'}), torch "
        f"{torch.__version__}, {args.threads} thread(s); load average at the end {load[0]:.2f} / {load[1]:.2f} / "
        f"{load[2]:.2f} (1 / 5 / 15 min: a shared machine). Extractor: the shapes judge at {args.size} px, "
        f"{rows[0]['dim']} features, sha256 {file_sha256(ext)[:16]}...",
        "",
        "One pass = what `python -m dalle_fast.evaluate fid DIR` does for one folder: PNG decode, 8-bit RGB, the "
        "extractor in batches of 100, float64 running sums. Each count in a fresh process; peak RSS is the "
        "process's high-water mark (VmHWM), torch and the extractor included.",
        "",
        "| images | seconds | images/s (whole pass) | images/s (extractor calls) | peak RSS (MB) |",
        "|---:|---:|---:|---:|---:|",
        *(
            f"| {r['count']:,} | {r['seconds']:.1f} | {r['images_per_s']:.0f} | {r['extractor_images_per_s']:.0f} | "
            f"{r['peak_rss_mb']:.0f} |"
            for r in rows
        ),
        "",
    ]
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
