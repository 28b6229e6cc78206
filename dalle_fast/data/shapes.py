"""The built-in `shapes` dataset: procedurally drawn coloured shapes with captions and paraphrases.

No download; same seed, same data. Some colour-shape pairs are held out of the training split (the
test of zero-shot composition), and every item has a near miss (the same scene with one shape changed)
for the reranker's training.
"""

from __future__ import annotations

import copy
import math
import random

import torch
from PIL import Image, ImageDraw

from dalle_fast.data.batches import mix_seed
from dalle_fast.data.images import preprocess

# ---- the built-in dataset --------------------------------------------------------------------------

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
}
SHAPES = ("circle", "square", "triangle", "diamond")
SIZES = {"small": 0.22, "large": 0.38}  # fraction of the image side
# Colour-shape pairs never drawn in the training split: the test of zero-shot composition.
HELD_OUT = (("red", "triangle"), ("blue", "circle"), ("green", "diamond"), ("yellow", "square"))
RELATIONS = {  # relation -> (dx, dy) of the first object relative to the second, and its paraphrases
    "above": ((0, -1), ("above", "on top of", "over")),
    "below": ((0, 1), ("below", "under", "beneath")),
    "left": ((-1, 0), ("to the left of", "left of")),
    "right": ((1, 0), ("to the right of", "right of")),
}
INVERSE = {"above": "below", "below": "above", "left": "right", "right": "left"}


def scene_captions(sc: dict) -> list[str]:
    """Every paraphrase of a ShapesDataset scene's caption."""
    name = [f"a {o['size']} {o['color']} {o['shape']}" for o in sc["objects"]]
    if sc["relation"] is None:
        return [name[0], f"{name[0]} on a grey background", f"there is {name[0]}"]
    rel = sc["relation"]
    out = [f"{name[0]} {p} {name[1]}" for p in RELATIONS[rel][1]]
    out += [f"{name[1]} {p} {name[0]}" for p in RELATIONS[INVERSE[rel]][1]]
    return out


def draw_scene(sc: dict, image_size: int) -> Image.Image:
    """A ShapesDataset scene as an image_size x image_size RGB image."""
    s = image_size * 4  # draw large, then downsample: anti-aliased edges
    img = Image.new("RGB", (s, s), (200, 200, 200))
    draw = ImageDraw.Draw(img)
    for o in sc["objects"]:
        r = SIZES[o["size"]] * s / 2
        cx, cy = o["center"][0] * s, o["center"][1] * s
        fill = COLORS[o["color"]]
        if o["shape"] == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif o["shape"] == "square":
            draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif o["shape"] == "triangle":
            pts = [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
            draw.polygon(pts, fill=fill)
        else:
            draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    return img.resize((image_size, image_size), Image.Resampling.LANCZOS)


class ShapesDataset(torch.utils.data.Dataset):
    """Deterministic procedural captions dataset: one or two shapes with colour, shape, size, position.

    split: "train" (never draws a HELD_OUT colour-shape pair), "heldout" (every item contains at least
    one held-out pair), or "val" (same distribution as train, other seeds). Item i is a function of
    (seed, split, i) only. Each item has several paraphrased captions; which one __getitem__ returns
    also depends on the epoch (set_epoch), so training sees paraphrases.
    """

    def __init__(self, split: str = "train", length: int = 10000, image_size: int = 64, seed: int = 0):
        if split not in ("train", "val", "heldout"):
            raise ValueError(f"split must be 'train', 'val' or 'heldout', got {split!r}")
        if length < 1 or image_size < 8:
            raise ValueError(f"length must be >= 1 and image_size >= 8, got {length}, {image_size}")
        self.split, self.length, self.image_size, self.seed = split, length, image_size, seed
        self.epoch = 0

    def __len__(self) -> int:
        return self.length

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _rng(self, index: int, salt: int = 0) -> random.Random:
        split_id = {"train": 0, "val": 1, "heldout": 2}[self.split]
        return random.Random(mix_seed(self.seed * 3 + split_id, index) * 7919 + salt)

    def _object(self, rng: random.Random, want_held_out: bool) -> dict:
        while True:
            color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
            if ((color, shape) in HELD_OUT) == want_held_out:
                return {"color": color, "shape": shape, "size": rng.choice(list(SIZES))}

    def scene(self, index: int) -> dict:
        """The item's content: objects (colour, shape, size, centre) and the relation between them."""
        if not 0 <= index < self.length:
            raise IndexError(index)
        rng = self._rng(index)
        two = rng.random() < 0.6
        held_slot = rng.randrange(2 if two else 1) if self.split == "heldout" else -1
        objs = [self._object(rng, held_slot == k) for k in range(2 if two else 1)]
        if not two:
            objs[0]["center"] = (rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7))
            return {"objects": objs, "relation": None}
        rel = rng.choice(list(RELATIONS))
        (dx, dy), _ = RELATIONS[rel]
        cx, cy = rng.uniform(0.4, 0.6), rng.uniform(0.4, 0.6)
        gap = 0.26
        objs[0]["center"] = (cx + dx * gap, cy + dy * gap)
        objs[1]["center"] = (cx - dx * gap, cy - dy * gap)
        return {"objects": objs, "relation": rel}

    def captions(self, index: int) -> list[str]:
        """Every paraphrase of item `index`'s caption."""
        return scene_captions(self.scene(index))

    def render(self, index: int) -> Image.Image:
        return draw_scene(self.scene(index), self.image_size)

    def hard_negative(self, index: int) -> tuple[torch.Tensor, list[str]]:
        """A near miss of item `index` for contrastive training: the same scene with one object's shape changed
        (to a colour-shape pair this split draws), as (image (3, S, S) in [0, 1], every paraphrase of its
        caption). Colour alone tells most captions apart; these pairs teach a reranker to look at shape."""
        sc = copy.deepcopy(self.scene(index))
        rng = self._rng(index, salt=-1)
        obj = rng.choice(sc["objects"])
        allowed = [
            s for s in SHAPES
            if s != obj["shape"] and (self.split == "heldout" or (obj["color"], s) not in HELD_OUT)
        ]  # fmt: skip
        obj["shape"] = rng.choice(allowed)
        return preprocess(draw_scene(sc, self.image_size), self.image_size), scene_captions(sc)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        image = preprocess(self.render(index), self.image_size)
        caption = self._rng(index, salt=1 + self.epoch).choice(self.captions(index))
        return image, caption


# ---- real data -------------------------------------------------------------------------------------
