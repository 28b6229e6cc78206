"""Evaluation from the command line.

    python -m dalle_fast.evaluate --run RUN            caption fidelity on the built-in shapes data (the default)
    python -m dalle_fast.evaluate images --run RUN --data SPEC
                                                       FID, IS, CLIP score and the rerank-N curve of a run
                                                       on any data spec (dalle_fast.evaluation.quality)
    python -m dalle_fast.evaluate fid DIR_A [DIR_B] --extractor ...
                                                       FID between two image folders, IS of one (one JSON line)

Caption fidelity writes fidelity.md (a table) and fidelity.png (fidelity against the reranking sample
size N) into --out (default RUN/eval); see dalle_fast.evaluation.fidelity for what is measured.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from dalle_fast.cli import build_parser, json_line, parse_config, run_or_exit
from dalle_fast.errors import field_errors
from dalle_fast.evaluation.fid import FidConfig, compare_folders
from dalle_fast.evaluation.fidelity import EvaluateConfig, evaluate, write_report
from dalle_fast.evaluation.quality import ImagesConfig, evaluate_images, report_folder, write_quality_report
from dalle_fast.files import check_writable
from dalle_fast.runs.checkpoint import load_config

PROG = "python -m dalle_fast.evaluate"


def prepare_output(run: str, out: Path) -> None:
    """Before the judge's training and the sampling: the run is a run, and its report has a place."""
    with field_errors("run"):
        load_config(run)
    check_writable(out)


def fidelity_main(argv: list[str] | None) -> int:
    ap = build_parser(EvaluateConfig, PROG)
    cfg = parse_config(ap, EvaluateConfig, vars(ap.parse_args(argv)))
    out = Path(cfg.out or Path(cfg.run) / "eval")
    run_or_exit(ap, EvaluateConfig, prepare_output, cfg.run, out)
    results = run_or_exit(ap, EvaluateConfig, evaluate, cfg)
    md, png = write_report(results, out)
    print(md.read_text())
    print(json.dumps({"table": str(md), "plot": str(png)}))
    return 0


def fid_main(argv: list[str]) -> int:
    ap = build_parser(FidConfig, PROG + " fid")
    cfg = parse_config(ap, FidConfig, vars(ap.parse_args(argv)))
    result = run_or_exit(ap, FidConfig, compare_folders, cfg)
    print(json_line(result))
    return 0


def images_main(argv: list[str]) -> int:
    ap = build_parser(ImagesConfig, PROG + " images")
    cfg = parse_config(ap, ImagesConfig, vars(ap.parse_args(argv)))
    out = Path(cfg.out or Path(cfg.run) / "eval")
    run_or_exit(ap, ImagesConfig, prepare_output, cfg.run, out)
    report = report_folder(cfg, out)
    run_or_exit(ap, ImagesConfig, check_writable, report, "report")
    results = run_or_exit(ap, ImagesConfig, evaluate_images, cfg, out)
    md = write_quality_report(results, report)
    print(md.read_text())
    print(json.dumps({"report": str(md), "results": str(report / "quality.json")}))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "fid":
        return fid_main(args[1:])
    if args and args[0] == "images":
        return images_main(args[1:])
    return fidelity_main(args)


if __name__ == "__main__":
    raise SystemExit(main())
