"""The dVAE at the paper's shape against OpenAI's own modules: encode + decode of 256x256 images on the CPU.
Writes benchmarks/RESULTS_dvae_openai.md.

    pip install -e ".[openai-parity]" && pip install --no-deps "DALL-E==0.1"
    OMP_NUM_THREADS=2 python -m benchmarks.dvae_vs_openai --threads 2 --batch 2 --iters 3

Both sides hold the same weights: DALL-E 0.1's Encoder and Decoder at their released size (random, as
constructed) are saved whole, as the released files are, and converted (python -m dalle_fast.convert
openai-dvae); the converted run is loaded with dalle_fast.load_dvae. One run = argmax codes of a batch of
images and their decoded reconstructions, in fp32:

    ours:   dvae.decode(dvae.encode(x))
    OpenAI: unmap_pixels(sigmoid(dec(one_hot(enc(map_pixels(x)).argmax(1)))[:, :3]))

The two take turns run by run and the best of --iters is kept, so both see the same machine noise; images/s
= batch / seconds. The codes of the two sides are checked to be identical.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

OUT = Path(__file__).resolve().parent / "RESULTS_dvae_openai.md"


def _load_peers(tmp: Path):
    from dall_e.decoder import Decoder
    from dall_e.encoder import Encoder

    import dalle_fast
    from dalle_fast.convert import main as convert

    torch.manual_seed(0)
    enc, dec = Encoder(), Decoder()  # the released size: 4 groups x 2 blocks, hidden 256, 8192 codes
    torch.save(enc, tmp / "encoder.pkl")
    torch.save(dec, tmp / "decoder.pkl")
    convert(["openai-dvae", str(tmp / "encoder.pkl"), str(tmp / "decoder.pkl"), "--out", str(tmp / "run")])
    return enc.eval(), dec.eval(), dalle_fast.load_dvae(tmp / "run")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=2, help="images per run")
    ap.add_argument("--iters", type=int, default=3, help="runs per side (the best is kept)")
    ap.add_argument("--size", type=int, default=256, help="image side")
    ap.add_argument("--note", default="", help="a line under the table (e.g. the machine's load)")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from dall_e.utils import map_pixels, unmap_pixels

    with tempfile.TemporaryDirectory() as tmp:
        enc, dec, dvae = _load_peers(Path(tmp))
    x = torch.rand(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(1))

    @torch.no_grad()
    def openai():
        codes = enc(map_pixels(x)).argmax(1)
        z = F.one_hot(codes, enc.vocab_size).permute(0, 3, 1, 2).float()
        return codes, unmap_pixels(torch.sigmoid(dec(z)[:, :3]))

    @torch.no_grad()
    def ours():
        codes = dvae.encode(x)
        return codes, dvae.decode(codes)

    best = {"dalle_fast": float("inf"), "OpenAI DALL-E 0.1": float("inf")}
    results = {}
    for _ in range(args.iters):
        for name, fn in (("dalle_fast", ours), ("OpenAI DALL-E 0.1", openai)):
            t0 = time.perf_counter()
            results[name] = fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    same = torch.equal(results["dalle_fast"][0], results["OpenAI DALL-E 0.1"][0])
    diff = (results["dalle_fast"][1] - results["OpenAI DALL-E 0.1"][1]).abs().max().item()
    rate = {k: args.batch / v for k, v in best.items()}
    ratio = rate["dalle_fast"] / rate["OpenAI DALL-E 0.1"]
    lines = [
        "# The dVAE against OpenAI's modules (encode + decode, CPU, fp32)",
        "",
        f"`python -m benchmarks.dvae_vs_openai --threads {args.threads} --batch {args.batch} --iters {args.iters} "
        f"--size {args.size}`, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, torch.set_num_threads({args.threads}); "
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs.",
        "",
        f"The paper's dVAE shape (4 groups x 2 blocks, hidden 256, 8192 codes), random weights, {args.batch} image(s) "
        f"of {args.size}x{args.size} per run, best of {args.iters} alternating runs. Codes identical: {same}; "
        f"largest pixel difference of the reconstructions: {diff:.1e}.",
        "",
        "| model | seconds per run | images/s |",
        "|---|---|---|",
        *[f"| {k} | {best[k]:.2f} | {rate[k]:.3f} |" for k in best],
        "",
        f"Ratio (dalle_fast / OpenAI): **{ratio:.2f}**.",
    ]
    if args.note:
        lines += ["", args.note]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
