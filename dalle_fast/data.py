"""Image-caption data: the built-in `shapes` dataset and readers for real data.

Every source yields (image, caption) with image a float tensor [3, S, S] in [0, 1] and caption a str.
Bad items (unreadable or corrupt images, empty or missing captions) come back as None from the
map-style sources and are dropped by `collate_skip`, which counts them; `SkipCounter` reports the count
with one warning at the end of an epoch. A run never dies on one bad file.

Sources:
  ShapesDataset     procedurally drawn shapes with captions and paraphrases; no download; same seed,
                    same data; some colour-shape pairs are held out of training (zero-shot composition)
  FolderDataset     a folder of images with same-stem .txt captions (one caption per line)
  CocoDataset       MS-COCO: a captions JSON plus its image folder
  webdataset_source WebDataset tar shards (image + txt), streamed, for data that outgrows one disk

`open_datasets(spec, image_size, seed)` turns a trainer's --data spec (shapes, folder:DIR,
coco:CAPTIONS_JSON,IMAGE_DIR, wds:URLS) into (train, held-out) datasets.

Preprocessing follows the paper: a random square crop near the centre, resized to the target size, no flip.
"""

from __future__ import annotations

import copy
import io
import json
import math
import random
import warnings
from collections.abc import Iterator, Sequence
from functools import partial
from pathlib import Path

import torch
from PIL import Image, ImageDraw, UnidentifiedImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


# ---- preprocessing ---------------------------------------------------------------------------------


def preprocess(img: Image.Image, size: int, rng: random.Random | None = None) -> torch.Tensor:
    """Square crop (random near the centre when rng is given, else centred), resize, to [3, size, size] in [0, 1]."""
    img = img.convert("RGB")
    w, h = img.size
    side = min(w, h)
    slack_x, slack_y = w - side, h - side
    # Jitter the crop by up to a quarter of the slack around the centre: random, but near the centre.
    jx = rng.uniform(-0.25, 0.25) if rng else 0.0
    jy = rng.uniform(-0.25, 0.25) if rng else 0.0
    x0 = round(slack_x / 2 + jx * slack_x)
    y0 = round(slack_y / 2 + jy * slack_y)
    img = img.crop((x0, y0, x0 + side, y0 + side)).resize((size, size), Image.Resampling.BICUBIC)
    t = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(size, size, 3)
    return t.permute(2, 0, 1).float().div_(255.0)


def _load_image(data: bytes | Path, size: int, rng: random.Random | None) -> torch.Tensor | None:
    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as img:
            img.load()
            return preprocess(img, size, rng)
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError):
        return None


def _pick_caption(lines: Sequence[str], rng: random.Random) -> str | None:
    lines = [c.strip() for c in lines if c.strip()]
    return rng.choice(lines) if lines else None


# ---- skipping bad items ----------------------------------------------------------------------------


def collate_skip(items: list) -> tuple[torch.Tensor, list[str], int]:
    """DataLoader collate_fn: drops bad items; returns (images [B, 3, S, S], captions, number skipped)."""
    good = [it for it in items if it]  # None (map-style sources) or () (streamed sources) mark bad items
    skipped = len(items) - len(good)
    if not good:
        return torch.empty(0), [], skipped
    return torch.stack([g[0] for g in good]), [g[1] for g in good], skipped


class SkipCounter:
    """Counts skipped items over an epoch and warns once at its end."""

    def __init__(self, name: str = "data"):
        self.name = name
        self.skipped = 0
        self.seen = 0

    def add(self, seen: int, skipped: int) -> None:
        self.seen += seen
        self.skipped += skipped

    def end_epoch(self) -> int:
        n = self.skipped
        if n:
            warnings.warn(
                f"{self.name}: skipped {n} of {self.seen} items this epoch (unreadable or corrupt images, "
                "empty or missing captions)",
                stacklevel=2,
            )
        self.skipped = self.seen = 0
        return n


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
        return random.Random(((self.seed * 3 + split_id) * 1_000_003 + index) * 7919 + salt)

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


