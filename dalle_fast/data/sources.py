"""Real image-caption data and the --data specs that name it.

Sources:
  shapes            the built-in dataset (dalle_fast.data.shapes)
  digits            real handwritten digits, tinted and captioned (dalle_fast.data.digits; scikit-learn's copy)
  FolderDataset     a folder of images with same-stem .txt captions (one caption per line)
  CocoDataset       MS-COCO: a captions JSON plus its image folder
  webdataset_source WebDataset tar shards (image + txt), streamed, for data that outgrows one disk

`open_datasets(spec, image_size, seed)` turns a data spec (shapes, digits, folder:DIR,
coco:CAPTIONS_JSON,IMAGE_DIR, wds:URLS) into (train, held-out) datasets.
"""

from __future__ import annotations

import copy
import json
import random
import warnings
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from dalle_fast.data.batches import mix_seed
from dalle_fast.data.digits import HELD_OUT, DigitsDataset
from dalle_fast.data.images import IMAGE_EXTENSIONS, SkipCounter, _load_image, _pick_caption, collate_skip
from dalle_fast.data.shapes import COLORS, ShapesDataset
from dalle_fast.errors import FieldError


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
        rng = random.Random(mix_seed(self.seed, self.epoch) * 7919 + index)
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
        images = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        self.items = [p for p in images if p.with_suffix(".txt").exists()]
        self.uncaptioned = len(images) - len(self.items)  # images left out: no caption file
        if not self.items:
            raise ValueError(
                f"no images with same-stem .txt captions under {self.root} ({len(images)} images without one)"
            )

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
            images_meta, annotations_meta = meta["images"], meta["annotations"]
            if not isinstance(images_meta, list) or not isinstance(annotations_meta, list):
                raise TypeError("its images and annotations must be lists")
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"annotations must be a COCO captions JSON, could not read {annotations}: {e}") from e
        self.images = Path(images)
        if not self.images.is_dir():
            raise ValueError(f"images must be an existing folder, got {str(images)!r}")
        # A bad entry (a caption that is not text, an image without a file name) is skipped and counted,
        # like an unreadable image: one bad annotation does not stop a run.
        files = {im.get("id"): im.get("file_name") for im in images_meta if isinstance(im, dict)}
        caps: dict = {}
        bad = 0
        for a in annotations_meta:
            caption = a.get("caption") if isinstance(a, dict) else None
            if isinstance(caption, str) and caption.strip():
                caps.setdefault(a.get("image_id"), []).append(caption)
            else:
                bad += 1
        self.items = []
        for i, c in caps.items():
            name = files.get(i)
            if isinstance(name, str) and name:
                self.items.append((name, c))
            else:
                bad += len(c)
        self.items.sort()
        self.bad_annotations = bad
        if bad:
            warnings.warn(
                f"{annotations}: skipped {bad} annotations (a caption that is not text, or an image without a "
                "file name)",
                stacklevel=2,
            )

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

        seed = mix_seed(self.seed, self.epoch)
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

DATA_SPECS = "shapes, digits, folder:DIR, coco:CAPTIONS_JSON,IMAGE_DIR or wds:URLS"
BUILT_IN = ("shapes", "digits")  # the data specs that need no files
# The trainers' --data help.
DATA_HELP = (
    "shapes | digits (pip install -e '.[digits]') | folder:DIR | coco:CAPTIONS_JSON,IMAGE_DIR | wds:URLS "
    "(tar shards: a brace pattern or a comma list)"
)


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
        f"must be {DATA_SPECS} (URLS: a brace pattern or a comma list of .tar shards, as webdataset "
        f"accepts), got {spec!r}"
    )
    if not isinstance(spec, str):
        raise FieldError(flag, expected)
    if spec in BUILT_IN:
        return spec, ""
    kind, sep, arg = spec.partition(":")
    if not sep or not arg.strip() or kind not in ("folder", "coco", "wds"):
        raise FieldError(flag, expected)
    if kind == "coco" and "," not in arg:
        raise FieldError(flag, f"coco: expects CAPTIONS_JSON,IMAGE_DIR (comma-separated), got {spec!r}")
    return kind, arg


def _wds_shards(arg: str, spec: str, flag: str) -> list[str]:
    urls = shard_urls(arg)
    missing = [u for u in urls if "://" not in u and not u.startswith("pipe:") and not Path(u).is_file()]
    if not urls or missing:
        raise FieldError(flag, f"{spec!r}: no such shard file {missing[0] if missing else arg!r}")
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
        raise FieldError(flag, f"{spec!r}: no readable image + txt sample in the shards")
    return ListDataset(items), frozenset(ids)


