"""Data parallelism on the CPU (gloo): two processes vs one, and what PowerSGD saves on the wire.
Writes benchmarks/RESULTS_distributed.md.

    python -m benchmarks.bench_distributed                   # preset small, 2 processes, 1 thread each

Every configuration trains the same model on the same global batch of synthetic tokens for --steps
updates (after --warmup untimed ones); the time per update is the median. Bytes per step are the
gradient bytes each rank hands to all-reduce: the parameter count for plain DDP, and PowerSGD's own
count of compressed and uncompressed elements plus the embeddings and heads it leaves uncompressed.
The PowerSGD rank follows the paper's ratio r / d_model = 896 / 3968.
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

HERE = Path(__file__).parent
PAPER_RATIO = 896 / 3968


def _worker(rank: int, world: int, port: int, args, mode: str, rank_r: int, out) -> None:
    from dalle_fast.models.transformer import DALLE, preset
    from dalle_fast.training.distributed import DistInfo, LossModule, bytes_per_step, sync_uncompressed, wrap_ddp

    torch.set_num_threads(args.threads)
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    info = DistInfo(rank, world, 0)
    torch.manual_seed(0)
    cfg = preset(args.preset)
    model = DALLE(cfg)
    held_out, state = [], None
    if world > 1:
        fwd, held_out, state = wrap_ddp(model, info, torch.device("cpu"), rank_r, fp16_comm=args.fp16_comm)
    else:
        fwd = LossModule(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(1)
    text = torch.randint(0, cfg.text_vocab, (args.batch, cfg.text_len), generator=g).chunk(world)[rank]
    image = torch.randint(0, cfg.image_vocab, (args.batch, cfg.image_size**2), generator=g).chunk(world)[rank]
    times = []
    for step in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        loss = fwd(text, image)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        sync_uncompressed(held_out, info)
        opt.step()
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
    if rank == 0:
        sent = bytes_per_step(model, state, held_out, fp16_comm=args.fp16_comm)
        out.put(
            {
                "mode": mode,
                "processes": world,
                "rank": rank_r,
                "step_s": statistics.median(times),
                "params": sum(p.numel() for p in model.parameters()),
                "uncompressed_bytes": sent["uncompressed_bytes"],
                "sent_bytes": sent.get("sent_bytes", sent["uncompressed_bytes"] if world > 1 else 0),
                "d_model": cfg.d_model,
            }
        )
    if world > 1:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args) -> list[dict]:
    from dalle_fast.models.transformer import preset

    rank_r = max(1, round(PAPER_RATIO * preset(args.preset).d_model))
    ctx = mp.get_context("spawn")
    rows = []
    setups = [("one process", 1, 0, True), ("DDP", 2, 0, True)]
    setups += [("DDP + PowerSGD, fp32 factors", 2, rank_r, False), ("DDP + PowerSGD, fp16 factors", 2, rank_r, True)]
    for mode, world, r, fp16 in setups:
        args.fp16_comm = fp16
        q = ctx.Queue()
        port = _free_port()  # one rendezvous port for every rank
        procs = [ctx.Process(target=_worker, args=(i, world, port, args, mode, r, q)) for i in range(world)]
        for p in procs:
            p.start()
        rows.append(q.get())
        for p in procs:
            p.join()
        print(rows[-1], file=sys.stderr)
    return rows


def write_results(rows: list[dict], args) -> None:
    from dalle_fast.training.distributed import paper_compression_rate

    one = rows[0]
    r = rows[-1]["rank"]
    d = rows[-1]["d_model"]
    lines = [
        "# Data parallelism on the CPU: throughput and bytes on the wire",
        "",
        f"`python -m benchmarks.bench_distributed --preset {args.preset} --batch {args.batch} --steps {args.steps} "
        f"--threads {args.threads}` on {platform.processor() or platform.machine()}, gloo, torch {torch.__version__}. "
        f"Global batch {args.batch} (split across processes), synthetic tokens, median of {args.steps} updates. "
        f"PowerSGD rank {r} = the paper's ratio 896/3968 x d_model {d}; its first 2 updates are plain all-reduce "
        "(error feedback needs them) and are among the warm-up.",
        "",
        "| setup | processes | s / update | samples / s | vs one process | bytes / update / rank | reduction |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        rate = args.batch / row["step_s"]
        red = 1 - row["sent_bytes"] / row["uncompressed_bytes"] if row["processes"] > 1 else float("nan")
        sent = f"{row['sent_bytes'] / 1e6:.1f} MB" if row["processes"] > 1 else "-"
        lines.append(
            f"| {row['mode']} | {row['processes']} | {row['step_s']:.3f} | {rate:.1f} | "
            f"{one['step_s'] / row['step_s']:.2f}x | {sent} | {'-' if red != red else f'{red:.1%}'} |"
        )
    lines += [
        "",
        f"The paper's formula 1 - 5r/(8 d_model) gives {paper_compression_rate(r, d):.1%} for this rank and width. "
        "PyTorch's PowerSGD sends, per n x m gradient matrix, P (n x r) and Q (m x r): 1 - r(n + m)/(nm), which "
        "for a transformer layer's four matrices is 1 - 4r/(3 d_model) in the gradients' dtype; sending the "
        "factors in fp16 (the default, as the paper communicated in fp16) halves that side. The embeddings and "
        "heads, sent uncompressed in fp32, lower the total reduction.",
    ]
    out = HERE / "RESULTS_distributed.md"
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}", file=sys.stderr)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch", type=int, default=8, help="global batch (split across processes)")
    ap.add_argument("--steps", type=int, default=5, help="timed updates")
    ap.add_argument("--warmup", type=int, default=3, help="untimed updates first (PowerSGD starts at the third)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    args = ap.parse_args()
    if args.batch % 2:
        ap.error("--batch must be even (it is split across two processes)")
    write_results(run(args), args)


if __name__ == "__main__":
    main()
