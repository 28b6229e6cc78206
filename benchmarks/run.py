"""Benchmarks dalle_fast.sparse_attention against its peers and writes benchmarks/RESULTS.md + PNG plots.

    python -m benchmarks.run                      # CPU, 2 threads, paper + small shapes
    python -m benchmarks.run --shapes main --dtype bf16 --out benchmarks/RESULTS_main.md   # the main job's
    python -m benchmarks.run --device cuda --dtype bf16 --batch 8 --heads 16 --out benchmarks/results/h100.md

Peers on the same inputs and mask: SDPA dense causal (is_causal=True), SDPA with the boolean mask,
FlexAttention (compiled) with the same mask as a block mask. Peak extra memory of forward+backward is
measured in a fresh process per case (the rise of the process's peak RSS on CPU, or of
torch.cuda.max_memory_allocated on CUDA), so cases cannot hide inside each other's high-water marks.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import torch

from benchmarks.common import (
    MAIN,
    PAPER,
    SMALL,
    flops,
    forward_backward_fn,
    forward_fn,
    make_impls,
    make_inputs,
    time_interleaved,
)
from dalle_fast import MASK_KINDS

HERE = Path(__file__).parent
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def peak_extra_mb(shape, kind, impl, dtype, device) -> float | None:
    """Peak extra memory of one forward+backward, measured in a fresh process."""
    cfg = json.dumps({"shape": shape.__dict__, "kind": kind, "impl": impl, "dtype": dtype, "device": device})
    res = subprocess.run(
        [sys.executable, "-m", "benchmarks.peak_memory", cfg], capture_output=True, text=True, cwd=HERE.parent
    )
    try:
        return float(res.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return None


def bench_shape(shape, dtype_name, device, iters, with_memory, with_flex):
    dtype = DTYPES[dtype_name]
    rows = []
    for kind in MASK_KINDS:
        q, k, v, grad = make_inputs(shape, dtype, device)
        impls = make_impls(shape, kind, device, with_flex=with_flex)
        fwd = time_interleaved(
            {name: forward_fn(impl, q, k, v) for name, impl in impls.items()}, iters=iters, device=device
        )
        fwdbwd = time_interleaved(
            {name: forward_backward_fn(impl, q, k, v, grad) for name, impl in impls.items()}, iters=iters, device=device
        )
        for name in impls:
            row = {"shape": shape.name, "kind": kind, "impl": name, "fwd_ms": fwd[name], "fwdbwd_ms": fwdbwd[name]}
            if fwdbwd[name] is None:
                row["note"] = "no backward" if fwd[name] is not None else "failed"
            if with_memory and name != "flex_attention" and row["fwdbwd_ms"] is not None:
                row["peak_mb"] = peak_extra_mb(shape, kind, name, dtype_name, device)
            for key, bwd in (("fwd", False), ("fwdbwd", True)):
                ms = row[f"{key}_ms"]
                row[f"{key}_gflops"] = flops(shape, kind, bwd) / (ms * 1e6) if ms else None  # GFLOP/s
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def fmt(x, spec=".1f"):
    return "n/a" if x is None else format(x, spec)


def ratio(base, ours):
    return "n/a" if not base or not ours else f"{base / ours:.2f}x"


def write_markdown(rows, shapes, args, path: Path):
    # GFLOP/s on CPU, TFLOP/s on GPU.
    unit, div = ("TFLOP/s", 1e3) if args.device == "cuda" else ("GFLOP/s", 1.0)

    def rate(x):
        return fmt(None if x is None else x / div)

    lines = [
        "# Sparse attention benchmarks",
        "",
        f"Command: `python -m benchmarks.run {' '.join(sys.argv[1:])}`".rstrip(),
        "",
        f"Machine: {platform.processor() or platform.machine()}, device `{args.device}`"
        + (f" ({torch.cuda.get_device_name()})" if args.device == "cuda" else f", {torch.get_num_threads()} threads")
        + f", torch {torch.__version__}, dtype {args.dtype}.",
        "",
        "Times: best of --iters runs in ms, the implementations taking turns run by run"
        + (" (a run: calls queued back to back between CUDA events, time per call)." if args.device == "cuda" else "."),
        f"{unit} count only the unmasked (query, key) pairs of each mask, so a dense peer doing masked work",
        "scores low.",
        "Speed-up columns are the peer's time over dalle_fast's.",
        "Peak MB: rise of peak memory during one forward+backward, in a fresh process.",
        "",
    ]
    for shape in shapes:
        lines += [
            f"## {shape.name}: {shape.text_len} text + {shape.image_size}x{shape.image_size} image "
            f"(N = {shape.seq_len}), batch {shape.batch}, {shape.heads} heads, head dim {shape.head_dim}",
            "",
            f"| kind | impl | fwd ms | fwd+bwd ms | fwd {unit} | fwd+bwd {unit} | peak MB | note |",
            "|---|---|---:|---:|---:|---:|---:|---|",
        ]
        for r in (r for r in rows if r["shape"] == shape.name):
            lines.append(
                f"| {r['kind']} | {r['impl']} | {fmt(r['fwd_ms'], '.2f')} | {fmt(r['fwdbwd_ms'], '.2f')} | "
                f"{rate(r['fwd_gflops'])} | {rate(r['fwdbwd_gflops'])} | {fmt(r.get('peak_mb'))} | "
                f"{r.get('note', '')} |"
            )
        lines += ["", "Speed-up of dalle_fast over each peer:", ""]
        lines += ["| kind | vs SDPA causal fwd | fwd+bwd | vs SDPA mask fwd | fwd+bwd | vs Flex fwd | fwd+bwd |"]
        lines += ["|---|---:|---:|---:|---:|---:|---:|"]
        for kind in MASK_KINDS:
            by = {r["impl"]: r for r in rows if r["shape"] == shape.name and r["kind"] == kind}
            ours = by.get("dalle_fast", {})
            cells = []
            for peer in ("sdpa_dense_causal", "sdpa_bool_mask", "flex_attention"):
                p = by.get(peer, {})
                cells += [ratio(p.get("fwd_ms"), ours.get("fwd_ms")), ratio(p.get("fwdbwd_ms"), ours.get("fwdbwd_ms"))]
            lines.append(f"| {kind} | " + " | ".join(cells) + " |")
        lines.append("")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(path)


def update_readme(markdown: Path, readme: Path = HERE.parent / "README.md") -> None:
    """Copies the first shape's tables of RESULTS.md into README.md between the results markers."""
    begin, end = "<!-- results:begin -->", "<!-- results:end -->"
    text = readme.read_text()
    if begin not in text or end not in text:
        return
    sections = markdown.read_text().split("\n## ")
    first = "### " + sections[1].strip() if len(sections) > 1 else ""
    source = markdown.relative_to(readme.parent)
    block = f"{begin}\n{first}\n\n(From `{source}`, written by `python -m benchmarks.run`.)\n{end}"
    head, rest = text.split(begin, 1)
    tmp = readme.with_suffix(".tmp")
    tmp.write_text(head + block + rest.split(end, 1)[1])
    tmp.replace(readme)


