"""Per-resblock gradient scaling vs torch.amp.GradScaler: time per optimizer step, and on CUDA the
kernel launches and host synchronisations of one step. Writes benchmarks/RESULTS_amp.md.

    python -m benchmarks.bench_amp                  # CPU, 2 threads
    python -m benchmarks.bench_amp --device cuda

The model: 64 resblocks, each a branch of 4 Linear layers (8 parameter tensors), plus an embedding
outside the blocks. Gradients are filled with fixed random values before every step (outside the
timer), so both sides do the same work every time. Ours: scaler.unscale_ + BlockAdamW.step +
scaler.update. Theirs: GradScaler.unscale_ + GradScaler.step(AdamW) + GradScaler.update.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from dalle_fast.training.amp import BlockAdamW, ResblockGradScaler

HERE = Path(__file__).parent


class Branch(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.layers = nn.Sequential(*[nn.Linear(width, width) for _ in range(4)])

    def forward(self, x):
        return self.layers(x)


def build(width, blocks, device, scaler=None):
    torch.manual_seed(0)
    branches = [Branch(width) for _ in range(blocks)]
    body = [scaler.residual(b, i) for i, b in enumerate(branches)] if scaler else branches
    return nn.Sequential(nn.Embedding(1024, width), *body).to(device)


def fill_grads(model, saved):
    for p, g in zip(model.parameters(), saved, strict=True):
        if p.grad is None:
            p.grad = g.clone()
        else:
            p.grad.copy_(g)


def make_steps(width, blocks, device, foreach):
    saved = [torch.randn_like(p) for p in build(width, blocks, device).parameters()]

    ours_scaler = ResblockGradScaler(blocks, device=device)
    ours_model = build(width, blocks, device, ours_scaler)
    ours_opt = BlockAdamW(ours_scaler.param_groups(ours_model), ours_scaler, lr=1e-4)

    def ours():
        ours_scaler.unscale_(ours_opt)
        ours_opt.step()
        ours_scaler.update()

    ref_model = build(width, blocks, device)
    ref_opt = torch.optim.AdamW(ref_model.parameters(), lr=1e-4, foreach=foreach)
    ref_scaler = torch.amp.GradScaler(device, init_scale=2.0**13)
    ref_scaler.scale(torch.ones((), device=device))  # creates its scale tensor, as scaling a loss would

    def theirs():
        ref_scaler.unscale_(ref_opt)
        ref_scaler.step(ref_opt)
        ref_scaler.update()

    return {
        "ResblockGradScaler + BlockAdamW": (ours, ours_model, saved),
        f"GradScaler + AdamW(foreach={foreach})": (theirs, ref_model, saved),
    }


def time_steps(steps, iters, device):
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    best = {name: float("inf") for name in steps}
    for it in range(iters + 2):
        for name, (fn, model, saved) in steps.items():
            fill_grads(model, saved)
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            if it >= 2:  # two warm-up rounds
                best[name] = min(best[name], (time.perf_counter() - t0) * 1e3)
    return best


def cuda_counts(fn, model, saved):
    """(kernel launches, host synchronisations) of one step."""
    fill_grads(model, saved)
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            torch.cuda.set_sync_debug_mode("warn")  # only around the step: our own synchronize is not counted
            try:
                fn()
            finally:
                torch.cuda.set_sync_debug_mode("default")
            torch.cuda.synchronize()
    syncs = sum("synchroniz" in str(w.message).lower() for w in caught)
    launches = sum(
        1
        for e in prof.events()
        if e.device_type == torch.autograd.DeviceType.CUDA and "Memcpy" not in e.name and "Memset" not in e.name
    )
    return launches, syncs


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--blocks", type=int, default=64)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--out", default=str(HERE / "RESULTS_amp.md"))
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is available")
    if min(args.threads, args.width, args.blocks, args.iters) < 1:
        ap.error("--threads, --width, --blocks and --iters must be >= 1")
    torch.set_num_threads(args.threads)

    rows = []
    for foreach in (False, True):
        steps = make_steps(args.width, args.blocks, args.device, foreach)
        times = time_steps(steps, args.iters, args.device)
        for name, ms in times.items():
            if rows and name == rows[0]["name"]:
                continue  # ours is the same in both rounds; keep the first measurement
            row = {"name": name, "ms": ms}
            if args.device == "cuda":
                row["launches"], row["syncs"] = cuda_counts(*steps[name])
            rows.append(row)
            print(row, flush=True)
    ours = rows[0]["ms"]
    n_params = sum(p.numel() for p in build(args.width, args.blocks, "cpu").parameters())
    n_tensors = len(list(build(args.width, args.blocks, "cpu").parameters()))
    where = (
        torch.cuda.get_device_name() if args.device == "cuda" else f"{platform.machine()} CPU, {args.threads} threads"
    )
    lines = [
        "# Per-resblock gradient scaling: optimizer step",
        "",
        f"Command: `python -m benchmarks.bench_amp {' '.join(sys.argv[1:])}`".rstrip(),
        "",
        f"{where}, torch {torch.__version__}. {args.blocks} resblocks x 8 tensors + an embedding: {n_tensors} "
        f"tensors, {n_params / 1e6:.1f}M fp32 parameters. Best of {args.iters} steps.",
        "",
        "| step | ms | ratio to ours |" + (" kernel launches | host syncs |" if args.device == "cuda" else ""),
        "|---|---:|---:|" + ("---:|---:|" if args.device == "cuda" else ""),
    ]
    for r in rows:
        extra = f" {r['launches']} | {r['syncs']} |" if args.device == "cuda" else ""
        lines.append(f"| {r['name']} | {r['ms']:.2f} | {r['ms'] / ours:.2f}x |{extra}")
    out = Path(args.out)
    tmp = out.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
