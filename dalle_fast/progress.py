"""Progress of long work, for a person at a terminal and for a log file alike.

In a terminal (stderr is a tty) a tqdm bar with rate and ETA; anywhere else (a file, a CI log, a pipe)
no control characters: a plain line at most every `interval` seconds and one at the end. `say` prints a
line of its own without breaking the bar.
"""

from __future__ import annotations

import sys
import time


def is_terminal() -> bool:
    return sys.stderr.isatty()


def duration(seconds: float) -> str:
    """12s, 3m05s, 2h07m."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class Progress:
    """`total` units of work (0: unknown) named `desc`, `initial` of them already done (a resume)."""

    def __init__(self, total: int, desc: str, unit: str = "it", initial: int = 0, interval: float = 30.0):
        self.total, self.desc, self.unit, self.done = total, desc, unit, initial
        self.interval, self.started, self.start_done = interval, time.time(), initial
        self.last_line = self.started
        self.bar = None
        if is_terminal():
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total or None, initial=initial, desc=desc, unit=unit, dynamic_ncols=True)
            except ImportError:  # tqdm is a dependency; without it, lines
                pass

    def rate(self) -> float:
        """Units per second since this Progress began."""
        return (self.done - self.start_done) / max(time.time() - self.started, 1e-9)

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif time.time() - self.last_line >= self.interval:
            self.say(self.status())

    def eta(self) -> float | None:
        """Seconds left at the current rate (None: not known)."""
        rate = self.rate()
        return (self.total - self.done) / rate if self.total and rate > 0 else None

    def status(self, eta: float | None = None, final: bool = False) -> str:
        """'desc 150/3000 (5%), 2.1 it/s, ETA 22m37s'; eta (seconds) replaces the estimate from the rate."""
        line = f"{self.desc} {self.done}" + (f"/{self.total} ({self.done / self.total:.0%})" if self.total else "")
        line += f", {self.rate():.3g} {self.unit}/s"
        if final:
            return line + f", done in {duration(time.time() - self.started)}"
        eta = self.eta() if eta is None else eta
        return line + (f", ETA {duration(eta)}" if eta is not None else "")

    def say(self, message: str) -> None:
        """A line on stderr (through the bar in a terminal)."""
        self.last_line = time.time()
        if self.bar is not None:
            self.bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr, flush=True)

    def set_postfix(self, values: dict) -> None:
        if self.bar is not None:
            self.bar.set_postfix(values, refresh=False)

    def close(self) -> None:
        """Ends the bar; in a log, a last line when the work took longer than one interval."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif time.time() - self.started >= self.interval:
            self.say(self.status(final=True))
