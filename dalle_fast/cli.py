"""What every command line shares: flags made from a config dataclass, and library errors told in flags.

The library names a bad setting by its config field ("steps must be >= 1", dalle_fast.errors.FieldError
"vae: runs/x is not a run directory"); a command line says it with the flag the user typed (--steps,
--vae).
"""

from __future__ import annotations

import argparse
import json
import math
import re
from dataclasses import fields

from dalle_fast.errors import FieldError


def build_parser(cls, prog: str) -> argparse.ArgumentParser:
    """argparse flags from a config dataclass: --field-name, typed, defaults and help from the fields (a field
    with metadata["positional"] = nargs is a positional argument instead)."""
    ap = argparse.ArgumentParser(prog=prog, description=cls.__doc__)
    for f in fields(cls):
        flag = "--" + f.name.replace("_", "-")
        if "positional" in f.metadata:  # e.g. folders: DIR_A [DIR_B]; metadata["positional"] is its nargs
            ap.add_argument(f.name, nargs=f.metadata["positional"], help=f.metadata.get("help"))
        elif f.type in ("bool", bool):  # a switch; one that defaults to on also gets --no-field-name
            action = argparse.BooleanOptionalAction if f.default else "store_true"
            ap.add_argument(flag, action=action, default=f.default, help=f.metadata.get("help"))
        else:
            typ = {"int": int, "float": float, "str": str}.get(f.type, f.type)
            ap.add_argument(
                flag, type=typ, default=f.default, help=f"{f.metadata.get('help', '')} (default: {f.default})"
            )
    return ap


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def flag_message(error: ValueError, cls) -> str:
    """A library ValueError in the command line's words: the config field it names becomes its flag."""
    if isinstance(error, FieldError):
        positional = any(f.name == error.field and "positional" in f.metadata for f in fields(cls))
        return f"{error.field if positional else flag_name(error.field)}: {error.message}"
    message = str(error)
    names = {f.name for f in fields(cls)}
    m = re.match(r"(\w+)", message)
    if m and m.group(1) in names:  # "steps must be >= 1" -> "--steps must be >= 1"
        return flag_name(m.group(1)) + message[m.end() :]
    return message


def parse_config(ap: argparse.ArgumentParser, cls, values: dict):
    """cls(**values), with its ValueErrors reported as a usage error naming the flag (exit status 2)."""
    try:
        return cls(**values)
    except ValueError as e:
        ap.error(flag_message(e, cls))


def run_or_exit(ap: argparse.ArgumentParser, cls, job, *args):
    """job(*args), with a ValueError reported as an error naming the flag (exit status 2; the flags
    parsed, so no usage text above it)."""
    try:
        return job(*args)
    except ValueError as e:
        ap.exit(2, f"{ap.prog}: error: {flag_message(e, cls)}\n")


def json_line(result: dict) -> str:
    """A result as one line of valid JSON: floats rounded, NaN and infinities as null."""
    clean = {
        k: (None if not math.isfinite(v) else round(v, 4)) if isinstance(v, float) else v for k, v in result.items()
    }
    return json.dumps(clean)
