"""A checkpoint is one unit: kills and full disks never leave a run that resumes into another result, a
mixed folder is refused, and one process writes a run at a time."""

import errno
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from dalle_fast.errors import FieldError
from dalle_fast.runs import checkpoint
from dalle_fast.runs.checkpoint import JOURNAL, RunLock, weights_step
from dalle_fast.training.vae import VAETrainConfig, train_vae

BASE = dict(steps=6, batch_size=4, ckpt_every=2, log_every=2, eval_images=8, lr=1e-3, seed=5, device="cpu")


def _cfg(out, **kw):
    return VAETrainConfig(out=str(out), **{**BASE, **kw})


def _same_weights(a, b):
    for name in ("model.safetensors", "ema.safetensors"):
        wa, wb = load_file(a / name), load_file(b / name)
        assert wa.keys() == wb.keys()
        for k in wa:
            assert torch.equal(wa[k], wb[k]), (name, k)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    train_vae(_cfg(out))
    return out


def _train_in_a_process(out, env=None) -> subprocess.CompletedProcess:
    code = textwrap.dedent(f"""
        from dalle_fast.training.vae import VAETrainConfig, train_vae
        train_vae(VAETrainConfig(out={str(out)!r}, **{BASE!r}))
    """)
    return subprocess.run([sys.executable, "-c", code], env={**os.environ, **(env or {})}, capture_output=True)


# Each save moves 4 files (model, ema, state, config); saves at steps 2, 4, 6. Kills: before the first
# move of the first save, in its middle, before its last move (config.json), and in the second save.
@pytest.mark.parametrize("move", [1, 2, 4, 6])
def test_a_kill_at_any_move_of_a_save_resumes_to_the_same_weights(tmp_path, uninterrupted, move):
    out = tmp_path / "run"
    killed = _train_in_a_process(out, {"DALLE_FAST_KILL_AT_MOVE": str(move)})
    assert killed.returncode == -9, killed.stderr.decode()[-2000:]
    assert (out / JOURNAL).exists()  # it died with a checkpoint half moved into place
    train_vae(_cfg(out, resume=True))
    assert not (out / JOURNAL).exists()
    _same_weights(uninterrupted, out)
    assert json.loads((out / "config.json").read_text())["step"] == 6


def test_a_full_disk_keeps_the_previous_checkpoint(tmp_path, uninterrupted, monkeypatch):
    out = tmp_path / "run"
    real_save, calls = torch.save, []

    def save(obj, path, *a, **k):
        calls.append(path)
        if len(calls) == 2:  # the step-4 checkpoint's state.pt
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(checkpoint.torch, "save", save)
    with pytest.raises(OSError, match="No space left"):
        train_vae(_cfg(out))
    monkeypatch.setattr(checkpoint.torch, "save", real_save)
    assert json.loads((out / "config.json").read_text())["step"] == 2  # the last complete checkpoint
    assert weights_step(out / "model.safetensors") == 2
    train_vae(_cfg(out, resume=True))
    _same_weights(uninterrupted, out)


def test_a_mixed_checkpoint_is_refused(tmp_path):
    out = tmp_path / "run"
    train_vae(_cfg(out, steps=4))
    keep = out / "model.safetensors"
    state = torch.load(out / "state.pt", weights_only=False)
    state["step"] = 2  # state.pt of an older checkpoint beside the weights of step 4
    torch.save(state, out / "state.pt")
    with pytest.raises(ValueError, match=r"files of different checkpoints .*state.pt: step 2"):
        train_vae(_cfg(out, steps=6, resume=True))
    assert keep.exists()


def test_resume_of_a_folder_without_a_checkpoint_creates_nothing(tmp_path):
    with pytest.raises(FieldError, match="cannot resume .*holds no checkpoint"):
        train_vae(_cfg(tmp_path / "typo", resume=True))
    assert not (tmp_path / "typo").exists()


def test_one_writer_per_run(tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", f"import sys, time; from dalle_fast.runs.checkpoint import RunLock\n"
         f"lock = RunLock({str(out)!r}); print('locked', flush=True); time.sleep(120)"],
        stdout=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == b"locked"
        with pytest.raises(FieldError, match=rf"being written by another run \(pid {holder.pid}\)"):
            train_vae(_cfg(out))
    finally:
        holder.kill()
        holder.wait()
    # The OS released the dead holder's lock: the folder is free again.
    RunLock(out).release()
    assert train_vae(_cfg(out, steps=2))["step"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("move", [2, 5])
def test_the_transformer_killed_mid_save_resumes_to_the_same_weights(tmp_path, move):
    """The transformer's run, killed in its first and in its second save (without BPE dropout: its
    pre-drawn variants come from an unseeded RNG, so two fresh runs differ in them)."""
    from dalle_fast.training.dalle import DALLETrainConfig, train_dalle

    vae = tmp_path / "vae"
    train_vae(_cfg(vae, steps=2))
    kw = dict(
        vae=str(vae), preset="micro", steps=6, batch_size=4, ckpt_every=3, log_every=3, max_items=48, val_items=8,
        samples=0, warmup=2, bpe_dropout=0.0, vocab_size=300, text_len=48, seed=3, device="cpu",
    )  # fmt: skip
    train_dalle(DALLETrainConfig(out=str(tmp_path / "a"), **kw))
    out = tmp_path / "b"
    code = (
        "from dalle_fast.training.dalle import DALLETrainConfig, train_dalle\n"
        f"train_dalle(DALLETrainConfig(out={str(out)!r}, **{kw!r}))\n"
    )
    killed = subprocess.run([sys.executable, "-c", code], env={**os.environ, "DALLE_FAST_KILL_AT_MOVE": str(move)})
    assert killed.returncode == -9
    train_dalle(DALLETrainConfig(out=str(out), resume=True, **kw))
    _same_weights(tmp_path / "a", out)
