"""Run directories: weights as safetensors, resumable state, a JSON config, all written atomically.

A run directory holds config.json (what was trained, how, at which step), one <name>.safetensors per set
of weights (model, ema, ...), and state.pt (optimizer, step, RNG: what --resume needs). Each file is
written to a temporary name and renamed over the old one, so a crash mid-write never leaves a
half-written checkpoint behind, and the previous complete one survives.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from dalle_fast.files import atomic_write


def save_weights(path: Path, state_dict: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    atomic_write(path, lambda p: save_file({k: v.detach().contiguous() for k, v in state_dict.items()}, p))


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


def save_run(out: Path, weights: dict[str, dict[str, torch.Tensor]], state: dict, meta: dict) -> None:
    """One checkpoint: <name>.safetensors per entry of weights, state.pt, config.json (written last, so
    a config.json naming a step means that step's files are all complete)."""
    out = Path(out)
    for name, sd in weights.items():
        save_weights(out / f"{name}.safetensors", sd)
    atomic_write(out / "state.pt", lambda p: torch.save(state, p))
    atomic_write(out / "config.json", lambda p: p.write_text(json.dumps(meta, indent=1)))


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
