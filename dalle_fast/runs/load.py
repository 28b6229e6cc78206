"""Loading trained runs: the dVAE, the transformer (with its tokenizer and dVAE) and the CLIP reranker.

Errors name the run folder and what is wrong with it; the command lines add the flag that named it.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from dalle_fast.data.tokenizer import CaptionTokenizer
from dalle_fast.models.clip import CLIP, CLIPConfig
from dalle_fast.models.dvae import DVAE, DVAEConfig
from dalle_fast.models.transformer import DALLE, TransformerConfig
from dalle_fast.runs.checkpoint import check_steps, load_config, load_weights


def load_model(run: str | Path, entry: str, name: str, build, weights: str) -> tuple[nn.Module, dict]:
    """(model in eval mode, the run's config.json) for a run directory: build(meta[entry]) makes the model,
    <run>/<weights> fills it."""
    meta = load_config(run)
    if entry not in meta:
        raise ValueError(f"{run} is not a {name} run (its config.json has no {entry!r} entry)")
    check_steps(run, meta, [weights])
    model = build(meta[entry])
    try:
        model.load_state_dict(load_weights(Path(run) / weights))
    except RuntimeError as e:
        raise ValueError(f"the weights in {run} do not match its config: {e}") from e
    return model.eval(), meta


def load_tokenizer(run: str | Path) -> CaptionTokenizer:
    """The caption tokenizer a transformer or CLIP run was trained with (its tokenizer.json)."""
    try:
        return CaptionTokenizer.load(Path(run) / "tokenizer.json")
    except (OSError, ValueError, json.JSONDecodeError) as e:
        raise ValueError(f"{run} has no readable tokenizer.json: {e}") from e


def same_tokenizer(run_a: str | Path, run_b: str | Path) -> bool:
    """Whether two runs' tokenizer.json map text to the same token ids (same BPE, same text_len; the BPE
    dropout and the list of seen words aside)."""
    payloads = []
    for run in (run_a, run_b):
        try:
            payload = json.loads((Path(run) / "tokenizer.json").read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"{run} has no readable tokenizer.json: {e}") from e
        payloads.append((payload.get("tokenizer"), payload.get("text_len")))
    return payloads[0] == payloads[1]


def load_dvae(run: str | Path) -> DVAE:
    """The stage-1 dVAE of a run directory, with its EMA weights, in eval mode."""
    return load_model(run, "dvae", "dVAE", lambda c: DVAE(DVAEConfig(**c)), "ema.safetensors")[0]


def load_transformer(run: str | Path, ema: bool = True) -> tuple[DALLE, CaptionTokenizer, DVAE]:
    """A trained stage-2 run: (transformer with its EMA or live weights, tokenizer, dVAE), in eval mode."""
    weights = "ema.safetensors" if ema else "model.safetensors"
    model, meta = load_model(run, "transformer", "transformer", lambda c: DALLE(TransformerConfig(**c)), weights)
    return model, load_tokenizer(run), load_dvae(meta["train"]["vae"])


def load_clip(run: str | Path) -> tuple[CLIP, CaptionTokenizer]:
    """A trained CLIP run: (model in eval mode, its tokenizer)."""
    model, _ = load_model(run, "clip", "CLIP", lambda c: CLIP(CLIPConfig(**c)), "model.safetensors")
    return model.eval(), load_tokenizer(run)


def stage_state(out: str | Path, steps: int, time_limit: float = 0.0) -> str:
    """A stage's run folder: "new", "partial" (a checkpoint short of `steps` and of `time_limit` seconds of
    training: resume it) or "done"."""
    out = Path(out)
    if not (out / "state.pt").exists() or not (out / "config.json").exists():
        return "new"
    meta = json.loads((out / "config.json").read_text())
    if meta.get("step", 0) >= steps or time_limit and meta.get("seconds", 0.0) >= time_limit:
        return "done"
    return "partial"
