"""Stage-1 training: a run stopped mid-way resumes to exactly the state of an uninterrupted one; the
CLI's flags, files and errors; training from a WebDataset stream."""

import csv
import dataclasses
import io
import json
import re
import tarfile
import warnings

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from dalle_fast.progress import Progress
from dalle_fast.train import main
from dalle_fast.training.schedules import Budget
from dalle_fast.training.vae import VAETrainConfig, train_vae


def _cfg(out, **kw):
    base = dict(out=str(out), steps=6, batch_size=4, ckpt_every=3, log_every=3, eval_images=8, lr=1e-3, seed=5)
    base["device"] = "cpu"  # bit-exact resumes are a CPU property (cuDNN's convolution backward is not deterministic)
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
    assert cfg["train"]["steps"] == 2 and cfg["dvae"]["codebook"] == 256
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


def test_schedules_follow_the_clock_under_a_time_limit():
    budget = Budget(1000, 100.0)
    assert budget.progress(10, 50.0) == 0.5  # half the time gone: half-way through the schedules
    assert budget.progress(800, 50.0) == 0.8  # ... or further, when the steps run out first
    assert budget.progress(10, 250.0) == 1.0 and budget.spent(10, 100.0) and not budget.spent(10, 99.0)
    assert Budget(1000).progress(10, 50.0) == 0.01 and not Budget(1000).spent(999, 1e9)  # no limit: steps only


def test_a_raised_budget_continues_the_schedules_where_they_stood():
    """A resume with other steps or time limit goes on from the progress reached: no schedule jumps back."""
    budget = Budget(1000, 100.0)
    assert budget.resumed(1000, 100.0, 10, 50.0) is budget  # the same settings: exactly the same schedules
    raised = budget.resumed(1000, 300.0, 10, 50.0)  # 0.5 reached; the other half over the 250 s left
    assert raised.progress(10, 50.0) == 0.5 and raised.progress(10, 175.0) == 0.75 and raised.progress(10, 300.0) == 1
    more_steps = Budget(100).resumed(300, 0.0, 50, 9.0)  # half-way; the other half over the 250 steps left
    assert more_steps.progress(50, 0.0) == 0.5 and more_steps.progress(175, 0.0) == 0.75
    done = Budget(100, 10.0).resumed(100, 20.0, 5, 10.0)  # stopped by its limit: the schedules had ended
    assert done.progress(6, 11.0) == 1.0 and not done.spent(6, 11.0)


