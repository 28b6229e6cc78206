"""The training skeleton every stage shares (the dVAE, the transformer, the CLIP reranker).

`TrainingRun` owns what is the same in every run: CPU threads, refusing to overwrite a run and resuming
one, the RNG state, the parameter EMA, the budget (steps and a time limit counted across resumes, and
where the schedules stand: `progress()`), the run log (log.csv, TensorBoard, progress bar and log lines),
the checkpoint cadence and rank-0-only output under torchrun. A stage subclasses it and supplies only its
own parts:

    update(step) -> dict          one optimizer update; returns its losses (tensors or floats)
    log_values(losses) -> dict    the floats of a log row from those losses (default: each as a float)
    evaluate() -> dict            held-out metrics, at checkpoints
    at_checkpoint(metrics)        pictures and a line for the terminal, after the checkpoint is saved
    after_log()                   after each logged step
    extra_state() / load_extra_state(state)   what else a resume needs (default: the optimizer, self.opt)
    check_resume(state, meta)     refuses a checkpoint of another configuration
    weights() -> dict             the state dicts to save as safetensors (default: model, ema)
    load_weights(weights)         puts them back on resume
    meta() -> dict                config.json: what was trained, how

A new run can start from another run's weights (`start_from`, the stages' --init-from): fine-tuning, with
its own data, a fresh optimizer and schedules from their start; config.json records where it started.

A batch is a pure function of (seed, step) (`dalle_fast.data.batches.step_generator`), and the RNG
state travels in the checkpoint, so a resumed run continues exactly where an uninterrupted one would.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
import sys
import time
from pathlib import Path

import torch

from dalle_fast.errors import FieldError, field_errors
from dalle_fast.runs import checkpoint
from dalle_fast.runs.checkpoint import (
    COMPLETE,
    JOURNAL,
    RunLock,
    check_steps,
    load_state,
    recover,
    rng_state,
    save_run,
    set_rng_state,
)
from dalle_fast.runs.log import RunLog
from dalle_fast.training.distributed import DistInfo, barrier, rank0_value
from dalle_fast.training.schedules import Budget

# Every stage's --init-from, said once.
INIT_FROM_HELP = (
    "start a new run from this run's weights (its EMA weights where it keeps them): new data, a fresh optimizer, "
    "schedules from their start, the same model configuration (and tokenizer and dVAE); not with --resume, "
    "which continues the run in --out"
)


def check_init_from(cfg) -> None:
    """--init-from starts a new run, --resume continues one: a config's __post_init__ refuses both."""
    if cfg.init_from and cfg.resume:
        raise FieldError(
            "init_from",
            "does not combine with resume: resume continues the run in out exactly; init_from starts a new run "
            "from another run's weights",
        )


def config_differences(theirs: dict, mine: dict, ignore: tuple[str, ...] = ()) -> list[str]:
    """ "field: V there, W here" for each field of two configs (as dicts) that differ."""
    keys = [k for k in dict.fromkeys([*mine, *theirs]) if k not in ignore]
    return [f"{k} {theirs.get(k)!r} there, {mine.get(k)!r} here" for k in keys if theirs.get(k) != mine.get(k)]


# Every stage's --time-limit, said once.
TIME_LIMIT_HELP = (
    "stop (with a checkpoint) after this many seconds of training in the whole run, counted across --resume; "
    "the schedules follow whichever runs out first, steps or time, and a --resume that raises it (or --steps) "
    "stretches what is left of them; 0: none"
)


def claim_output(out: Path, resume: bool) -> None:
    """Before any work: a new run refuses a folder that already holds one (resume it, or choose another
    folder); a resume refuses a folder without a checkpoint (and does not create it)."""
    if not resume and (out / "state.pt").exists():
        raise FieldError("out", f"{out} already holds a run: resume it, or choose another folder")
    if resume and not (out / "state.pt").exists() and not (out / JOURNAL / COMPLETE).exists():
        raise FieldError("out", f"cannot resume {out}: it holds no checkpoint")


def set_threads(threads: int) -> None:
    if threads:
        torch.set_num_threads(threads)


def seed_everything(seed: int) -> None:
    """The global generators a run draws its initialisation (and the dVAE its noise) from."""
    torch.manual_seed(seed)
    random.seed(seed)