def plot(rows, shape, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    impls = list(dict.fromkeys(r["impl"] for r in rows if r["shape"] == shape.name))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, title in ((axes[0], "fwd_ms", "forward"), (axes[1], "fwdbwd_ms", "forward + backward")):
        width = 0.8 / len(impls)
        for n, impl in enumerate(impls):
            vals = []
            for kind in MASK_KINDS:
                r = next((r for r in rows if r["shape"] == shape.name and r["kind"] == kind and r["impl"] == impl), {})
                vals.append(r.get(key) or 0.0)
            ax.bar([x + n * width for x in range(len(MASK_KINDS))], vals, width, label=impl)
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(MASK_KINDS))], MASK_KINDS)
        ax.set_ylabel("ms (lower is better)")
        ax.set_title(f"{title}, {shape.name} shape")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    ap.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--batch", type=int, default=None, help="override the paper shape's batch")
    ap.add_argument("--heads", type=int, default=None, help="override the paper shape's heads")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    ap.add_argument("--no-flex", action="store_true", help="skip FlexAttention (its compile is slow)")
    ap.add_argument("--shapes", nargs="+", default=["paper", "small"], choices=["paper", "small", "main"])
    ap.add_argument("--out", default=str(HERE / "RESULTS.md"))
    args = ap.parse_args()
    if args.threads < 1:
        ap.error("--threads must be >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is available")
    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # for the peak-memory subprocesses

    paper = replace(PAPER, batch=args.batch or PAPER.batch, heads=args.heads or PAPER.heads)
    shapes = [s for s in (paper, SMALL, MAIN) if s.name in args.shapes]
    rows = []
    for shape in shapes:
        rows += bench_shape(shape, args.dtype, args.device, args.iters, not args.no_memory, not args.no_flex)
    out = Path(args.out)
    write_markdown(rows, shapes, args, out)
    (out.with_suffix(".json")).write_text(json.dumps(rows, indent=1))
    try:
        for shape in shapes:
            plot(rows, shape, out.with_name(f"{out.stem}_{shape.name}.png"))
    except ImportError as e:  # the tables and JSON are written; plots need matplotlib
        print(f"no plots: {e}")
    if out.resolve() == (HERE / "RESULTS.md").resolve():
        update_readme(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
