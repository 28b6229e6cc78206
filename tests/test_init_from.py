"""--init-from: a new run of any stage starts from another run's weights (and stage 2 from its tokenizer and
dVAE), records where it started, refuses mismatched configurations with both values, and is kept apart
from --resume."""

import csv
import dataclasses
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from dalle_fast.models.dvae import DVAE, PRESETS
from dalle_fast.runs.load import load_transformer, same_tokenizer
from dalle_fast.runs.openai_dvae import write_dvae_run
from dalle_fast.train import main
from dalle_fast.training.clip import CLIPRun, CLIPTrainConfig, train_clip
from dalle_fast.training.dalle import DALLERun, DALLETrainConfig, train_dalle
from dalle_fast.training.vae import VAERun, VAETrainConfig, train_vae


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A dVAE run, a stage-2 run on it (micro) and a CLIP run on that, each a few updates."""
    root = tmp_path_factory.mktemp("init")
    train_vae(_vae_cfg(root / "vae"))
    train_dalle(_dalle_cfg(root, "dalle", vae=str(root / "vae"), steps=3))
    train_clip(_clip_cfg(root / "dalle", root / "clip"))
    return root


def _vae_cfg(out, **kw):
    return VAETrainConfig(**{
        "out": str(out), "steps": 2, "batch_size": 4, "ckpt_every": 2, "log_every": 2, "eval_images": 8, **kw,
    })  # fmt: skip


def _dalle_cfg(root, name, **kw):
    base = dict(
        out=str(root / name), preset="micro", steps=1, batch_size=4, ckpt_every=1, log_every=1, max_items=24,
        val_items=4, samples=0, warmup=1, bpe_variants=0, vocab_size=300, text_len=48, seed=3, device="cpu",
        precision="fp32",
    )  # fmt: skip
    return DALLETrainConfig(**{**base, **kw})


def _clip_cfg(dalle, out, **kw):
    return CLIPTrainConfig(**{
        "dalle": str(dalle), "out": str(out), "width": 16, "embed_dim": 8, "max_items": 16, "val_items": 8,
        "steps": 2, "batch_size": 8, "ckpt_every": 2, "device": "cpu", **kw,
    })  # fmt: skip


def test_stage_2_starts_from_the_run_s_ema_weights(runs, tmp_path):
    """The new run's first loss is the init run's EMA model's loss on the new run's first batch (other data:
    another seed, fewer items), computed apart from the trainer; its tokenizer and dVAE are the init run's."""
    cfg = _dalle_cfg(tmp_path, "fine", init_from=str(runs / "dalle"), seed=11, max_items=16)
    run = DALLERun(cfg)
    text, image = run.batch(0)
    ema, tok, _ = load_transformer(runs / "dalle")  # the init run's EMA weights, loaded on their own
    with torch.no_grad():
        want = float(ema.loss(text, image)["loss"])
        fresh = DALLE_fresh_loss(ema.cfg, text, image)
    assert abs(want - fresh) > 1e-3  # the check has teeth: an untrained model scores otherwise
    run.train()
    with open(tmp_path / "fine" / "log.csv") as f:
        first = next(csv.DictReader(f))
    assert first["step"] == "1" and float(first["loss"]) == pytest.approx(want, rel=1e-5, abs=1e-6)
    meta = json.loads((tmp_path / "fine" / "config.json").read_text())
    assert meta["init_from"] == {"run": str((runs / "dalle").resolve()), "step": 3, "weights": "ema.safetensors"}
    assert meta["train"]["vae"] == str(runs / "vae")  # --vae left out: the init run's
    assert same_tokenizer(tmp_path / "fine", runs / "dalle")
    assert meta["transformer"] == json.loads((runs / "dalle" / "config.json").read_text())["transformer"]


def DALLE_fresh_loss(mcfg, text, image) -> float:
    from dalle_fast.models.transformer import DALLE

    torch.manual_seed(0)
    return float(DALLE(mcfg).loss(text, image)["loss"])