class TrainingRun:
    """The skeleton (see the module docstring). cfg has out, steps, resume, time_limit, ckpt_every and
    optionally log_every and ema; a stage's __init__ calls this one, then builds self.model and self.opt
    (and init_ema) before resume(). tag and columns are class attributes."""

    tag: str = "run"  # TensorBoard prefix and progress-bar label
    columns: list[str] = ["step", "seconds"]  # log.csv

    def __init__(self, cfg, device: torch.device, dist: DistInfo | None = None):
        self.cfg, self.device = cfg, device
        self.dist = dist or DistInfo()
        self.out = Path(cfg.out)
        self.step, self.seconds = 0, 0.0  # training time so far, across resumes (the time limit is the run's)
        self.budget = Budget(cfg.steps, cfg.time_limit)
        self.ema: dict[str, torch.Tensor] | None = None
        self.init_record: dict | None = None  # the run this one started from (start_from)
        self.sharded_ema = False  # EMA entries are shards (DTensors) of a sharded model
        claim_output(self.out, cfg.resume)
        # One writer per run folder (rank 0 under torchrun), which first completes or drops a checkpoint
        # its predecessor was killed in.
        self.lock = RunLock(self.out) if self.dist.main else None
        if self.dist.main:
            recover(self.out)
        barrier(self.dist)

    # ---- what a stage supplies ---------------------------------------------------------------------

    def update(self, step: int) -> dict:
        raise NotImplementedError

    def log_values(self, losses: dict) -> dict[str, float]:
        return {k: float(v.detach() if isinstance(v, torch.Tensor) else v) for k, v in losses.items()}

    def evaluate(self) -> dict[str, float]:
        return {}

    def at_checkpoint(self, metrics: dict, log: RunLog) -> None:
        pass

    def extra_state(self) -> dict:
        return {"optimizer": self.opt.state_dict()}

    def check_resume(self, state: dict, meta: dict) -> None:
        """ValueError when the checkpoint's run (state.pt, config.json) cannot continue as this one."""

    def load_extra_state(self, state: dict) -> None:
        self.opt.load_state_dict(state["optimizer"])

    def weights(self) -> dict[str, dict[str, torch.Tensor]]:
        out = {"model": self.model.state_dict()}
        if self.ema is not None:
            out["ema"] = self.ema
        return out

    def load_weights(self, weights: dict[str, dict[str, torch.Tensor]]) -> None:
        self.model.load_state_dict(weights["model"])
        if self.ema is not None:
            for k, v in weights["ema"].items():
                self.ema[k].copy_(v)

    def meta(self) -> dict:
        raise NotImplementedError

    # ---- the shared parts --------------------------------------------------------------------------

    def start_from(self, entry: str, mine: dict, build=dict, ignore: tuple[str, ...] = ()) -> dict:
        """Fills self.model with the weights of the run cfg.init_from (its EMA weights when it keeps them, the
        weights its samples and evaluations used; else its model weights) after checking that its config.json
        `entry` (made comparable by build(dict) -> dict, e.g. filling fields newer than the run) equals `mine`,
        fields in `ignore` aside. Call it after building the model and before init_ema, so the EMA starts at
        the same weights. Returns that run's config.json. FieldError of init_from naming both values on a
        mismatch."""
        run = Path(self.cfg.init_from)
        with field_errors("init_from"):
            meta = checkpoint.load_config(run)
            if entry not in meta:
                raise ValueError(f"{run} has no {entry} (its config.json has no {entry!r} entry)")
            diff = config_differences(build(meta[entry]), mine, ignore)
            if diff:
                raise ValueError(f"{run}'s {entry} configuration differs from this run's: {'; '.join(diff)}")
            name = "ema.safetensors" if (run / "ema.safetensors").exists() else "model.safetensors"
            check_steps(run, meta, [name])
            try:
                self.model.load_state_dict(checkpoint.load_weights(run / name))
            except RuntimeError as e:
                raise ValueError(f"the weights in {run / name} do not fit this model: {e}") from e
        self.init_record = {"run": str(run.resolve()), "step": meta.get("step"), "weights": name}
        return meta

    def progress(self) -> float:
        """Where the schedules stand, 0 -> 1 (see Budget): a stage's update reads it for its learning rate
        and the like."""
        return self.budget.progress(self.step, self.seconds)

    def set_lr(self, lr: float) -> None:
        """The learning rate of this update, in every parameter group."""
        for group in self.opt.param_groups:
            group["lr"] = lr

    def init_ema(self) -> None:
        """A parameter EMA (evaluation and sampling use it), started at the initial weights."""
        self.ema = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self._ema_pairs = [(self.ema[k], v) for k, v in self.model.state_dict().items() if v.dtype.is_floating_point]

    @torch.no_grad()
    def update_ema(self, step: int) -> None:
        """EMA with a warm-up (decay (1 + step) / (10 + step) until cfg.ema), so short runs are not
        evaluated on their initialisation."""
        if self.ema is None:
            return
        decay = min(self.cfg.ema, (1 + step) / (10 + step))
        if self.sharded_ema:  # shards (DTensors): one at a time
            for e, v in self._ema_pairs:
                e.lerp_(v, 1 - decay)
        else:  # one multi-tensor launch per dtype and device
            torch._foreach_lerp_([e for e, _ in self._ema_pairs], [v for _, v in self._ema_pairs], 1 - decay)

    @contextlib.contextmanager
    def ema_weights(self):
        """The EMA weights swapped into the model for the duration (the live ones otherwise)."""
        if self.ema is None:
            yield self.model
            return
        live = {k: v.clone() for k, v in self.model.state_dict().items()}
        self.model.load_state_dict(self.ema)
        try:
            yield self.model
        finally:
            self.model.load_state_dict(live)

    def save(self) -> None:
        """One checkpoint (rank 0 writes): weights, the resumable state, config.json."""
        weights, extra = self.weights(), self.extra_state()  # every rank: a sharded model gathers here
        if not self.dist.main:
            return
        state = {
            "step": self.step, "seconds": self.seconds, "budget": dataclasses.asdict(self.budget),
            **rng_state(self.device), **extra,
        }  # fmt: skip
        meta = {**self.meta(), "seconds": round(self.seconds, 3)}
        if self.init_record is not None:
            meta["init_from"] = self.init_record
        save_run(self.out, weights, state, meta)

    def resume(self) -> None:
        """Everything a checkpoint holds, back in place."""
        state, meta = load_state(self.out), checkpoint.load_config(self.out)
        names = ["model"] + (["ema"] if self.ema is not None else [])
        check_steps(self.out, meta, [f"{n}.safetensors" for n in names], state)
        self.check_resume(state, meta)
        try:
            self.load_weights({n: checkpoint.load_weights(self.out / f"{n}.safetensors") for n in names})
            self.load_extra_state(state)  # after the weights: a sharded optimizer needs its model's
        except (KeyError, RuntimeError) as e:
            raise ValueError(f"the checkpoint in {self.out} does not fit this run: {e}") from e
        set_rng_state(state, self.device)
        self.step, self.seconds = int(state["step"]), float(state.get("seconds", 0.0))
        self.init_record = meta.get("init_from")  # a run started from another keeps saying so
        train = meta.get("train", {})
        saved = Budget(**state["budget"]) if "budget" in state else Budget(train["steps"], train.get("time_limit", 0.0))
        self.budget = saved.resumed(self.cfg.steps, self.cfg.time_limit, self.step, self.seconds)

    def train(self, stop_at: int | None = None) -> dict:
        """Runs to cfg.steps (or stop_at, as if killed there; or the time limit); returns the last logged
        metrics."""
        cfg = self.cfg
        if self.budget.spent(self.step, self.seconds):
            if self.lock is not None:
                self.lock.release()
            return self.nothing_left()
        log_every = getattr(cfg, "log_every", cfg.ckpt_every)
        log = RunLog(
            self.out if self.dist.main else None, self.columns, self.tag, cfg.steps, self.step, cfg.resume,
            cfg.time_limit,
        )  # fmt: skip
        started = time.time() - self.seconds
        metrics: dict = {}
        try:
            while self.step < cfg.steps:
                losses = self.update(self.step)
                self.update_ema(self.step)
                self.step += 1
                log.step()
                self.seconds = time.time() - started
                if cfg.time_limit:  # rank 0's clock, on every rank: the same schedules, the same last step
                    self.seconds = rank0_value(self.seconds, self.dist, self.device)
                done = self.budget.spent(self.step, self.seconds) or self.step == stop_at
                ckpt = self.step % cfg.ckpt_every == 0 or done
                if self.step % log_every == 0 or ckpt:
                    metrics = {"step": self.step, **self.log_values(losses)}
                    metrics.update(self.evaluate() if ckpt else {})
                    metrics["seconds"] = time.time() - started
                    log.row(metrics)
                    if ckpt:
                        self.save()
                        self.at_checkpoint(metrics, log)
                    self.after_log()
                if done:
                    break
        finally:
            log.close()
            if self.lock is not None:
                self.lock.release()
        return metrics

    def nothing_left(self) -> dict:
        """A resumed run whose steps or time are used up: says so (and how to go on) instead of training."""
        cfg, why = self.cfg, f"all {self.cfg.steps} steps done"
        if self.step < cfg.steps:
            why = (
                f"step {self.step} of {cfg.steps}, but its {self.seconds:.0f} s of training reached --time-limit "
                f"{cfg.time_limit:g}"
            )
        if self.dist.main:
            print(
                f"{self.out}: nothing left to train ({why}); raise --steps or --time-limit to train further",
                file=sys.stderr,
            )
        return {"step": self.step, "seconds": self.seconds, "nothing_left": True}

    def after_log(self) -> None:
        """Called after each logged step (the transformer restarts its throughput window here)."""
