"""Errors that name what is wrong in the library's own words: a config field, a path.

The command lines turn a field's name into its flag (dalle_fast.cli.flag_message), so the library never
speaks of flags and a caller of the library reads the names it passed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math


class FieldError(ValueError):
    """A bad value of one config field: str() is "field: message"; `field` and `message` apart."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message


@contextlib.contextmanager
def field_errors(field: str):
    """Turns a ValueError raised in the block (a path that is not a run, a file that is unreadable) into
    a FieldError of `field`, the setting that named it."""
    try:
        yield
    except FieldError:
        raise
    except ValueError as e:
        raise FieldError(field, str(e)) from e


def check_finite(cfg) -> None:
    """FieldError for the first float field of a config dataclass that is NaN or infinite (every config
    calls it first in __post_init__, so no float setting can train NaN weights or break sampling)."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise FieldError(f.name, f"must be a finite number, got {value}")
