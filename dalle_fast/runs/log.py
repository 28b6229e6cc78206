"""A run's log: log.csv (one row per logged step), TensorBoard scalars (tb/) and its progress on stderr.

One writer per process that owns the run's output (rank 0 under torchrun); other ranks make a
`RunLog(None, ...)` whose methods do nothing. Progress: in a terminal a bar with rate and ETA (the
latest losses beside it); in a file or CI log a plain line per logged step (steps done, rate, ETA,
losses). TensorBoard is used when installed (`tensorboard --logdir RUN/tb`).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

from dalle_fast.files import atomic_write
from dalle_fast.progress import Progress, is_terminal


class RunLog:
    def __init__(
        self, out: Path | None, columns: list[str], tag: str, total: int, initial: int, resume: bool,
        time_limit: float = 0.0,
    ):  # fmt: skip
        """out: the run folder (None: log nothing); columns: the CSV's columns; tag: the TensorBoard
        prefix and the progress label; total/initial: the run's steps and those already done; resume:
        append to an existing log.csv, from which the rows after step `initial` (logged after the
        checkpoint the run resumes from, and logged again now) are dropped first (a resumed run with no
        log.csv starts one, header included); time_limit: the run's, for the ETA (0: none)."""
        self.columns, self.tag, self.time_limit = columns, tag, time_limit
        self.file = self.csv = self.tb = self.bar = None
        if out is None:
            return
        out.mkdir(parents=True, exist_ok=True)
        path = out / "log.csv"
        append = resume and path.exists()
        if append:
            _trim(path, initial)
        self.file = open(path, "a" if append else "w", newline="")
        self.csv = csv.writer(self.file)
        if not append:
            self.csv.writerow(columns)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tb"))
        except ImportError:  # tensorboard is optional
            pass
        # Lines come from row(), one per logged step, not from the clock.
        self.bar = Progress(total, tag, "step", initial, interval=math.inf)

    def step(self) -> None:
        """One update done."""
        if self.bar is not None:
            self.bar.update(1)

    def row(self, metrics: dict) -> None:
        """One CSV row (the columns' values; missing ones NaN), the finite values as scalars, and the
        progress: beside the bar in a terminal, else a line."""
        if self.csv is None:
            return
        self.csv.writerow([metrics.get(k, math.nan) for k in self.columns])
        self.file.flush()
        if self.tb is not None:
            for k, v in metrics.items():
                if k != "step" and isinstance(v, float | int) and not math.isnan(v):
                    self.tb.add_scalar(f"{self.tag}/{k}", v, metrics["step"])
        shown = {k: f"{v:.4g}" for k, v in metrics.items() if k not in ("step", "seconds") and _finite(v)}
        if is_terminal():
            self.bar.set_postfix(shown)
            return
        eta = self.bar.eta()
        if self.time_limit and "seconds" in metrics:
            left = max(0.0, self.time_limit - metrics["seconds"])
            eta = left if eta is None else min(eta, left)
        self.bar.say(self.bar.status(eta) + "".join(f" {k} {v}" for k, v in shown.items()))

    def print(self, message: str) -> None:
        """A line on stderr that does not break the progress bar."""
        if self.bar is not None:
            self.bar.say(message)

    def close(self) -> None:
        for part in (self.bar, self.tb, self.file):
            if part is not None:
                part.close()
        self.file = self.csv = self.tb = self.bar = None


def _finite(v) -> bool:
    return isinstance(v, float | int) and not isinstance(v, bool) and math.isfinite(v)


def _trim(path: Path, step: int) -> None:
    """Drops the rows of log.csv past `step` (a row that cannot be read ends the kept part)."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    kept = rows[:1]
    for row in rows[1:]:
        try:
            if int(row[0]) > step:
                break
        except (IndexError, ValueError):
            break
        kept.append(row)
    if len(kept) == len(rows):
        return

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            csv.writer(f).writerows(kept)

    atomic_write(path, write)
