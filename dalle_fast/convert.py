"""Converting released weights into runs of this project from the command line.

    python -m dalle_fast.convert openai-dvae ENCODER DECODER --out RUN [--image-size 256]

openai-dvae: OpenAI's released dVAE (encoder.pkl, decoder.pkl) -> a dVAE run folder, as `train vae`
writes one, for `train dalle --vae RUN`, `generate` and `dalle_fast.load_dvae(RUN)`. The files are read
without running code from them (dalle_fast.runs.torch_pickle); docs/openai_dvae.md has the recipe.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field

from dalle_fast.cli import build_parser, parse_config, run_or_exit
from dalle_fast.runs.openai_dvae import convert_openai_dvae, write_dvae_run

USAGE = __doc__.split("\n\n")[1]


@dataclass
class OpenAIDVAEConfig:
    """OpenAI's released dVAE (encoder.pkl, decoder.pkl) as a dVAE run."""

    out: str = field(default="runs/openai-dvae", metadata={"help": "run directory to write"})
    image_size: int = field(
        default=256,
        metadata={"help": "image side the run records (the released model's: 256; any multiple of 8 encodes)"},
    )

    def __post_init__(self):
        if self.image_size < 8 or self.image_size % 8:
            raise ValueError(f"image_size must be a positive multiple of 8, got {self.image_size}")


def convert(cfg: OpenAIDVAEConfig, encoder: str, decoder: str) -> dict:
    model, source = convert_openai_dvae(encoder, decoder, cfg.image_size)
    out = write_dvae_run(cfg.out, model, source)
    c = model.cfg
    return {"out": str(out), "codebook": c.codebook, "grid": c.grid, "image_size": c.image_size, "hidden": c.hidden}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] != "openai-dvae":
        print(f"usage:\n{USAGE}", file=sys.stderr)
        return 2
    ap = build_parser(OpenAIDVAEConfig, "python -m dalle_fast.convert openai-dvae")
    ap.add_argument("encoder", help="the released encoder.pkl")
    ap.add_argument("decoder", help="the released decoder.pkl")
    args = vars(ap.parse_args(argv[1:]))
    encoder, decoder = args.pop("encoder"), args.pop("decoder")
    cfg = parse_config(ap, OpenAIDVAEConfig, args)
    print(json.dumps(run_or_exit(ap, OpenAIDVAEConfig, convert, cfg, encoder, decoder)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