class _CaptionedImages(torch.utils.data.Dataset):
    """Shared by the map-style real-data sources: items, epochs, and one image + caption per index.

    Subclasses fill self.items and implement _source(index) -> (image path, caption lines or None)."""

    def __init__(self, image_size: int, train: bool, seed: int):
        self.image_size, self.train, self.seed = image_size, train, seed
        self.epoch = 0
        self.items: list = []

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.items)

    def _source(self, index: int) -> tuple[Path, list[str] | None]:
        raise NotImplementedError

    def captions(self, index: int) -> list[str]:
        """Every caption of item `index` (stage 2 caches them all and draws one per step)."""
        lines = self._source(index)[1]
        return [c.strip() for c in lines or [] if c.strip()]

    def __getitem__(self, index: int):
        path, lines = self._source(index)
        rng = random.Random((self.seed * 1_000_003 + self.epoch) * 7919 + index)
        caption = _pick_caption(lines, rng) if lines is not None else None
        if caption is None:
            return None
        image = _load_image(path, self.image_size, rng if self.train else None)
        return None if image is None else (image, caption)


class FolderDataset(_CaptionedImages):
    """A folder (searched recursively) of images with same-stem .txt captions, one caption per line.

    Images without a caption file are not listed; unreadable images and empty caption files give None
    (dropped and counted by collate_skip)."""

    def __init__(self, root: str | Path, image_size: int = 256, train: bool = True, seed: int = 0):
        super().__init__(image_size, train, seed)
        self.root = Path(root)
        if not self.root.is_dir():
            raise ValueError(f"root must be an existing folder, got {str(root)!r}")
        self.items = sorted(
            p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.with_suffix(".txt").exists()
        )
        if not self.items:
            raise ValueError(f"no images with same-stem .txt captions under {self.root}")

    def _source(self, index: int) -> tuple[Path, list[str] | None]:
        path = self.items[index]
        try:
            return path, path.with_suffix(".txt").read_text(errors="replace").splitlines()
        except OSError:
            return path, None


class CocoDataset(_CaptionedImages):
    """MS-COCO captions: `annotations` is captions_*.json, `images` its image folder."""

    def __init__(
        self, annotations: str | Path, images: str | Path, image_size: int = 256, train: bool = True, seed: int = 0
    ):
        super().__init__(image_size, train, seed)
        try:
            meta = json.loads(Path(annotations).read_text())
            files = {im["id"]: im["file_name"] for im in meta["images"]}
            caps: dict[int, list[str]] = {}
            for a in meta["annotations"]:
                caps.setdefault(a["image_id"], []).append(a["caption"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"annotations must be a COCO captions JSON, could not read {annotations}: {e}") from e
        self.images = Path(images)
        if not self.images.is_dir():
            raise ValueError(f"images must be an existing folder, got {str(images)!r}")
        self.items = sorted((files[i], c) for i, c in caps.items() if i in files)

    def _source(self, index: int) -> tuple[Path, list[str] | None]:
        name, captions = self.items[index]
        return self.images / name, captions


class WebDatasetStream(torch.utils.data.IterableDataset):
    """WebDataset tar shards with image (jpg/png/webp) + txt members, streamed; shards are split across
    torch.distributed ranks and DataLoader workers. Bad samples yield () (dropped and counted by
    collate_skip). Samples whose sample_id is in `exclude` are dropped silently (a held-out part read
    from the same shards).

    In training, shards and samples (a buffer of `shuffle`) are shuffled with a seed drawn from
    (seed, epoch): call set_epoch before a pass to get a new order."""

    def __init__(
        self,
        urls: str | list[str],
        image_size: int = 256,
        train: bool = True,
        seed: int = 0,
        shuffle: int = 1000,
        exclude: frozenset[str] = frozenset(),
    ):
        try:
            import webdataset  # noqa: F401
        except ImportError as e:  # pragma: no cover - a declared dependency
            raise ImportError("WebDataset shards need the `webdataset` package: pip install webdataset") from e
        self.urls, self.image_size, self.train, self.seed = urls, image_size, train, seed
        self.shuffle, self.exclude = shuffle, exclude
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        import webdataset as wds

        seed = self.seed * 1_000_003 + self.epoch
        rng = random.Random(seed)
        ds = wds.WebDataset(
            self.urls,
            shardshuffle=100 if self.train else False,
            handler=wds.warn_and_continue,
            empty_check=False,
            seed=seed,
            nodesplitter=wds.split_by_node,  # under torchrun each rank reads its own shards
        )
        if self.exclude:
            ds = ds.select(lambda sample: sample_id(sample) not in self.exclude)
        if self.train and self.shuffle:
            ds = ds.shuffle(self.shuffle, rng=random.Random(seed + 1))
        to_item = partial(_decode_sample, image_size=self.image_size, rng=rng, train=self.train)
        yield from ds.map(to_item, handler=wds.warn_and_continue)


def webdataset_source(
    urls: str | list[str],
    image_size: int = 256,
    train: bool = True,
    seed: int = 0,
    shuffle: int = 1000,
    exclude: frozenset[str] = frozenset(),
) -> WebDatasetStream:
    """A WebDatasetStream (see there) over `urls`: a brace pattern, a "::"-separated string or a list."""
    return WebDatasetStream(urls, image_size, train, seed, shuffle, exclude)


def _decode_sample(sample: dict, image_size: int, rng: random.Random, train: bool):
    # A bad sample becomes () rather than None: webdataset would drop None before it could be counted.
    data = next((sample[k] for k in ("jpg", "jpeg", "png", "webp") if k in sample), None)
    text = sample.get("txt")
    if data is None or text is None:
        return ()
    caption = _pick_caption(text.decode("utf-8", errors="replace").splitlines(), rng)
    image = _load_image(data, image_size, rng if train else None)
    return () if image is None or caption is None else (image, caption)


def sample_id(sample: dict) -> str:
    """A WebDataset sample's identity across reads: its shard and key."""
    return f"{sample.get('__url__', '')}/{sample.get('__key__', '')}"


def iterate_batches(
    dataset, batch_size: int, shuffle: bool = True, workers: int = 0, seed: int = 0, counter: SkipCounter | None = None
) -> Iterator[tuple[torch.Tensor, list[str]]]:
    """One epoch of (images, captions) batches with bad items dropped; warns once at the end if any were."""
    counter = counter or SkipCounter(type(dataset).__name__)
    iterable = isinstance(dataset, torch.utils.data.IterableDataset)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle and not iterable,
        num_workers=workers,
        collate_fn=collate_skip,
        generator=torch.Generator().manual_seed(seed),
        persistent_workers=False,
    )
    for images, captions, skipped in loader:
        counter.add(len(captions) + skipped, skipped)
        if captions:
            yield images, captions
    counter.end_epoch()


