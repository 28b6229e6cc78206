"""Run directories: weights as safetensors, resumable state, a JSON config; one checkpoint at a time, whole.

A run directory holds config.json (what was trained, how, at which step), one <name>.safetensors per set
of weights (model, ema, ...), and state.pt (optimizer, step, RNG: what a resume needs). A checkpoint is
one unit: `save_run` writes all of its files into `.checkpoint.tmp/`, fsyncs them, marks the folder
complete, and only then moves the files into place (config.json last). A kill or a full disk while the
folder is written leaves the previous checkpoint untouched (the incomplete folder is dropped at the next
start, `recover`); a kill while the files are moved leaves a complete folder that `recover` finishes
moving. Every file records its step, and `check_steps` refuses a folder whose files disagree.

One process writes a run at a time: `RunLock` holds an OS lock on <run>/.lock, which the OS releases
when the process ends, so a killed run does not block its own resume.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import random
import shutil
from pathlib import Path

import torch

from dalle_fast.errors import FieldError
from dalle_fast.files import check_writable

JOURNAL = ".checkpoint.tmp"  # the checkpoint being written
COMPLETE = "COMPLETE"  # in the journal: every file is written and synced; its lines name them

# Fault injection for the tests: with DALLE_FAST_KILL_AT_MOVE=N the process kills itself (SIGKILL)
# right before the N-th file move of its checkpoints (counted from 1 over the process's life).
_moves = 0


def _before_move() -> None:
    global _moves
    _moves += 1
    if os.environ.get("DALLE_FAST_KILL_AT_MOVE") == str(_moves):
        os.kill(os.getpid(), 9)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """safetensors -> state dict, with a ValueError naming the file when it is missing or damaged."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path} is missing")
    try:
        return load_file(path)
    except Exception as e:  # truncated or foreign files
        raise ValueError(f"{path} is unreadable: {type(e).__name__}: {e}") from e


def weights_step(path: Path) -> int | None:
    """The step a safetensors file of this project was saved at (None: a file without one)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            step = (f.metadata() or {}).get("step")
    except Exception:  # unreadable: load_weights says so when it is loaded
        return None
    return int(step) if step is not None and step.lstrip("-").isdigit() else None


def save_run(out: Path, weights: dict[str, dict[str, torch.Tensor]], state: dict, meta: dict) -> None:
    """One checkpoint, whole (see the module docstring): <name>.safetensors per entry of weights,
    state.pt, config.json, each recording meta["step"]."""
    from safetensors.torch import save_file

    out = Path(out)
    journal = out / JOURNAL
    if journal.exists():
        shutil.rmtree(journal)
    journal.mkdir(parents=True)
    step = str(meta.get("step"))
    names = []
    for name, sd in weights.items():
        save_file({k: v.detach().contiguous() for k, v in sd.items()}, journal / f"{name}.safetensors", {"step": step})
        names.append(f"{name}.safetensors")
    torch.save(state, journal / "state.pt")
    (journal / "config.json").write_text(json.dumps(meta, indent=1))
    names += ["state.pt", "config.json"]  # config.json last: it names the step readers see
    for name in names:
        _fsync(journal / name)
    (journal / COMPLETE).write_text("\n".join(names) + "\n")
    _fsync(journal / COMPLETE)
    _fsync(journal)
    _move_into_place(out)


def _move_into_place(out: Path) -> None:
    journal = out / JOURNAL
    for name in (journal / COMPLETE).read_text().split():
        if (journal / name).exists():
            _before_move()
            os.replace(journal / name, out / name)
    _fsync(out)
    shutil.rmtree(journal)


def recover(out: Path) -> None:
    """At a writer's start: finish a checkpoint that was complete when the writer died, drop one that
    was not, and remove the temporary files of interrupted single-file writes."""
    out = Path(out)
    journal = out / JOURNAL
    if (journal / COMPLETE).exists():
        _move_into_place(out)
    elif journal.exists():
        shutil.rmtree(journal)
    for tmp in out.glob("*.tmp"):
        if tmp.is_file():
            tmp.unlink()


def check_steps(out: Path, meta: dict, names: list[str], state: dict | None = None) -> None:
    """ValueError unless config.json (read as `meta`), the named weights files and `state` (if given)
    record one step."""
    out = Path(out)
    steps = {"config.json": meta.get("step")}
    if state is not None:
        steps["state.pt"] = state.get("step")
    for name in names:
        steps[name] = weights_step(out / name)
    known = {k: v for k, v in steps.items() if v is not None}
    if len(set(known.values())) > 1:
        found = ", ".join(f"{k}: step {v}" for k, v in known.items())
        raise ValueError(
            f"{out} holds files of different checkpoints ({found}); a writer was stopped mid-checkpoint: "
            "resume the run (which completes or drops the unfinished checkpoint) or restore the folder"
        )


class RunLock:
    """An OS lock on <run>/.lock (POSIX record lock: released by the OS when the process ends) holding
    the writer's pid. A second process is refused with the holder's pid."""

    def __init__(self, out: Path):
        out = Path(out)
        self.path, self.fd = out / ".lock", None  # None until locked: __del__ after a refusal has nothing to close
        check_writable(out)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(self.fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(self.fd)
            self.fd = None
            if e.errno in (errno.EACCES, errno.EAGAIN):
                raise FieldError("out", f"{out} is being written by another run (pid {holder})") from e
            raise
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the lock
            self.fd = None

    def __del__(self):
        self.release()


def load_config(out: Path) -> dict:
    """A run directory's config.json; ValueError naming the folder when it is not a run."""
    path = Path(out) / "config.json"
    if not path.exists():
        raise ValueError(f"{Path(out)} is not a run directory (no config.json)")
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path} is unreadable: {e}") from e


def load_state(out: Path) -> dict:
    """The resumable state (state.pt) of a run directory."""
    path = Path(out) / "state.pt"
    if not path.exists():
        raise ValueError(f"no complete checkpoint in {Path(out)} (state.pt is missing)")
    try:
        # To the CPU: each process then moves what it needs to its own device (optimizer state goes to
        # its parameters' device), so N ranks do not all land on cuda:0, and a CUDA run resumes on a CPU.
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise ValueError(f"the checkpoint in {Path(out)} is unreadable: {type(e).__name__}: {e}") from e


def rng_state(device: torch.device) -> dict:
    """Every random number generator a run draws from: torch's CPU generator, Python's, and the CUDA
    generator of `device` when it is a GPU (one layout for every stage's checkpoint)."""
    state = {"torch_rng": torch.get_rng_state(), "python_rng": random.getstate()}
    if device.type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    """Restores what rng_state saved (a run that started on a CPU has no CUDA state to restore)."""
    torch.set_rng_state(state["torch_rng"])
    if "python_rng" in state:
        random.setstate(state["python_rng"])
    if device.type == "cuda" and "cuda_rng" in state:
        torch.cuda.set_rng_state(state["cuda_rng"], device)
