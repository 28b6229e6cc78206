"""Training from the command line: the main job, or one stage.

    python -m dalle_fast.train [flags]          the main job: every stage on the built-in data
    python -m dalle_fast.train vae [flags]      stage 1: the dVAE
    python -m dalle_fast.train dalle [flags]    stage 2: the transformer (needs --vae RUN)
    python -m dalle_fast.train clip [flags]     the reranker (needs --dalle RUN)

Each takes --help for its flags, which are its config dataclass's fields.
"""

from __future__ import annotations

import os
import sys

from dalle_fast.cli import build_parser, json_line, parse_config, run_or_exit
from dalle_fast.training.clip import CLIPTrainConfig, train_clip
from dalle_fast.training.dalle import DALLETrainConfig, train_dalle
from dalle_fast.training.pipeline import PipelineConfig, run_pipeline
from dalle_fast.training.vae import VAETrainConfig, train_vae

STAGES = {
    "all": (PipelineConfig, run_pipeline, "python -m dalle_fast.train"),
    "vae": (VAETrainConfig, train_vae, "python -m dalle_fast.train vae"),
    "dalle": (DALLETrainConfig, train_dalle, "python -m dalle_fast.train dalle"),
    "clip": (CLIPTrainConfig, train_clip, "python -m dalle_fast.train clip"),
}
USAGE = __doc__.split("\n\n")[1]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    stage = argv[0] if argv and not argv[0].startswith("-") else "all"
    if stage not in STAGES or stage == "all" and argv and not argv[0].startswith("-"):
        print(f"unknown stage {stage!r}\nusage:\n{USAGE}", file=sys.stderr)
        return 2
    cls, job, prog = STAGES[stage]
    ap = build_parser(cls, prog)
    cfg = parse_config(ap, cls, vars(ap.parse_args(argv[1:] if stage != "all" else argv)))
    result = run_or_exit(ap, cls, job, cfg)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun: one result line, rank 0's
        print(json_line(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