# ---- --data specs ----------------------------------------------------------------------------------

DATA_SPECS = "shapes, folder:DIR, coco:CAPTIONS_JSON,IMAGE_DIR or wds:URLS"


class ListDataset(torch.utils.data.Dataset):
    """Items already in memory (a held-out part read from a stream)."""

    def __init__(self, items: list):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        return self.items[index]


def shard_urls(urls: str) -> list[str]:
    """The shards of a wds: spec: commas outside braces separate patterns, each brace-expanded
    ("a-{000..002}.tar,b.tar" -> a-000.tar, a-001.tar, a-002.tar, b.tar)."""
    from webdataset.shardlists import expand_urls

    parts, depth, start = [], 0, 0
    for i, ch in enumerate(urls):
        depth += (ch == "{") - (ch == "}")
        if ch == "," and depth == 0:
            parts.append(urls[start:i])
            start = i + 1
    parts.append(urls[start:])
    return [u for p in parts if p.strip() for u in expand_urls(p.strip())]


def _parse_spec(spec: str, flag: str) -> tuple[str, str]:
    expected = (
        f"{flag} must be {DATA_SPECS} (URLS: a brace pattern or a comma list of .tar shards, as webdataset "
        f"accepts), got {spec!r}"
    )
    if not isinstance(spec, str):
        raise ValueError(expected)
    if spec == "shapes":
        return "shapes", ""
    kind, sep, arg = spec.partition(":")
    if not sep or not arg.strip() or kind not in ("folder", "coco", "wds"):
        raise ValueError(expected)
    if kind == "coco" and "," not in arg:
        raise ValueError(f"{flag} coco: expects CAPTIONS_JSON,IMAGE_DIR (comma-separated), got {spec!r}")
    return kind, arg


def _wds_shards(arg: str, spec: str, flag: str) -> list[str]:
    urls = shard_urls(arg)
    missing = [u for u in urls if "://" not in u and not u.startswith("pipe:") and not Path(u).is_file()]
    if not urls or missing:
        raise ValueError(f"{flag} {spec!r}: no such shard file {missing[0] if missing else arg!r}")
    return urls


