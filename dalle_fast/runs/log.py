"""A run's log: log.csv (one row per logged step), TensorBoard scalars (tb/) and a progress bar.

One writer per process that owns the run's output (rank 0 under torchrun); other ranks make a
`RunLog(None, ...)` whose methods do nothing. TensorBoard and tqdm are used when installed; the bar
shows only on a terminal.
"""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path

from dalle_fast.files import atomic_write


class RunLog:
    def __init__(self, out: Path | None, columns: list[str], tag: str, total: int, initial: int, resume: bool):
        """out: the run folder (None: log nothing); columns: the CSV's columns; tag: the TensorBoard
        prefix and the bar's label; total/initial: the bar's steps; resume: append to an existing log.csv,
        from which the rows after step `initial` (logged after the checkpoint the run resumes from, and
        logged again now) are dropped first (a resumed run with no log.csv starts one, header included)."""
        self.columns, self.tag = columns, tag
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
        try:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=tag, dynamic_ncols=True, disable=not sys.stderr.isatty())
        except ImportError:
            pass

    def step(self) -> None:
        """One update done."""
        if self.bar is not None:
            self.bar.update(1)

    def row(self, metrics: dict) -> None:
        """One CSV row (the columns' values; missing ones NaN) and the finite values as scalars."""
        if self.csv is None:
            return
        self.csv.writerow([metrics.get(k, math.nan) for k in self.columns])
        self.file.flush()
        if self.tb is not None:
            for k, v in metrics.items():
                if k != "step" and isinstance(v, float | int) and not math.isnan(v):
                    self.tb.add_scalar(f"{self.tag}/{k}", v, metrics["step"])

    def print(self, message: str) -> None:
        """A line on stderr that does not break the progress bar."""
        if self.file is None:
            return
        if self.bar is not None:
            self.bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr)

    def close(self) -> None:
        for part in (self.bar, self.tb, self.file):
            if part is not None:
                part.close()
        self.file = self.csv = self.tb = self.bar = None


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
