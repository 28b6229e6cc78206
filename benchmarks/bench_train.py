"""End-to-end training throughput of the DALL-E transformer: the paper's sparse masks (through the
kernels) vs the same model with dense causal attention (PyTorch SDPA), and the share of each step spent
in attention (torch.profiler). Writes benchmarks/RESULTS_train.md and a PNG bar plot.

    python -m benchmarks.bench_train                 # CPU, 2 threads, presets tiny and long
    python -m benchmarks.bench_train --device cuda --precision bf16

One step = forward, backward and an AdamW update on synthetic tokens (the data pipeline is not timed).
The implementations take turns, step by step, and the best of --iters steps is kept, so both see the
same machine noise. Image tokens/s counts the image tokens of the batch (what stage 2 trains on).
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import sys
import time
from pathlib import Path

import torch

from dalle_fast.models.transformer import DALLE, preset

HERE = Path(__file__).parent
# (preset, batch): batch sized so one CPU step takes around a second or more.
CASES = [("tiny", 32), ("long", 2)]
MODES = ("sparse", "dense")
# Profiler events that are attention, outermost only (so nothing is counted twice): the forward ops, and
# the autograd engine's evaluation of their backward nodes.
ATTENTION_FORWARD = ("dalle_fast::sparse_attention_fwd", "aten::scaled_dot_product_attention")
ATTENTION_BACKWARD = ("sparse_attention", "ScaledDotProduct")


def make_step(name: str, batch: int, mode: str, device: str, precision: str):
    torch.manual_seed(0)
    cfg = preset(name, attention=mode)
    model = DALLE(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.96), weight_decay=4.5e-2)
    g = torch.Generator().manual_seed(1)
    text = torch.randint(0, cfg.text_vocab, (batch, cfg.text_len), generator=g).to(device)
    image = torch.randint(0, cfg.image_vocab, (batch, cfg.image_size**2), generator=g).to(device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

    def step():
        ctx = torch.autocast(device, dtype=dtype) if dtype else contextlib.nullcontext()
        with ctx:
            loss = model.loss(text, image)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device == "cuda":
            torch.cuda.synchronize()

    return step, cfg, model


def attention_share(step, device: str = "cpu") -> float:
    """Fraction of one step's time inside attention ops (forward and backward): CPU time on the CPU; on
    CUDA, the GPU time of the kernels the attention ops launched over the GPU time of all kernels (the
    CPU time of an op there is only its launch)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        step()
        total_us = (time.perf_counter() - t0) * 1e6
    attn, events = 0.0, prof.key_averages()
    for ev in events:
        backward = ev.key.startswith("autograd::engine::evaluate_function") and any(
            k in ev.key for k in ATTENTION_BACKWARD
        )
        if ev.key in ATTENTION_FORWARD or backward:
            attn += ev.device_time_total if cuda else ev.cpu_time_total
    if cuda:
        total_us = sum(ev.self_device_time_total for ev in events)
    return attn / max(total_us, 1e-9)


def run(args) -> list[dict]:
    rows = []
    for name, batch in CASES:
        if args.presets and name not in args.presets:
            continue
        steps = {m: make_step(name, batch, m, args.device, args.precision) for m in MODES}
        for m in MODES:  # warm-up (layouts, allocator, first-call costs)
            steps[m][0]()
        best = dict.fromkeys(MODES, float("inf"))
        for _ in range(args.iters):
            for m in MODES:
                t0 = time.perf_counter()
                steps[m][0]()
                best[m] = min(best[m], time.perf_counter() - t0)
        for m in MODES:
            step, cfg, model = steps[m]
            tokens = batch * cfg.image_size**2
            rows.append(
                {
                    "preset": name,
                    "mode": m,
                    "batch": batch,
                    "seq_len": cfg.seq_len,
                    "params_m": model.num_params() / 1e6,
                    "step_ms": best[m] * 1e3,
                    "image_tok_s": tokens / best[m],
                    "attn_share": attention_share(step, args.device),
                }
            )
            print(rows[-1], file=sys.stderr)
    return rows


def write_results(rows: list[dict], args) -> None:
    lines = [
        "# Training throughput: sparse masks vs dense causal attention",
        "",
        f"`python -m benchmarks.bench_train --iters {args.iters}` on {platform.processor() or platform.machine()}, "
        f"device {args.device}, precision {args.precision}, {torch.get_num_threads()} threads, torch "
        f"{torch.__version__}. One step = forward + backward + AdamW on synthetic tokens; best of {args.iters}, "
        "the two modes taking turns. Attention share: "
        + (
            "GPU time of the kernels the attention ops launched"
            if args.device == "cuda"
            else "CPU time of the attention ops"
        )
        + " (forward and backward) in one profiled step.",
        "",
        "| preset | sequence | params | batch | attention | step ms | image tokens/s | attention share | speed-up |",
        "|---|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        dense = next(d for d in rows if d["preset"] == r["preset"] and d["mode"] == "dense")
        speed = dense["step_ms"] / r["step_ms"]
        lines.append(
            f"| {r['preset']} | {r['seq_len']} | {r['params_m']:.1f}M | {r['batch']} | {r['mode']} | "
            f"{r['step_ms']:.0f} | {r['image_tok_s']:.0f} | {r['attn_share']:.0%} | {speed:.2f}x |"
        )
    out = Path(args.out) if args.out else HERE / f"RESULTS_train{'_' + args.device if args.device != 'cpu' else ''}.md"
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}", file=sys.stderr)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    names = sorted({r["preset"] for r in rows}, key=[c[0] for c in CASES].index)
    for i, m in enumerate(MODES):
        vals = [next(r["image_tok_s"] for r in rows if r["preset"] == n and r["mode"] == m) for n in names]
        ax.bar([j + 0.4 * i for j in range(len(names))], vals, width=0.4, label=m)
    ax.set_xticks([j + 0.2 for j in range(len(names))], names)
    ax.set_ylabel("image tokens / s")
    ax.set_title(f"Training throughput ({args.device})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--iters", type=int, default=5, help="timed steps per mode (best is kept)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--presets", nargs="*", default=None, help="subset of: tiny long")
    ap.add_argument("--out", default="", help="results file (and its .png); default benchmarks/RESULTS_train[_cuda].md")
    args = ap.parse_args()
    if args.device == "cuda" and args.precision == "fp32":
        ap.error("--device cuda needs --precision bf16 or fp16 (the CUDA kernels take fp16/bf16)")
    torch.set_num_threads(args.threads)
    write_results(run(args), args)


if __name__ == "__main__":
    main()
