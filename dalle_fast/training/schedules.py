"""Schedules of the training runs: learning rates, the dVAE's temperature and KL weight.

With a time limit a run's schedules follow whichever runs out first, steps or time
(`schedule_position`), so a run cut short by the clock still ends with its schedules at their final
values; such a run is not bit-reproducible.
"""

from __future__ import annotations

import math


def cosine_anneal(step: int, total: int, start: float, end: float) -> float:
    """start at step 0 to end at step >= total, along half a cosine."""
    t = min(max(step / max(total, 1), 0.0), 1.0)
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * t))


def linear_ramp(step: int, total: int, end: float) -> float:
    return end * min(max(step / max(total, 1), 0.0), 1.0)


def schedule_position(step: int, seconds: float, steps: int, time_limit: float) -> float:
    """Where the schedules stand, in steps: `step`, or the share of the time limit used if that is further."""
    if not time_limit:
        return float(step)
    return max(float(step), steps * min(seconds / time_limit, 1.0))


def warmup_cosine(
    step: int, steps: int, lr: float, lr_end: float, warmup: int, seconds: float = 0.0, time_limit: float = 0.0
) -> float:
    """Linear warm-up to lr over `warmup` steps, then a cosine decay to lr_end at `steps` (or at the time
    limit, if that comes first)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    if time_limit:
        t = max(t, seconds / time_limit)
    t = min(1.0, t)
    return lr_end + (lr - lr_end) * 0.5 * (1 + math.cos(math.pi * t))
