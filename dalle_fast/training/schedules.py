"""Schedules of the training runs: how far along a run is (`Budget`), learning rates, the dVAE's
temperature and KL weight.

Every schedule is a function of one number, the run's progress from 0 to 1 (`Budget.progress`): its
steps or its training time, whichever is further along. So a run cut short by its time limit still ends
with its schedules at their final values (such a run is not bit-reproducible), and a resume that raises
--steps or --time-limit stretches what is left of the schedules instead of sending them back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Budget:
    """What a run may spend, and where its schedules stand.

    The time limit counts training time across resumes (the run's total, not the session's). After a
    resume that changed steps or time_limit, the progress the run had reached (from_progress, at
    from_step and from_seconds) is kept and the rest of the way to 1 is spread over what the new budget
    leaves, so no schedule jumps."""

    steps: int  # updates in the whole run
    time_limit: float = 0.0  # seconds of training in the whole run; 0: none
    from_step: int = 0
    from_seconds: float = 0.0
    from_progress: float = 0.0

    def progress(self, step: int, seconds: float) -> float:
        """0 -> 1: the larger of the shares of steps and of time used (of what was left at from_*)."""
        share = (step - self.from_step) / max(self.steps - self.from_step, 1)
        if self.time_limit:
            share = max(share, (seconds - self.from_seconds) / max(self.time_limit - self.from_seconds, 1e-9))
        return min(1.0, max(0.0, self.from_progress + (1.0 - self.from_progress) * share))

    def spent(self, step: int, seconds: float) -> bool:
        """Nothing left to do: every step done, or the time limit reached."""
        return step >= self.steps or bool(self.time_limit) and seconds >= self.time_limit

    def resumed(self, steps: int, time_limit: float, step: int, seconds: float) -> Budget:
        """This budget continued at (step, seconds) under the given settings: itself when they are the
        same (a resume goes on exactly as if never stopped), else one that starts where this one stood."""
        if (steps, time_limit) == (self.steps, self.time_limit):
            return self
        return Budget(steps, time_limit, step, seconds, self.progress(step, seconds))


def cosine_anneal(step: float, total: float, start: float, end: float) -> float:
    """start at step 0 to end at step >= total, along half a cosine (steps or shares of a run alike)."""
    t = min(max(step / max(total, 1e-12), 0.0), 1.0)
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * t))


def linear_ramp(step: float, total: float, end: float) -> float:
    return end * min(max(step / max(total, 1e-12), 0.0), 1.0)


def warmup_cosine(step: int, progress: float, lr: float, lr_end: float, warmup: int, steps: int) -> float:
    """Linear warm-up to lr over the first `warmup` steps, then a cosine decay to lr_end at progress 1
    (the share of the run past the warm-up's share, warmup / steps)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    w = min(warmup / max(steps, 1), 1.0)
    t = (progress - w) / (1.0 - w) if w < 1.0 else 1.0
    return cosine_anneal(t, 1.0, lr, lr_end)
