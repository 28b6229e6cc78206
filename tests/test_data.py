"""Data sources from fixtures the tests write: shapes, a folder with a corrupt image and an empty caption,
a tiny COCO JSON, a tiny WebDataset shard; bad items are skipped and counted, never fatal."""

import io
import json
import tarfile
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from dalle_fast.data.images import SkipCounter, collate_skip, preprocess
from dalle_fast.data.shapes import HELD_OUT, SHAPES, ShapesDataset
from dalle_fast.data.sources import (
    CocoDataset,
    FolderDataset,
    iterate_batches,
    open_datasets,
    shard_urls,
    webdataset_source,
)


def _png(color=(10, 200, 30), size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def test_shapes_is_deterministic_and_well_formed():
    a, b = ShapesDataset("train", 50, 32, seed=3), ShapesDataset("train", 50, 32, seed=3)
    for i in (0, 7, 49):
        ia, ca = a[i]
        ib, cb = b[i]
        assert torch.equal(ia, ib) and ca == cb
        assert ia.shape == (3, 32, 32) and ia.dtype == torch.float32 and 0 <= ia.min() and ia.max() <= 1
        assert ca in a.captions(i)
    assert not torch.equal(a[0][0], ShapesDataset("train", 50, 32, seed=4)[0][0])


def test_shapes_holds_out_pairs_from_training():
    train, held = ShapesDataset("train", 400), ShapesDataset("heldout", 200)
    pairs = lambda ds, i: {(o["color"], o["shape"]) for o in ds.scene(i)["objects"]}  # noqa: E731
    assert all(not (pairs(train, i) & set(HELD_OUT)) for i in range(len(train)))
    assert all(pairs(held, i) & set(HELD_OUT) for i in range(len(held)))


def test_shapes_paraphrases_change_with_epoch():
    ds = ShapesDataset("train", 100)
    i = next(i for i in range(100) if ds.scene(i)["relation"] is not None)
    seen = set()
    for e in range(12):
        ds.set_epoch(e)
        seen.add(ds[i][1])
    assert len(seen) > 1 and seen <= set(ds.captions(i))


def test_shapes_caption_matches_picture():
    ds = ShapesDataset("val", 200, 64)
    i = next(i for i in range(200) if ds.scene(i)["relation"] == "above")
    sc = ds.scene(i)
    assert sc["objects"][0]["center"][1] < sc["objects"][1]["center"][1]  # "above" is higher on screen
    assert "above" in ds.captions(i)[0]


def test_shapes_hard_negative_changes_exactly_one_shape():
    for split in ("train", "heldout"):
        ds = ShapesDataset(split, 60, 32, seed=2)
        for i in range(60):
            image, caps = ds.hard_negative(i)
            again, caps_again = ds.hard_negative(i)
            assert torch.equal(image, again) and caps == caps_again  # a function of the item
            assert image.shape == (3, 32, 32) and not torch.equal(image, ds[i][0])
            words = list(zip(ds.captions(i)[0].split(), caps[0].split(), strict=True))
            changed = [(a, b) for a, b in words if a != b]
            assert len(changed) == 1 and {a for a, _ in changed} | {b for _, b in changed} <= set(SHAPES)
            if split == "train":  # never a held-out pair, even as a negative
                pairs = {(c, s) for c, s in zip(caps[0].split(), caps[0].split()[1:], strict=False) if s in SHAPES}
                assert not pairs & set(HELD_OUT)


def test_preprocess_crops_square_near_centre():
    img = Image.new("RGB", (100, 40), (0, 0, 0))
    img.paste((255, 255, 255), (30, 0, 70, 40))  # a white band in the middle 40 columns
    out = preprocess(img, 16)
    assert out.shape == (3, 16, 16)
    assert out.mean() > 0.9  # the centred crop is the white band
    import random

    jittered = [preprocess(img, 16, random.Random(s)) for s in range(20)]
    assert all(0.4 < j.mean() <= 1.0 for j in jittered)  # random, but never far from the centre


def test_folder_dataset_skips_corrupt_and_empty(tmp_path):
    (tmp_path / "good.png").write_bytes(_png())
    (tmp_path / "good.txt").write_text("a green thing\nanother caption\n")
    (tmp_path / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    (tmp_path / "corrupt.txt").write_text("never seen")
    (tmp_path / "empty.png").write_bytes(_png())
    (tmp_path / "empty.txt").write_text("\n   \n")
    (tmp_path / "nocaption.png").write_bytes(_png())
    ds = FolderDataset(tmp_path, image_size=16)
    assert len(ds) == 3  # the image without a caption file is not listed
    counter = SkipCounter("folder")
    with pytest.warns(UserWarning, match="skipped 2 of 3"):
        batches = list(iterate_batches(ds, batch_size=2, shuffle=False, counter=counter))
    images = torch.cat([b[0] for b in batches])
    captions = [c for b in batches for c in b[1]]
    assert images.shape == (1, 3, 16, 16) and captions[0] in ("a green thing", "another caption")


def test_coco_dataset(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "1.png").write_bytes(_png())
    (tmp_path / "img" / "2.png").write_bytes(b"broken")
    meta = {
        "images": [{"id": 1, "file_name": "1.png"}, {"id": 2, "file_name": "2.png"}],
        "annotations": [{"image_id": 1, "caption": "A cat."}, {"image_id": 2, "caption": "A dog."}],
    }
    (tmp_path / "captions.json").write_text(json.dumps(meta))
    ds = CocoDataset(tmp_path / "captions.json", tmp_path / "img", image_size=8)
    assert len(ds) == 2
    good = [ds[i] for i in range(2)]
    assert good[0][1] == "A cat." and good[1] is None
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="COCO captions JSON"):
        CocoDataset(tmp_path / "bad.json", tmp_path / "img")


def test_bad_coco_annotations_are_skipped_and_counted(tmp_path):
    """A null or numeric caption and an image without a file name are skipped (one warning), not a crash."""
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "1.png").write_bytes(_png())
    meta = {
        "images": [{"id": 1, "file_name": "1.png"}, {"id": 2, "file_name": None}, "junk"],
        "annotations": [
            {"image_id": 1, "caption": "A cat."},
            {"image_id": 1, "caption": None},
            {"image_id": 1, "caption": 42},
            {"image_id": 2, "caption": "No file."},
            None,
        ],
    }
    (tmp_path / "captions.json").write_text(json.dumps(meta))
    with pytest.warns(UserWarning, match="skipped 4 annotations"):
        ds = CocoDataset(tmp_path / "captions.json", tmp_path / "img", image_size=8)
    assert len(ds) == 1 and ds.captions(0) == ["A cat."] and ds[0][1] == "A cat."


