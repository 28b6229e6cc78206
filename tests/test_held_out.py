"""The main job's held-out colour-shape pairs stay unseen: no stage it trains (the dVAE, the tokenizer and
transformer, the CLIP reranker with its near misses) ever draws or captions a scene that holds one. The
evaluation of held-out fidelity means something only while this holds."""

from __future__ import annotations

import dataclasses

import pytest

from dalle_fast.data import shapes
from dalle_fast.training.clip import train_clip
from dalle_fast.training.dalle import train_dalle
from dalle_fast.training.pipeline import PipelineConfig
from dalle_fast.training.vae import train_vae


def _pairs(scene: dict) -> set[tuple[str, str]]:
    return {(o["color"], o["shape"]) for o in scene["objects"]}


@pytest.fixture
def scenes_used(monkeypatch):
    """Every scene drawn as an image or turned into captions, as its (colour, shape) pairs."""
    used: list[set[tuple[str, str]]] = []
    draw, caption = shapes.draw_scene, shapes.scene_captions

    def recording_draw(sc, image_size):
        used.append(_pairs(sc))
        return draw(sc, image_size)

    def recording_captions(sc):
        used.append(_pairs(sc))
        return caption(sc)

    monkeypatch.setattr(shapes, "draw_scene", recording_draw)
    monkeypatch.setattr(shapes, "scene_captions", recording_captions)
    return used


def test_the_main_job_never_trains_on_a_held_out_pair(tmp_path, scenes_used):
    """The default main job's stages, as its config builds them (only the update and item counts cut)."""
    vae, dalle, clip = PipelineConfig(root=str(tmp_path), threads=1).stage_configs()
    assert vae.data == dalle.data == "shapes" and clip.data == ""  # the reranker follows the transformer's data
    assert clip.hard_negatives  # near misses: scenes with one shape changed, which must not make a held-out pair
    small = dict(ckpt_every=2, time_limit=0.0)
    train_vae(dataclasses.replace(vae, steps=2, batch_size=8, eval_images=16, **small))
    train_dalle(dataclasses.replace(dalle, steps=2, batch_size=8, max_items=96, val_items=16, samples=2, **small))
    train_clip(dataclasses.replace(clip, steps=2, batch_size=8, max_items=96, val_items=16, **small))
    assert len(scenes_used) > 200  # every stage read scenes through the recorders
    leaked = [pairs & set(shapes.HELD_OUT) for pairs in scenes_used if pairs & set(shapes.HELD_OUT)]
    assert not leaked, f"{len(leaked)} training scenes hold a held-out pair, e.g. {leaked[0]}"


def test_the_recorder_sees_held_out_pairs(scenes_used):
    """The check above has teeth: the held-out split's scenes go through the same recorders."""
    held = shapes.ShapesDataset("heldout", 4, 32)
    for i in range(len(held)):
        held[i]
    assert all(pairs & set(shapes.HELD_OUT) for pairs in scenes_used)
    assert len(scenes_used) >= 8  # each item: drawn and captioned