def _stream_prefix(urls: list[str], image_size: int, n: int, spec: str, flag: str) -> tuple[ListDataset, frozenset]:
    """The first n good samples of the shards in order (centred crops), and their sample ids."""
    import webdataset as wds

    # nodesplitter=None: under torchrun every rank reads the same held-out prefix.
    stream = wds.WebDataset(
        urls, shardshuffle=False, handler=wds.warn_and_continue, empty_check=False, nodesplitter=None
    )
    rng = random.Random(0)
    items, ids = [], set()
    for sample in stream:
        item = _decode_sample(sample, image_size, rng, train=False)
        if item:
            items.append(item)
            ids.add(sample_id(sample))
            if len(items) == n:
                break
    if not items:
        raise ValueError(f"{flag} {spec!r}: no readable image + txt sample in the shards")
    return ListDataset(items), frozenset(ids)


def _open_map_style(kind: str, arg: str, image_size: int, seed: int, spec: str, flag: str):
    try:
        if kind == "folder":
            return FolderDataset(arg, image_size, train=True, seed=seed)
        ann, img = arg.split(",", 1)
        return CocoDataset(ann, img, image_size, train=True, seed=seed)
    except ValueError as e:
        raise ValueError(f"{flag} {spec!r}: {e}") from e


def _held_out_copy(ds: _CaptionedImages) -> _CaptionedImages:
    """The same items with centred crops (evaluation is not augmented)."""
    held = copy.copy(ds)
    held.train = False
    return held


def open_datasets(
    spec: str,
    image_size: int,
    seed: int = 0,
    *,
    val_spec: str | None = None,
    stream_heldout: int = 256,
    flag: str = "--data",
    val_flag: str = "--val-data",
) -> tuple[torch.utils.data.Dataset, torch.utils.data.Dataset]:
    """(train, held-out) datasets for a data spec (the trainers' --data flag).

    shapes                       train: ShapesDataset "train" (100,000 items); held-out: its "val" split
                                 (10,000 items of the same distribution, other seeds)
    folder:DIR                   the last 2% of the items (by sorted name) are held out
    coco:CAPTIONS_JSON,IMAGE_DIR as folder:
    wds:URLS                     train is a stream (an IterableDataset, reshuffled each pass); the first
                                 `stream_heldout` good samples of the shards, read in order, are held out
                                 and the training stream skips them

    With val_spec (same forms) the held-out set comes from it instead (a stream: its first
    `stream_heldout` good samples) and training uses all of `spec`. The held-out set is always map-style
    (len, indexing) with centred crops; bad items in it are None, as in the training sources.
    """
    kind, arg = _parse_spec(spec, flag)
    split_here = not val_spec
    if split_here:
        held = None
    else:
        vkind, varg = _parse_spec(val_spec, val_flag)
        if vkind == "shapes":
            held = ShapesDataset("val", 10_000, image_size, seed)
        elif vkind == "wds":
            urls = _wds_shards(varg, val_spec, val_flag)
            held, _ = _stream_prefix(urls, image_size, stream_heldout, val_spec, val_flag)
        else:
            held = _held_out_copy(_open_map_style(vkind, varg, image_size, seed, val_spec, val_flag))

    if kind == "shapes":
        return ShapesDataset("train", 100_000, image_size, seed), held or ShapesDataset("val", 10_000, image_size, seed)
    if kind == "wds":
        urls = _wds_shards(arg, spec, flag)
        exclude: frozenset = frozenset()
        if split_here:
            held, exclude = _stream_prefix(urls, image_size, stream_heldout, spec, flag)
        return webdataset_source(urls, image_size, train=True, seed=seed, exclude=exclude), held
    full = _open_map_style(kind, arg, image_size, seed, spec, flag)
    if not split_here:
        return full, held
    if len(full) < 2:
        raise ValueError(f"{flag} {spec!r}: one item cannot be split into train and held-out; pass {val_flag}")
    n_val = max(1, len(full) // 50)  # the last 2% (by sorted name) held out
    idx = list(range(len(full)))
    train = torch.utils.data.Subset(full, idx[:-n_val])
    return train, torch.utils.data.Subset(_held_out_copy(full), idx[-n_val:])