def _digits(split: str, image_size: int, seed: int, flag: str) -> DigitsDataset:
    try:
        return DigitsDataset(split, image_size, seed)
    except ImportError as e:
        raise FieldError(flag, f"digits: {e}") from e
    except ValueError as e:
        raise FieldError(flag, f"digits at image size {image_size}: {e}") from e


def describe(spec: str, train, held, image_size: int, val_spec: str | None = None) -> str:
    """What a run trains on, in a line for its start: the items found, those left out and why, the
    held-out part, and the size images are brought to."""
    full = train.dataset if isinstance(train, torch.utils.data.Subset) else train
    held_out = f"{len(held):,} held out" + (f" from {val_spec}" if val_spec else "")
    if isinstance(full, ShapesDataset):
        return f"data: {spec}: built-in scenes drawn at {image_size}x{image_size} ({held_out})"
    if isinstance(full, DigitsDataset):
        return (
            f"data: {spec}: {len(full.scans):,} handwritten 8x8 digits tinted in {len(COLORS)} colours, "
            f"{len(full):,} training items ({held_out}; {len(HELD_OUT)} colour-digit pairs never trained on), "
            f"upscaled to {image_size}x{image_size}"
        )
    resize = f"cropped to a square near the centre and resized to {image_size}x{image_size}"
    if isinstance(train, WebDatasetStream):
        return f"data: {spec}: {len(train.urls)} shards, streamed ({held_out}); each image {resize}"
    parts = [f"{len(full):,} captioned images ({len(train):,} for training, {held_out})"]
    if getattr(full, "uncaptioned", 0):
        parts.append(f"{full.uncaptioned:,} without a same-stem .txt caption left out")
    if getattr(full, "bad_annotations", 0):
        parts.append(f"{full.bad_annotations:,} unusable annotations skipped")
    try:
        with Image.open(full._source(0)[0]) as img:
            resize = f"the first is {img.width}x{img.height}; each is {resize}"
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError):
        pass
    parts += [resize, "unreadable ones are skipped and counted as they are read"]
    return f"data: {spec}: " + "; ".join(parts)


def _open_map_style(kind: str, arg: str, image_size: int, seed: int, spec: str, flag: str):
    try:
        if kind == "folder":
            return FolderDataset(arg, image_size, train=True, seed=seed)
        ann, img = arg.split(",", 1)
        return CocoDataset(ann, img, image_size, train=True, seed=seed)
    except ValueError as e:
        raise FieldError(flag, f"{spec!r}: {e}") from e


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
    flag: str = "data",
    val_flag: str = "val_data",
) -> tuple[torch.utils.data.Dataset, torch.utils.data.Dataset]:
    """(train, held-out) datasets for a data spec (the trainers' data field; errors name `flag`).

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
        elif vkind == "digits":
            held = _digits("val", image_size, seed, val_flag)
        elif vkind == "wds":
            urls = _wds_shards(varg, val_spec, val_flag)
            held, _ = _stream_prefix(urls, image_size, stream_heldout, val_spec, val_flag)
        else:
            held = _held_out_copy(_open_map_style(vkind, varg, image_size, seed, val_spec, val_flag))

    if kind == "digits":
        return _digits("train", image_size, seed, flag), held or _digits("val", image_size, seed, flag)
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
        raise FieldError(
            flag, f"{spec!r}: one item cannot be split into train and held-out; give held-out data ({val_flag})"
        )
    n_val = max(1, len(full) // 50)  # the last 2% (by sorted name) held out
    idx = list(range(len(full)))
    train = torch.utils.data.Subset(full, idx[:-n_val])
    return train, torch.utils.data.Subset(_held_out_copy(full), idx[-n_val:])


def open_eval_set(spec: str, image_size: int, n: int, seed: int = 0, flag: str = "data") -> torch.utils.data.Dataset:
    """All of a data spec as an evaluation set (map-style, centred crops, bad items None): shapes and digits
    their "val" split (n items of shapes), folder: and coco: every item, wds: the first n good samples of
    the shards in order."""
    kind, arg = _parse_spec(spec, flag)
    if kind == "shapes":
        return ShapesDataset("val", n, image_size, seed)
    if kind == "digits":
        return _digits("val", image_size, seed, flag)
    if kind == "wds":
        return _stream_prefix(_wds_shards(arg, spec, flag), image_size, n, spec, flag)[0]
    return _held_out_copy(_open_map_style(kind, arg, image_size, seed, spec, flag))