@pytest.mark.parametrize(
    "change,message",
    [
        ({"d_model": 64}, r"init_from: .*transformer configuration differs from this run's: d_model 32 there, 64 here"),
        ({"text_len": 32}, r"text_len: 32, but .*dalle \(whose tokenizer this run keeps\) has 48"),
        ({"vae": "OTHER"}, r"vae: .*other_vae is not the dVAE of .*dalle \(.*vae\); leave it out"),
        ({"init_from": "VAE"}, r"init_from: .*vae is not a stage-2 run"),
        ({"resume": True}, r"init_from: does not combine with resume"),
    ],
)
def test_stage_2_mismatches_are_refused(runs, tmp_path, change, message):
    shutil.copytree(runs / "vae", tmp_path / "other_vae")
    change = {k: {"OTHER": str(tmp_path / "other_vae"), "VAE": str(runs / "vae")}.get(v, v) for k, v in change.items()}
    with pytest.raises(ValueError, match=message):
        train_dalle(_dalle_cfg(tmp_path, "x", **{"init_from": str(runs / "dalle"), **change}))


def test_stage_2_refuses_a_dvae_changed_since(runs, tmp_path):
    """The init run's dVAE folder now holds another configuration: its codes would mean other images."""
    vae = tmp_path / "vae"
    train_vae(_vae_cfg(vae, grid=16))
    init = tmp_path / "init"
    shutil.copytree(runs / "dalle", init)
    meta = json.loads((init / "config.json").read_text())
    meta["train"]["vae"] = str(vae)
    (init / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"vae: .* is not the dVAE .* was trained with: groups 3 there, 2 here"):
        train_dalle(_dalle_cfg(tmp_path, "x", init_from=str(init)))


def test_cli_refuses_init_from_with_resume(runs, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["dalle", "--init-from", str(runs / "dalle"), "--resume", "--out", str(tmp_path / "x")])
    assert e.value.code == 2
    assert "--init-from: does not combine with resume" in capsys.readouterr().err


def test_dvae_starts_from_a_run_and_a_converted_run_is_not_resumed(runs, tmp_path):
    run = VAERun(_vae_cfg(tmp_path / "fine", init_from=str(runs / "vae"), seed=4))
    want = load_file(runs / "vae" / "ema.safetensors")
    got = run.model.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert all(torch.equal(run.ema[k], want[k]) for k in want)  # the EMA starts there too
    with pytest.raises(ValueError, match=r"init_from: .*dvae configuration differs.*hidden 32 there, 256 here"):
        VAERun(_vae_cfg(tmp_path / "x", init_from=str(runs / "vae"), preset="paper", image_size=32))
    # A converted dVAE (here: the openai preset's shape at 32 px, random weights) is a start, not a run to resume.
    converted = tmp_path / "converted"
    cfg = dataclasses.replace(PRESETS["openai"], hidden=8, codebook=16, image_size=32, decoder_init=4)
    write_dvae_run(converted, DVAE(cfg), {"source": "openai-dvae"})
    with pytest.raises(ValueError, match="holds a converted dVAE .*start a new run from it with init_from"):
        VAERun(_vae_cfg(converted, resume=True))


def test_clip_starts_from_a_run_with_the_same_tokenizer(runs, tmp_path):
    fine = tmp_path / "dalle_fine"
    train_dalle(_dalle_cfg(tmp_path, "dalle_fine", init_from=str(runs / "dalle")))
    run = CLIPRun(_clip_cfg(fine, tmp_path / "clip", init_from=str(runs / "clip"), seed=2))
    want = load_file(runs / "clip" / "model.safetensors")  # CLIP keeps no EMA
    assert all(torch.equal(run.model.state_dict()[k], want[k]) for k in want)
    other = tmp_path / "other"
    shutil.copytree(runs / "dalle", other)
    tok = json.loads((other / "tokenizer.json").read_text())
    tok["text_len"] = 40
    (other / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(ValueError, match=r"dalle: its tokenizer is not the one .*clip was trained with"):
        CLIPRun(_clip_cfg(other, tmp_path / "clip2", init_from=str(runs / "clip")))
    with pytest.raises(ValueError, match=r"init_from: .*clip configuration differs.*width 16 there, 32 here"):
        CLIPRun(_clip_cfg(fine, tmp_path / "clip3", init_from=str(runs / "clip"), width=32))
