"""The reranker: the contrastive loss, learning on the shapes data, reranking, loading and the CLI stage."""

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

from dalle_fast.data.shapes import ShapesDataset
from dalle_fast.data.tokenizer import PAD, CaptionTokenizer
from dalle_fast.models.clip import CLIP, CLIPConfig
from dalle_fast.runs.load import load_clip
from dalle_fast.sampling.rerank import load_scorer, rerank
from dalle_fast.training.clip import CLIPRun, CLIPTrainConfig, _batch_index, _read_items, train_clip


@pytest.fixture(scope="module")
def dalle_run(tmp_path_factory):
    """What train_clip needs from a stage-2 run: its tokenizer and its dVAE's image size."""
    root = tmp_path_factory.mktemp("dalle")
    ds = ShapesDataset("train", 300, 32)
    tok = CaptionTokenizer.train((c for i in range(300) for c in ds.captions(i)), vocab_size=300, text_len=24)
    tok.save(root / "tokenizer.json")
    (root / "config.json").write_text(json.dumps({"dvae": {"image_size": 32}}))
    return root


def test_loss_is_symmetric_infonce():
    torch.manual_seed(0)
    model = CLIP(CLIPConfig(text_vocab=50, text_len=6, width=16, embed_dim=8, heads=2))
    images, text = torch.rand(5, 3, 32, 32), torch.randint(0, 50, (5, 6))
    text[1, 2:] = PAD
    logits = model.logit_scale.exp() * model.encode_image(images) @ model.encode_text(text).t()
    want = (F.cross_entropy(logits, torch.arange(5)) + F.cross_entropy(logits.t(), torch.arange(5))) / 2
    torch.testing.assert_close(model(images, text)["loss"], want)
    torch.testing.assert_close(model.encode_text(text).norm(dim=-1), torch.ones(5))


def test_rerank_keeps_the_highest():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.7], [3.0, -1.0, 2.0, 0.0]])
    assert rerank(scores, 2).tolist() == [[1, 3], [0, 2]]
    with pytest.raises(ValueError, match="keep"):
        rerank(scores, 5)


def test_near_misses_sit_beside_their_items_in_every_batch():
    ds = ShapesDataset("train", 6, 32, seed=4)
    images, lines = _read_items(ds, 6, hard_negatives=True)
    assert images.shape == (12, 3, 32, 32) and images.dtype == torch.uint8
    for i in range(6):
        assert lines[2 * i] == ds.captions(i) and lines[2 * i + 1] == ds.hard_negative(i)[1]
        assert torch.equal(images[2 * i + 1], (ds.hard_negative(i)[0] * 255).round().to(torch.uint8))
    index = _batch_index(12, 8, True, torch.Generator().manual_seed(0))
    assert len(index) == 8 and (index[:4] % 2 == 0).all() and torch.equal(index[4:], index[:4] + 1)
    plain = _batch_index(12, 7, False, torch.Generator().manual_seed(0))
    assert len(plain) == 7 and plain.max() < 12


def test_training_learns_and_resumes(dalle_run, tmp_path):
    cfg = CLIPTrainConfig(
        dalle=str(dalle_run), out=str(tmp_path / "c"), width=32, embed_dim=32, max_items=256, val_items=32,
        steps=40, batch_size=32, ckpt_every=20, lr=3e-3, seed=1,
    )  # fmt: skip
    first = train_clip(cfg, stop_at=20)
    with pytest.raises(ValueError, match="already holds a run"):
        train_clip(cfg)
    last = train_clip(dataclasses.replace(cfg, resume=True))
    assert (first["step"], last["step"]) == (20, 40)
    # 32 held-out captions: chance is 1/32; a few dozen updates must beat it clearly.
    assert last["val_accuracy"] > 3 / 32, last
    assert 0 <= last["val_near_miss"] <= 1  # shapes has near misses: measured (chance is 1/2)
    header = (tmp_path / "c" / "log.csv").read_text().splitlines()[0].split(",")
    assert "val_near_miss" in header
    model, tok = load_clip(tmp_path / "c")
    scorer = load_scorer(str(tmp_path / "c"))
    ds = ShapesDataset("val", 4, 32)
    images = torch.stack([ds[i][0] for i in range(4)])
    s = scorer.score(images, [ds.captions(i)[0] for i in range(4)])
    assert s.shape == (4,) and ((s >= -1.0001) & (s <= 1.0001)).all()


