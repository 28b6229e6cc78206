"""Caption fidelity of a trained run from the command line: python -m dalle_fast.evaluate --run RUN.

Writes fidelity.md (a table) and fidelity.png (fidelity against the reranking sample size N) into
--out (default RUN/eval); see dalle_fast.evaluation.fidelity for what is measured.
"""

from __future__ import annotations

import json
from pathlib import Path

from dalle_fast.cli import build_parser, parse_config, run_or_exit
from dalle_fast.errors import field_errors
from dalle_fast.evaluation.fidelity import EvaluateConfig, evaluate, write_report
from dalle_fast.files import check_writable
from dalle_fast.runs.checkpoint import load_config


def prepare_output(run: str, out: Path) -> None:
    """Before the judge's training and the sampling: the run is a run, and its report has a place."""
    with field_errors("run"):
        load_config(run)
    check_writable(out)


def main(argv: list[str] | None = None) -> int:
    ap = build_parser(EvaluateConfig, "python -m dalle_fast.evaluate")
    cfg = parse_config(ap, EvaluateConfig, vars(ap.parse_args(argv)))
    out = Path(cfg.out or Path(cfg.run) / "eval")
    run_or_exit(ap, EvaluateConfig, prepare_output, cfg.run, out)
    results = run_or_exit(ap, EvaluateConfig, evaluate, cfg)
    md, png = write_report(results, out)
    print(md.read_text())
    print(json.dumps({"table": str(md), "plot": str(png)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