def _shard(path, n_good: int) -> str:
    """A WebDataset shard of n_good 40x30 PNG + caption samples and one corrupt image."""
    samples = [
        (f"{i:03d}", Image.new("RGB", (40, 30), (20 * i, 90, 200 - 10 * i)), f"thing {i}") for i in range(n_good)
    ]
    with tarfile.open(path, "w") as tar:
        for key, img, text in [*samples, ("bad", None, "a corrupt image")]:
            buf = io.BytesIO()
            if img is None:
                buf.write(b"not a png")
            else:
                img.save(buf, format="PNG")
            for ext, payload in (("png", buf.getvalue()), ("txt", text.encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return str(path)


def test_cli_trains_from_a_webdataset_stream(tmp_path, capsys):
    shard = _shard(tmp_path / "shard-0.tar", n_good=8)
    out = tmp_path / "run"
    # 8 good samples: the first 2 held out, 6 to train on in batches of 4, so 3 updates take two passes.
    args = ["vae", "--data", f"wds:{shard}", "--out", str(out), "--steps", "3", "--batch-size", "4"]
    args += ["--eval-images", "2", "--ckpt-every", "3"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(args) == 0
    assert any("skipped 1 of 7" in str(w.message) for w in caught)  # the corrupt sample, counted in pass 1
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["step"] == 3
    assert json.loads((out / "config.json").read_text())["train"]["data"] == f"wds:{shard}"
    assert (out / "recon_0000003.png").exists()


def test_stream_resume_continues(tmp_path):
    shard = _shard(tmp_path / "shard-0.tar", n_good=6)
    cfg = _cfg(tmp_path / "run", data=f"wds:{shard}", val_data="shapes", steps=4, ckpt_every=2, log_every=2)
    with pytest.warns(UserWarning, match="skipped 1 of 7"):
        train_vae(cfg, stop_at=2)
        train_vae(dataclasses.replace(cfg, resume=True))  # weights, optimizer, step; a fresh shuffle
    rows = list(csv.DictReader(open(tmp_path / "run" / "log.csv")))
    assert [int(r["step"]) for r in rows] == [2, 4]


@pytest.mark.parametrize(
    "flags,match",
    [
        (["--data", "imagenet"], "--data: must be shapes, digits, folder:DIR, coco:CAPTIONS_JSON,IMAGE_DIR or wds"),
        (["--data", "wds:/no/such/shard.tar"], "no such shard file"),
        (["--val-data", "coco:x.json"], "--val-data: coco: expects CAPTIONS_JSON,IMAGE_DIR"),
    ],
)
def test_cli_bad_data_spec(tmp_path, capsys, flags, match):
    with pytest.raises(SystemExit):
        main(["vae", "--out", str(tmp_path / "x"), *flags])
    assert re.search(match, capsys.readouterr().err)


@pytest.mark.parametrize("device", ["tpu", "cuda:x", "cuda"])
def test_cli_bad_device(tmp_path, capsys, device):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(SystemExit):
        main(["vae", "--out", str(tmp_path / "x"), "--device", device])
    want = "no CUDA device is available" if device == "cuda" else "device must be auto, cpu, cuda or cuda:N"
    assert want in capsys.readouterr().err
    assert not (tmp_path / "x").exists()  # refused before any work


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_training_resumes_and_loads_on_the_cpu(tmp_path):
    out = tmp_path / "cuda"
    train_vae(_cfg(out, device="cuda"), stop_at=3)
    metrics = train_vae(_cfg(out, device="cuda", resume=True))
    assert metrics["step"] == 6 and torch.isfinite(torch.tensor(metrics["loss"])) and metrics["psnr"] > 0
    from dalle_fast.runs.load import load_dvae

    codes = load_dvae(out).encode(torch.rand(2, 3, 32, 32))  # a GPU-trained dVAE is read back on the CPU
    assert codes.device.type == "cpu" and codes.shape[0] == 2


def test_grid_sets_the_groups(tmp_path):
    """--grid 16 on the tiny preset: one halving fewer (2 groups), a 16x16 grid of codes, and the run's
    config records it so stage 2 and sampling rebuild the same model."""
    out = tmp_path / "g16"
    assert VAETrainConfig(grid=16).dvae_config().grid == 16
    assert VAETrainConfig(grid=8).dvae_config() == VAETrainConfig().dvae_config()
    train_vae(_cfg(out, grid=16, steps=2, ckpt_every=2, device="cpu:0"))  # cpu:N is the CPU
    saved = json.loads((out / "config.json").read_text())["dvae"]
    assert saved["groups"] == 2
    from dalle_fast.runs.load import load_dvae

    codes = load_dvae(out).encode(torch.rand(1, 3, 32, 32))
    assert codes.shape[-2:] == (16, 16)
    for bad in (12, 64, -8):
        with pytest.raises(ValueError, match="grid"):
            VAETrainConfig(grid=bad)


def test_codebook_and_hidden_override_the_preset(tmp_path):
    """--codebook and --hidden replace the preset's sizes (0 keeps them); the run records them, so its
    codes come from that many and the loaded model has that width."""
    assert VAETrainConfig(codebook=0, hidden=0).dvae_config() == VAETrainConfig().dvae_config()
    dcfg = VAETrainConfig(codebook=48, hidden=8, grid=16).dvae_config()
    assert (dcfg.codebook, dcfg.hidden, dcfg.grid) == (48, 8, 16)
    out = tmp_path / "small"
    train_vae(_cfg(out, codebook=48, hidden=8, steps=2, ckpt_every=2))
    saved = json.loads((out / "config.json").read_text())["dvae"]
    assert (saved["codebook"], saved["hidden"]) == (48, 8)
    from dalle_fast.runs.load import load_dvae

    dvae = load_dvae(out)
    assert dvae.encode(torch.rand(2, 3, 32, 32)).max() < 48
    # A run is resumed with the sizes it was trained with; other sizes are refused by name, not by a
    # state-dict size mismatch.
    part = tmp_path / "part"
    train_vae(_cfg(part, codebook=48, hidden=8), stop_at=3)
    with pytest.raises(ValueError, match="codebook 48 there, 256 here"):
        train_vae(_cfg(part, hidden=8, resume=True))
    train_vae(_cfg(part, codebook=48, hidden=8, resume=True))
    assert json.loads((part / "config.json").read_text())["step"] == 6
    for name, bad in (("codebook", 1), ("codebook", -4), ("hidden", -1)):
        with pytest.raises(ValueError, match=name):
            VAETrainConfig(**{name: bad})


def _folder(root, good: int, bad: int):
    """A folder of `good` readable 32 px images and `bad` corrupt ones, each with a caption."""
    root.mkdir()
    for i in range(good + bad):
        path = root / f"{i:03d}.png"
        if i < good:
            Image.new("RGB", (32, 32), (i * 40 % 256, 90, 200)).save(path)
        else:
            path.write_bytes(b"not a png")
        (root / f"{i:03d}.txt").write_text(f"picture {i}")
    return root


def test_batches_of_only_bad_items_do_not_shorten_the_run(tmp_path):
    """Batches of one item from a folder that is mostly corrupt: every update still happens (the run
    ends at its step count, with its last checkpoint), the bad batches passed over."""
    data = _folder(tmp_path / "data", good=2, bad=6)
    cfg = _cfg(tmp_path / "run", data=f"folder:{data}", val_data="shapes", batch_size=1, steps=6)
    with pytest.warns(UserWarning, match="skipped"):
        metrics = train_vae(cfg)
    assert metrics["step"] == 6 and json.loads((tmp_path / "run" / "config.json").read_text())["step"] == 6


def test_data_with_nothing_readable_is_refused(tmp_path):
    data = _folder(tmp_path / "data", good=0, bad=4)
    with pytest.raises(ValueError, match="data: .*held no readable item"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train_vae(_cfg(tmp_path / "run", data=f"folder:{data}", val_data="shapes", batch_size=2))


def test_resume_drops_log_rows_past_the_checkpoint(tmp_path):
    """A run killed after logging steps past its last checkpoint logs them again when it resumes: the log
    keeps each step once."""
    cfg = _cfg(tmp_path / "run", steps=6, ckpt_every=4, log_every=1)
    train_vae(cfg, stop_at=4)  # the checkpoint of step 4
    log = tmp_path / "run" / "log.csv"
    row5 = log.read_text().splitlines()[-1].replace("4,", "5,", 1)
    log.write_text(log.read_text() + row5 + "\n")  # what the killed run had logged after it
    train_vae(dataclasses.replace(cfg, resume=True))
    assert [int(r["step"]) for r in csv.DictReader(open(log))] == [1, 2, 3, 4, 5, 6]


def test_time_limit_on_resume(tmp_path, capsys):
    """One rule for --time-limit: the run's training time across resumes. A resume with the time used up
    trains nothing and says so; one that raises the limit goes on with its schedules where they stood (the
    run ended on lr_end, and stays there) instead of warming up again."""
    cfg = _cfg(tmp_path / "run", steps=50, ckpt_every=50, log_every=1, time_limit=1e-6, lr_end=1e-5)
    assert train_vae(cfg)["step"] == 1  # the first update already used the limit
    before = (tmp_path / "run" / "model.safetensors").read_bytes()
    result = train_vae(dataclasses.replace(cfg, resume=True))
    assert result["nothing_left"] and result["step"] == 1
    assert "nothing left to train" in capsys.readouterr().err
    assert (tmp_path / "run" / "model.safetensors").read_bytes() == before  # not a step more
    assert train_vae(dataclasses.replace(cfg, resume=True, steps=4, time_limit=0.0))["step"] == 4
    lrs = [float(r["lr"]) for r in csv.DictReader(open(tmp_path / "run" / "log.csv"))]
    # Step 1 ran at the peak and used the limit up; a raised budget: the schedules had ended, and stay ended.
    assert lrs == [pytest.approx(1e-3)] + [pytest.approx(1e-5)] * 3
    assert train_vae(dataclasses.replace(cfg, resume=True, steps=4, time_limit=0.0))["nothing_left"]


def test_progress_in_a_log_file_is_plain_lines(tmp_path, capsys):
    """Not a terminal (pytest captures stderr): a line per logged step with steps, rate, ETA and losses, and
    no progress bar's carriage returns; work outside the training loop (encoding, reading) reports through
    the same lines."""
    train_vae(_cfg(tmp_path / "run", steps=4, ckpt_every=4, log_every=2))
    err = capsys.readouterr().err
    assert "\r" not in err and "\x1b" not in err
    lines = [line for line in err.splitlines() if line.startswith("vae ")]
    assert [line.split(",")[0] for line in lines] == ["vae 2/4 (50%)", "vae 4/4 (100%)"], err
    assert all(" step/s" in line and " loss " in line for line in lines) and "ETA" in lines[0]
    progress = Progress(3, "encoding", "image", interval=0.0)
    for _ in range(3):
        progress.update()
    progress.close()
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("encoding 1/3 (33%)") and err[-1].startswith("encoding 3/3 (100%)"), err
    assert "done in" in err[-1]