def test_learning_rate_follows_the_clock_under_a_time_limit(dalle_run, tmp_path):
    """Stopped by --time-limit, the reranker ends on an annealed learning rate, as the other stages do."""
    cfg = CLIPTrainConfig(
        dalle=str(dalle_run), out=str(tmp_path / "c"), width=32, embed_dim=32, max_items=64, val_items=16,
        steps=10_000, batch_size=8, lr=3e-3, time_limit=100.0,
    )  # fmt: skip
    run = CLIPRun(cfg)
    run.step, run.seconds = 600, 52.5  # past the warm-up (5% of the run), half-way through the decay
    half = run.update(run.step)["lr"]
    run.seconds = 99.9
    assert half == pytest.approx(1.5e-3, rel=0.01) and run.update(run.step)["lr"] < 3e-3 * 1e-3


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_training(dalle_run, tmp_path):
    cfg = CLIPTrainConfig(
        dalle=str(dalle_run), out=str(tmp_path / "g"), width=32, embed_dim=32, max_items=64, val_items=16,
        steps=4, batch_size=16, ckpt_every=2, seed=1, device="cuda",
    )  # fmt: skip
    train_clip(cfg, stop_at=2)
    last = train_clip(dataclasses.replace(cfg, resume=True))
    assert last["step"] == 4 and 0 <= last["val_accuracy"] <= 1
    model, _ = load_clip(tmp_path / "g")  # read back on the CPU
    assert next(model.parameters()).device.type == "cpu"


def test_cli_stage_and_errors(dalle_run, tmp_path, capsys):
    from dalle_fast.train import main

    args = ["clip", "--dalle", str(dalle_run), "--width", "16", "--embed-dim", "8", "--max-items", "32",
            "--val-items", "8", "--steps", "2", "--batch-size", "8", "--ckpt-every", "2"]  # fmt: skip
    assert main([*args, "--out", str(tmp_path / "c")]) == 0
    assert (tmp_path / "c" / "model.safetensors").exists() and (tmp_path / "c" / "tokenizer.json").exists()
    on = json.loads((tmp_path / "c" / "config.json").read_text())["train"]["hard_negatives"]
    assert main([*args, "--out", str(tmp_path / "n"), "--no-hard-negatives"]) == 0  # a switch that is on by default
    off = json.loads((tmp_path / "n" / "config.json").read_text())["train"]["hard_negatives"]
    assert (on, off) == (True, False)
    with pytest.raises(SystemExit):
        main([*args, "--out", str(tmp_path / "d"), "--batch-size", "1"])
    with pytest.raises(SystemExit):
        main(["clip", "--dalle", str(tmp_path / "none"), "--out", str(tmp_path / "e")])
    with pytest.raises(SystemExit):
        main([*args, "--out", str(tmp_path / "f"), "--device", "cuda:one"])
    err = capsys.readouterr().err
    assert "--batch-size must be >= 2" in err and "is not a run directory" in err and "Traceback" not in err
    assert "device must be auto, cpu, cuda or cuda:N, got 'cuda:one'" in err
    for spec, msg in [(str(tmp_path / "none"), "not a run directory"), ("open_clip:x", "open_clip:ARCH")]:
        with pytest.raises(ValueError, match=msg):
            load_scorer(spec)


def test_a_folder_run_s_reranker_follows_its_data_and_evaluate_refuses_it(tmp_path, capsys):
    """train clip without --data trains on the data of its --dalle run (said on stderr), and evaluate,
    whose judge knows only the built-in scenes, refuses a run trained on other data, saying what to use."""
    from PIL import Image

    from dalle_fast.evaluation.fidelity import EvaluateConfig, evaluate
    from dalle_fast.training.dalle import DALLETrainConfig, train_dalle
    from dalle_fast.training.vae import VAETrainConfig, train_vae

    data = tmp_path / "data"
    data.mkdir()
    for i in range(24):
        Image.new("RGB", (32, 32), ((i * 37) % 256, 80, 160)).save(data / f"{i:02d}.png")
        (data / f"{i:02d}.txt").write_text(f"a tile of colour {i % 5}")
    spec = f"folder:{data}"
    vae, dalle, clip = tmp_path / "vae", tmp_path / "dalle", tmp_path / "clip"
    train_vae(VAETrainConfig(data=spec, out=str(vae), steps=2, batch_size=4, ckpt_every=2, eval_images=4))
    train_dalle(
        DALLETrainConfig(
            data=spec, vae=str(vae), out=str(dalle), preset="micro", steps=1, batch_size=4, val_items=4,
            samples=0, vocab_size=300, text_len=12, device="cpu",
        )
    )  # fmt: skip
    capsys.readouterr()
    train_clip(CLIPTrainConfig(dalle=str(dalle), out=str(clip), steps=1, batch_size=4, val_items=4, device="cpu"))
    assert json.loads((clip / "config.json").read_text())["train"]["data"] == spec
    assert f"data: {spec} (the data of {dalle})" in capsys.readouterr().err
    with pytest.raises(ValueError, match=f"run: .*trained on {spec}.*built-in shapes data only"):
        evaluate(EvaluateConfig(run=str(dalle), device="cpu"))
