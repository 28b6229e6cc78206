"""The built-in `digits` data: real handwriting, tinted and captioned, with held-out colour-digit pairs."""

import json

import pytest
import torch

pytest.importorskip("sklearn", reason="the digits data comes with scikit-learn: pip install -e '.[digits]'")

from dalle_fast.data.digits import HELD_OUT, NAMES, DigitsDataset, load_scans  # noqa: E402
from dalle_fast.data.shapes import COLORS  # noqa: E402
from dalle_fast.data.sources import describe, open_datasets  # noqa: E402


def _pair(ds, i):
    scan, color = ds.items[i]
    return color, int(ds.digits[scan])


def test_splits_hold_out_scans_and_colour_digit_pairs():
    scans, digits = load_scans()
    assert scans.shape == (1797, 8, 8) and 0 <= scans.min() and scans.max() <= 1 and set(digits) == set(range(10))
    train, val, held = (DigitsDataset(s, 16) for s in ("train", "val", "heldout"))
    train_scans = {scan for scan, _ in train.items}
    assert train_scans.isdisjoint(scan for scan, _ in val.items)  # held-out scans: never trained on
    assert train_scans.isdisjoint(scan for scan, _ in held.items)
    train_pairs = {_pair(train, i) for i in range(len(train))}
    assert train_pairs.isdisjoint(HELD_OUT) and len(train_pairs) == len(COLORS) * 10 - len(HELD_OUT)
    assert {_pair(val, i) for i in range(len(val))} == train_pairs
    assert {_pair(held, i) for i in range(len(held))} == set(HELD_OUT)


def test_items_are_tinted_digits_with_their_captions():
    ds = DigitsDataset("train", 24, seed=3)
    for i in range(20):
        image, caption = ds[i]
        color, digit = _pair(ds, i)
        assert image.shape == (3, 24, 24) and 0 <= image.min() and image.max() <= 1
        assert caption in ds.captions(i) and all(color in c for c in ds.captions(i))
        assert all(NAMES[digit] in c or str(digit) in c for c in ds.captions(i))
        # The ink is the caption's colour: the brightest pixel leans to the colour's strongest channel.
        brightest = image.flatten(1)[:, image.sum(0).flatten().argmax()]
        assert brightest.argmax() == torch.tensor(COLORS[color]).argmax()
        near, near_captions = ds.hard_negative(i)
        assert near.shape == image.shape and color in near_captions[0] and near_captions != ds.captions(i)
    assert ds[5][0].equal(DigitsDataset("train", 24, seed=3)[5][0])  # item i: a function of (split, i)
    with pytest.raises(ValueError, match="image_size"):
        DigitsDataset("train", 4)


def test_the_digits_spec():
    train, held = open_datasets("digits", 16)
    assert isinstance(train, DigitsDataset) and train.split == "train" and held.split == "val"
    assert "1,797 handwritten 8x8 digits" in describe("digits", train, held, 16)
    _, held = open_datasets("shapes", 16, val_spec="digits")
    assert isinstance(held, DigitsDataset)


def test_main_job_on_digits(tmp_path, capsys):
    """Every stage on the digits, and samples for captions of held-out colour-digit pairs."""
    from dalle_fast.training.pipeline import PipelineConfig, run_pipeline

    cfg = PipelineConfig(
        data="digits", root=str(tmp_path), vae_steps=2, dalle_steps=2, clip_steps=2, items=64, captions=3,
        rerank=2, per_caption=1, device="cpu",
    )  # fmt: skip
    assert cfg.name == "digits"
    run_pipeline(cfg)
    run = tmp_path / "digits"
    assert (run / "samples.png").exists()
    assert json.loads((run / "clip" / "config.json").read_text())["train"]["data"] == "digits"
    err = capsys.readouterr().err
    assert "samples for 3 captions of held-out colour-digit pairs" in err
