"""What a dVAE lets the transformer draw: the caption ceiling of dVAE runs on the built-in shapes data.
Writes benchmarks/RESULTS_dvae_ceiling.md.

    python -m dalle_fast.train vae --out runs/vae_cb64 --codebook 64 --steps 1500 --threads 2
    python -m dalle_fast.train vae --out runs/vae_cb256 --steps 1500 --threads 2
    python -m benchmarks.dvae_ceiling runs/vae_cb64 runs/vae_cb256 --threads 2

The judge is python -m dalle_fast.evaluate's attribute classifier (trained once, same seed), and the
figure is evaluate's ceiling column: the share of real images of each split (held-out colour-shape pairs,
seen pairs) whose every colour-shape pair the judge finds in the dVAE's reconstruction (argmax codes, EMA
weights). No sampler of that dVAE's codes scores higher, whatever the transformer learns.
"""

from __future__ import annotations

import argparse
import platform
from pathlib import Path

import torch

from dalle_fast.evaluation.fidelity import CEILING_IMAGES, dvae_ceiling, train_classifier
from dalle_fast.runs.checkpoint import load_config
from dalle_fast.runs.load import load_dvae

OUT = Path(__file__).resolve().parent / "RESULTS_dvae_ceiling.md"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="dVAE run directories (python -m dalle_fast.train vae --out RUN)")
    ap.add_argument("--classifier-steps", type=int, default=1200, help="updates of the judge (evaluate's)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the judge and of the images")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0: torch's default")
    ap.add_argument("--out", default=str(OUT), help="the Markdown table")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows, judge = [], None
    for run in args.runs:
        dvae = load_dvae(run)
        meta = load_config(run)
        if judge is None or judge["size"] != dvae.cfg.image_size:
            judge = train_classifier(dvae.cfg.image_size, steps=args.classifier_steps, seed=args.seed)
            judge["size"] = dvae.cfg.image_size
        held, seen = (dvae_ceiling(judge["model"], dvae, s, args.seed) for s in ("heldout", "val"))
        c = dvae.cfg
        rows.append((run, c.grid, c.codebook, c.hidden, meta["step"], meta["seconds"], held, seen))
        print(f"{run}: held-out {held['recon']:.1%}, seen {seen['recon']:.1%}", flush=True)
    lines = [
        "# The dVAE's caption ceiling (`python -m benchmarks.dvae_ceiling`)",
        "",
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; judge: {args.classifier_steps} updates, seed {args.seed}, "
        f"accuracy {judge['accuracy']:.1%} on real images; {CEILING_IMAGES} images a split.",
        "",
        "| run | grid | codes | hidden | updates | training s | real: held-out / seen | reconstructions: "
        "held-out / seen |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run, grid, codes, hidden, step, secs, held, seen in rows:
        lines.append(
            f"| `{run}` | {grid}x{grid} | {codes} | {hidden} | {step:,} | {secs:.0f} | "
            f"{held['real']:.1%} / {seen['real']:.1%} | **{held['recon']:.1%} / {seen['recon']:.1%}** |"
        )
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