@pytest.mark.parametrize("mode", ["I;16", "I", "F"])
def test_16_bit_and_float_images_keep_their_levels(tmp_path, mode):
    """A left-to-right ramp over the mode's whole range keeps a mean near one half (Pillow's own RGB
    conversion clips 16-bit values, which turned such a ramp white: mean 0.998)."""
    top = {"I;16": 65535, "I": 65535, "F": 1.0}[mode]
    ramp = np.tile(np.linspace(0, top, 64), (64, 1)).astype({"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode])
    img = Image.fromarray(ramp, mode) if mode != "I;16" else Image.fromarray(ramp)
    assert img.mode == mode
    x = preprocess(img, 32)
    assert x.shape == (3, 32, 32) and abs(float(x.mean()) - 0.5) < 0.02
    assert float(x[:, :, 0].mean()) < 0.05 and float(x[:, :, -1].mean()) > 0.95


def _shard(path, samples) -> str:
    """A WebDataset shard of (key, image bytes, caption) samples."""
    with tarfile.open(path, "w") as tar:
        for key, data, text in samples:
            for ext, payload in (("png", data), ("txt", text.encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return str(path)


def test_webdataset_shard(tmp_path):
    samples = [("a", _png(), "a red square"), ("b", b"garbage", "broken image"), ("c", _png(), "")]
    shard = _shard(tmp_path / "shard-000.tar", samples)
    ds = webdataset_source(shard, image_size=8, train=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = list(iterate_batches(ds, batch_size=4, shuffle=False))
    assert [c for b in batches for c in b[1]] == ["a red square"]
    assert any("skipped 2 of 3" in str(w.message) for w in caught)


def test_collate_and_bad_arguments(tmp_path):
    images, captions, skipped = collate_skip([None, (torch.zeros(3, 4, 4), "x")])
    assert images.shape == (1, 3, 4, 4) and captions == ["x"] and skipped == 1
    with pytest.raises(ValueError, match="split"):
        ShapesDataset("test")
    with pytest.raises(ValueError, match="root"):
        FolderDataset(tmp_path / "missing")
    with pytest.raises(ValueError, match="no images"):
        FolderDataset(tmp_path)


def test_shard_urls():
    assert shard_urls("a-{0..2}.tar") == ["a-0.tar", "a-1.tar", "a-2.tar"]
    assert shard_urls("x/{a,b}.tar,y.tar") == ["x/a.tar", "x/b.tar", "y.tar"]  # commas inside braces stay


def test_open_datasets_splits(tmp_path):
    train, held = open_datasets("shapes", 16, seed=1)
    assert (train.split, held.split, len(train), len(held)) == ("train", "val", 100_000, 10_000)
    for i in range(5):
        (tmp_path / f"{i}.png").write_bytes(_png(size=(40, 20)))
        (tmp_path / f"{i}.txt").write_text(f"caption {i}")
    train, held = open_datasets(f"folder:{tmp_path}", 8)
    assert len(train) == 4 and len(held) == 1
    assert held.dataset.train is False and train.dataset.train is True  # held-out images: centred crops
    train, held = open_datasets(f"folder:{tmp_path}", 8, val_spec="shapes")
    assert len(train) == 5 and held.split == "val"


def test_open_datasets_stream_holds_out_its_first_samples(tmp_path):
    shards = [
        _shard(tmp_path / f"s-{n}.tar", [(f"k{n}{i}", _png((n * 80, i * 40, 9)), f"c{n}{i}") for i in range(3)])
        for n in range(2)
    ]
    train, held = open_datasets(f"wds:{tmp_path}/s-{{0..1}}.tar", 8, stream_heldout=2)
    assert isinstance(train, torch.utils.data.IterableDataset)
    assert [held[i][1] for i in range(len(held))] == ["c00", "c01"]
    assert sorted(item[1] for item in train) == ["c02", "c10", "c11", "c12"]  # never trains on held-out samples
    train, held = open_datasets(f"wds:{shards[0]}", 8, val_spec=f"wds:{shards[1]}")
    assert len(held) == 3 and sorted(item[1] for item in train) == ["c00", "c01", "c02"]


@pytest.mark.parametrize(
    "spec,val_spec,match",
    [
        ("", None, "data: must be shapes, digits, folder:DIR, coco:CAPTIONS_JSON,IMAGE_DIR or wds:URLS"),
        ("imagenet", None, "data: must be shapes.*got 'imagenet'"),
        ("folder:", None, "data: must be"),
        ("wds:", None, "data: must be.*brace pattern or a comma list"),
        ("coco:captions.json", None, "data: coco: expects CAPTIONS_JSON,IMAGE_DIR"),
        ("folder:/no/such/dir", None, "data: 'folder:/no/such/dir': root must be an existing folder"),
        ("wds:/no/such/shard-{0..3}.tar", None, "data: .*no such shard file '/no/such/shard-0.tar'"),
        ("shapes", "nonsense", "val_data: must be shapes"),
    ],
)
def test_open_datasets_bad_specs(spec, val_spec, match):
    with pytest.raises(ValueError, match=match):
        open_datasets(spec, 8, val_spec=val_spec)
