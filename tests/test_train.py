"""Stage-1 training: a run stopped mid-way resumes to exactly the state of an uninterrupted one; the
CLI's flags, files and errors."""

import csv
import json

import pytest
from safetensors.torch import load_file

from dalle_fast.train import VAETrainConfig, main, train_vae


def _cfg(out, **kw):
    base = dict(out=str(out), steps=6, batch_size=4, ckpt_every=3, log_every=3, eval_images=8, lr=1e-3, seed=5)
    base.update(kw)
    return VAETrainConfig(**base)


def _weights(out):
    return load_file(out / "model.safetensors"), load_file(out / "ema.safetensors")


def test_resume_is_exact(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    train_vae(_cfg(a))
    train_vae(_cfg(b), stop_at=3)  # "killed" right after its step-3 checkpoint
    assert json.loads((b / "config.json").read_text())["step"] == 3
    train_vae(_cfg(b, resume=True))
    for wa, wb in zip(_weights(a), _weights(b), strict=True):
        assert wa.keys() == wb.keys()
        for k in wa:
            assert (wa[k] == wb[k]).all(), k
    rows = list(csv.DictReader(open(b / "log.csv")))
    assert [int(r["step"]) for r in rows] == [3, 6]
    assert sorted(p.name for p in b.glob("recon_*.png")) == ["recon_0000003.png", "recon_0000006.png"]


def test_cli(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["vae", "--out", str(out), "--steps", "2", "--batch-size", "2", "--eval-images", "4", "--ckpt-every", "2"]
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["step"] == 2
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["train"]["steps"] == 2 and cfg["dvae"]["codebook"] == 64
    with pytest.raises(SystemExit):  # an existing run needs --resume
        main(args)
    (out / "state.pt").write_bytes(b"truncated")
    with pytest.raises(SystemExit):  # a damaged checkpoint is a clean error, not a traceback
        main(args + ["--resume"])
    assert "unreadable" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["vae", "--steps", "zero"])
    with pytest.raises(SystemExit):
        main(["vae", "--preset", "huge", "--out", str(tmp_path / "x")])
    assert main(["transformer"]) == 2
