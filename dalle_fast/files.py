"""Writing a file so that a crash never leaves half of it: write a temporary file, then rename it; and a
file's SHA-256, which records and checks what a result was computed from."""

from __future__ import annotations

import hashlib
import os
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path

from dalle_fast.errors import FieldError


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> Path:
    """write(tmp), then rename tmp over path (a reader sees the old file or the new one, never a part).
    tmp is named for this process and a random part (<name>.<pid>.<hex>.tmp), so writers of the same path at
    once never share one; it is removed if write fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def check_writable(folder: str | Path, field: str = "out") -> Path:
    """Makes `folder` (and its parents) and proves a file can be written there, before any work whose
    results would go there; a FieldError of `field` otherwise (an unwritable, read-only or full place)."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".probe", suffix=".tmp"):
            pass
    except OSError as e:
        raise FieldError(field, f"cannot write to {folder}: {e.strerror or e}") from e
    return folder


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes (hex), read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
