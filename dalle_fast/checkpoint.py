"""Run directories: weights as safetensors, resumable state, a JSON config, all written atomically.

A run directory holds config.json (what was trained, how, at which step), one <name>.safetensors per set
of weights (model, ema, ...), and state.pt (optimizer, step, RNG: what --resume needs). Each file is
written to a temporary name and renamed over the old one, so a crash mid-write never leaves a
half-written checkpoint behind, and the previous complete one survives.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import torch


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """write(tmp) then rename tmp over path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def save_weights(path: Path, state_dict: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    atomic_write(path, lambda p: save_file({k: v.detach().contiguous() for k, v in state_dict.items()}, p))


def load_weights(path: Path, what: str = "weights") -> dict[str, torch.Tensor]:
    """safetensors -> state dict, with a ValueError naming the file when it is missing or damaged."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.exists():
        raise ValueError(f"{what}: {path} is missing")
    try:
        return load_file(path)
    except Exception as e:  # truncated or foreign files
        raise ValueError(f"{what}: {path} is unreadable: {type(e).__name__}: {e}") from e


def save_run(out: Path, weights: dict[str, dict[str, torch.Tensor]], state: dict, meta: dict) -> None:
    """One checkpoint: <name>.safetensors per entry of weights, state.pt, config.json (written last, so
    a config.json naming a step means that step's files are all complete)."""
    out = Path(out)
    for name, sd in weights.items():
        save_weights(out / f"{name}.safetensors", sd)
    atomic_write(out / "state.pt", lambda p: torch.save(state, p))
    atomic_write(out / "config.json", lambda p: p.write_text(json.dumps(meta, indent=1)))


def load_config(out: Path, what: str = "run") -> dict:
    path = Path(out) / "config.json"
    if not path.exists():
        raise ValueError(f"{what}: {Path(out)} is not a run directory (no config.json)")
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{what}: {path} is unreadable: {e}") from e


def load_model(run: Path, entry: str, name: str, build, weights: str, what: str) -> tuple[torch.nn.Module, dict]:
    """(model in eval mode, the run's config.json) for a run directory: build(meta[entry]) makes the model,
    <run>/<weights> fills it. ValueErrors name `what` (the flag) and say what is wrong."""
    meta = load_config(run, what)
    if entry not in meta:
        raise ValueError(f"{what}: {run} is not a {name} run (its config.json has no {entry!r} entry)")
    model = build(meta[entry])
    try:
        model.load_state_dict(load_weights(Path(run) / weights, what))
    except RuntimeError as e:
        raise ValueError(f"{what}: the weights in {run} do not match its config: {e}") from e
    return model.eval(), meta


def load_state(out: Path, what: str = "--resume") -> dict:
    path = Path(out) / "state.pt"
    if not path.exists():
        raise ValueError(f"{what}: no complete checkpoint in {Path(out)} (state.pt is missing)")
    try:
        # To the CPU: each process then moves what it needs to its own device (optimizer state goes to
        # its parameters' device), so N ranks do not all land on cuda:0, and a CUDA run resumes on a CPU.
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise ValueError(f"{what}: the checkpoint in {Path(out)} is unreadable: {type(e).__name__}: {e}") from e
