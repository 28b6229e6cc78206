"""Image quality of a trained run on any data spec, by the paper's protocol (its Fig. 9):
python -m dalle_fast.evaluate images --run RUN --data SPEC.

1. The evaluation set: the first `n` good items of SPEC (shapes: its "val" split; folder:, coco: every
   item; wds: the shards' first samples), or by default the held-out part of the run's own training
   data. One caption per item, its image the real side of every comparison.
2. Real statistics, per blur radius, cached per (extractor sha256, data spec, image size, blur, n, seed)
   in the cache folder (dalle_fast.evaluation.extractors.default_cache), so a second run or model reuses them.
3. Generation: max(rerank) draws per caption, batched through the KV cache (on the GPU when there is
   one), kept in OUT/samples/chunk_*.safetensors as 8-bit images with their CLIP scores; a stopped
   run continues from the chunks it has. For each N of `rerank`, the image kept for a caption is the
   best by CLIP of its first N draws (N = 1: the first draw, no reranking).
4. Generated statistics per (N, blur), streamed chunk by chunk and checkpointed (OUT/stats_generated
   .safetensors, tied to the extractor's sha256: another extractor starts them afresh).
5. FID and IS per N and blur radius, the CLIP score (100 x mean cosine similarity of each kept image with
   its caption, and of the real images with theirs), and optionally near duplicates: each evaluation
   image's nearest training image by cosine similarity of the extractor's features, the share above a
   threshold, FID with and without those captions, and a picture of the closest pairs.

Report: quality.json, quality.md (tables), quality_blur.png, quality_rerank.png, near_duplicates.png.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from dalle_fast.data.sources import open_datasets, open_eval_set
from dalle_fast.errors import FieldError, check_finite, field_errors
from dalle_fast.evaluation.extractors import Extractor, default_cache, load_extractor
from dalle_fast.evaluation.fid import BlurStats, parse_numbers
from dalle_fast.evaluation.image_sets import quantize
from dalle_fast.evaluation.statistics import FeatureStats, fid, load_stats, save_stats
from dalle_fast.files import atomic_write
from dalle_fast.ops.device import choose_device, parse_device
from dalle_fast.progress import Progress
from dalle_fast.runs.checkpoint import load_config
from dalle_fast.runs.load import load_transformer
from dalle_fast.sampling.rerank import find_scorer
from dalle_fast.sampling.sample import check_captions, generate, sampling_device

CONVENTION = 1  # the image convention's version (image_sets): part of every cache key


@dataclass
class ImagesConfig:
    """FID, IS and CLIP score of a stage-2 run's samples against real images of a data spec, per blur
    radius and reranking sample size N (the paper's Fig. 9), with near duplicates of the training data."""

    run: str = field(default="", metadata={"help": "the stage-2 run directory"})
    data: str = field(
        default="",
        metadata={"help": "evaluation data: shapes | digits | folder:DIR | coco:JSON,DIR | wds:URLS; empty: the "
                  "held-out part of the run's training data"},
    )  # fmt: skip
    n: int = field(default=30000, metadata={"help": "evaluation captions (one real image each)"})
    rerank: str = field(default="1", metadata={"help": "reranking sample sizes N, comma-separated (N > 1 needs CLIP)"})
    blur: str = field(default="0,1,2,4,8", metadata={"help": "Gaussian blur radii (px) of both sides, comma-separated"})
    extractor: str = field(
        default="", metadata={"help": "inception:WEIGHTS.pth | a TorchScript file | shapes; empty: shapes on shapes"}
    )
    extractor_sha256: str = field(default="", metadata={"help": "the extractor file's expected sha256; empty: any"})
    extractor_steps: int = field(default=1200, metadata={"help": "updates of the shapes extractor when trained"})
    clip: str = field(
        default="", metadata={"help": "CLIP run for reranking and the CLIP score; empty: RUN/../clip; none: neither"}
    )
    train_data: str = field(default="", metadata={"help": "training data for near duplicates; empty: the run's"})
    train_n: int = field(default=0, metadata={"help": "training images searched for near duplicates; 0: none"})
    dup_threshold: float = field(
        default=0.95, metadata={"help": "cosine similarity from which a pair is a near duplicate"}
    )
    out: str = field(default="", metadata={"help": "output folder (samples, statistics, report); empty: RUN/eval"})
    report: str = field(default="", metadata={"help": "folder of the report (json, tables, plots); empty: OUT"})
    cache: str = field(
        default="", metadata={"help": "cache of reference statistics and extractors; empty: ~/.cache/dalle_fast"}
    )
    restart: bool = field(default=False, metadata={"help": "discard the samples and statistics kept in OUT"})
    chunk: int = field(default=1024, metadata={"help": "images per kept chunk of samples"})
    batch_size: int = field(default=64, metadata={"help": "images sampled at once"})
    feature_batch: int = field(default=100, metadata={"help": "images per extractor call"})
    splits: int = field(default=10, metadata={"help": "splits of the Inception score"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature"})
    top_k: int = field(default=0, metadata={"help": "top-k of the sampling; 0: all"})
    guidance: float = field(default=1.0, metadata={"help": "classifier-free guidance scale; 1: none"})
    seed: int = field(default=0, metadata={"help": "seed of the evaluation set and the sampling"})
    threads: int = field(default=0, metadata={"help": "torch CPU threads; 0: torch's default"})
    device: str = field(default="auto", metadata={"help": "where to sample and extract: auto | cpu | cuda | cuda:N"})

    def __post_init__(self):
        check_finite(self)
        if not self.run:
            raise FieldError("run", "required: the stage-2 run directory")
        for name in ("n", "chunk", "batch_size", "feature_batch", "splits", "extractor_steps"):
            if getattr(self, name) < 1:
                raise FieldError(name, f"must be >= 1, got {getattr(self, name)}")
        for name in ("train_n", "threads", "top_k"):
            if getattr(self, name) < 0:
                raise FieldError(name, f"must be >= 0, got {getattr(self, name)}")
        if not -1 <= self.dup_threshold <= 1:
            raise FieldError("dup_threshold", f"must be a cosine similarity in [-1, 1], got {self.dup_threshold}")
        if not self.guidance >= 1:
            raise FieldError("guidance", f"must be >= 1 (1: none), got {self.guidance}")
        parse_numbers(self.rerank, "rerank", int, 1)
        parse_numbers(self.blur, "blur")
        parse_device(self.device)


def best_of_first(scores: torch.Tensor, ns: list[int]) -> dict[int, torch.Tensor]:
    """For each N: the index (C,) of the highest score among each row's first N draws (scores (C, D))."""
    return {n: scores[:, :n].argmax(1) for n in ns}


def _key_hash(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]


def _clip_similarity(scorer, images: torch.Tensor, captions: list[str]) -> torch.Tensor:
    """Cosine similarity of uint8 images with their captions (the project's and open_clip's scores are cosine)."""
    return scorer.score(images.float() / 255, captions).float()


# ---- 1 + 2: the evaluation set, its captions and real statistics ------------------------------------


def _eval_pass(cfg, spec, dataset, size, extractor, blurs, cache, scorer, keep_features):
    """One pass over the evaluation set: captions (and their item indices), real statistics for every
    radius not cached, the real images' CLIP similarity, and blur-0 features when near duplicates need them."""
    keys = {r: {"extractor_sha256": extractor.sha256, "data": spec, "image_size": size, "blur": r, "n": cfg.n,
                "seed": cfg.seed, "convention": CONVENTION} for r in blurs}  # fmt: skip
    files = {r: cache / "stats" / f"real-{_key_hash(k)}.safetensors" for r, k in keys.items()}
    real = BlurStats(blurs, cfg.splits)
    for r, path in files.items():
        if path.is_file():
            try:
                named, meta = load_stats(path)
            except ValueError:  # a damaged cache file: computed again
                continue
            if meta.get("key") == keys[r]:
                real.features[r] = named["features"]
                if "classes" in named:
                    real.classes[r] = named["classes"]
    todo = [r for r in blurs if r not in real.features]
    fresh = BlurStats(todo, cfg.splits)
    captions, indices, kept_feats, clip_sum, skipped = [], [], [], 0.0, 0
    total = min(cfg.n, len(dataset))
    bar = Progress(total, "evaluation set" + (f" (real features at blur {todo})" if todo else ""), unit="img")
    batch: list = []

    def flush():
        nonlocal clip_sum
        if not batch:
            return
        x = quantize(torch.stack([b[0] for b in batch]))
        caps = [b[1] for b in batch]
        if todo:
            fresh.accumulate(extractor, x)
        if keep_features:
            kept_feats.append(extractor(x)[0])
        if scorer is not None:
            clip_sum += float(_clip_similarity(scorer, x, caps).sum())
        bar.update(len(batch))
        batch.clear()

    for i in range(len(dataset)):
        if len(captions) == cfg.n:
            break
        item = dataset[i]
        if not item:
            skipped += 1
            continue
        image, caption = item
        if image.shape[-2:] != (size, size):
            raise FieldError("data", f"item {i} is {list(image.shape)}, expected {size}x{size}")
        captions.append(caption)
        indices.append(i)
        batch.append((image, caption))
        if len(batch) == cfg.feature_batch:
            flush()
    flush()
    bar.close()
    if len(captions) < 2:
        raise FieldError("data", f"{spec}: {len(captions)} readable items ({skipped} skipped); FID needs at least 2")
    for r in todo:
        real.features[r] = fresh.features[r]
        named = {"features": fresh.features[r]}
        if r in fresh.classes:
            real.classes[r] = named["classes"] = fresh.classes[r]
        save_stats(files[r], named, {"key": keys[r]})
    return {
        "captions": captions,
        "indices": indices,
        "skipped": skipped,
        "real": real,
        "real_clip": clip_sum / len(captions) if scorer is not None else None,
        "features": torch.cat(kept_feats) if keep_features else None,
        "cached_blurs": [r for r in blurs if r not in todo],
    }


# ---- 3 + 4: samples in chunks, and their statistics -------------------------------------------------


class SampleStore:
    """OUT/samples: meta.json (the settings the samples were drawn with) and chunk_K.safetensors (uint8
    images (C, draws, 3, H, W), CLIP scores (C, draws)) for captions [K * per, (K + 1) * per)."""

    def __init__(self, folder: Path, settings: dict, restart: bool):
        self.folder, self.settings = folder, settings
        meta = folder / "meta.json"
        if restart and folder.exists():
            for p in folder.glob("chunk_*.safetensors"):
                p.unlink()
            meta.unlink(missing_ok=True)
        if meta.is_file():
            kept = json.loads(meta.read_text())
            if kept != settings:
                diff = sorted(k for k in set(kept) | set(settings) if kept.get(k) != settings.get(k))
                raise FieldError(
                    "out",
                    f"{folder} holds samples drawn with other settings ({', '.join(diff)}): give another "
                    "output folder, or restart to discard them",
                )
        else:
            folder.mkdir(parents=True, exist_ok=True)
            atomic_write(meta, lambda p: p.write_text(json.dumps(settings, indent=1)))

    def path(self, k: int) -> Path:
        return self.folder / f"chunk_{k:05d}.safetensors"

    def has(self, k: int) -> bool:
        return self.path(k).is_file()

    def save(self, k: int, images: torch.Tensor, scores: torch.Tensor) -> None:
        atomic_write(self.path(k), lambda p: save_file({"images": images.contiguous(), "scores": scores}, str(p)))

    def load(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        t = load_file(str(self.path(k)))
        return t["images"], t["scores"]


def _generated_pass(cfg, out, model, tok, dvae, scorer, extractor, captions, ns, blurs, device):
    """Draws the missing chunks and streams every chunk's kept images into per-(N, blur) statistics."""
    draws = max(ns)
    per = max(1, cfg.chunk // draws)
    chunks = (len(captions) + per - 1) // per
    settings = {k: v for k, v in asdict(cfg).items() if k in ("run", "data", "n", "seed", "temperature", "top_k",
                                                              "guidance", "chunk", "clip")}  # fmt: skip
    settings.update(draws=draws, captions=len(captions), captions_sha=_key_hash({"c": captions}))
    store = SampleStore(out / "samples", settings, cfg.restart)
    stats_path = out / "stats_generated.safetensors"
    stats_meta = {"extractor_sha256": extractor.sha256, "ns": ns, "blurs": blurs, "samples": settings}
    gen = {n: BlurStats(blurs, cfg.splits) for n in ns}
    clip_sum = torch.zeros(len(ns), dtype=torch.float64)
    done = 0
    if stats_path.is_file() and not cfg.restart:
        try:
            named, meta = load_stats(stats_path)
        except ValueError:  # damaged (a stop while writing cannot do it: the writes are atomic): start afresh
            named, meta = {}, {}
        if {k: meta.get(k) for k in stats_meta} == stats_meta:
            gen = {n: BlurStats.from_named(named, blurs, cfg.splits, prefix=f"N{n}/") for n in ns}
            done, clip_sum = meta["chunks"], torch.tensor(meta["clip_sum"], dtype=torch.float64)
    bar = Progress(len(captions), f"samples ({draws} per caption) and their features", unit="caption",
                   initial=min(done * per, len(captions)))  # fmt: skip
    last_save = time.time()
    for k in range(done, chunks):
        caps = captions[k * per : (k + 1) * per]
        if store.has(k):
            images, scores = store.load(k)
        else:
            g = torch.Generator(device).manual_seed(cfg.seed * 1_000_003 + k)  # a chunk's draws do not depend on a stop
            with field_errors("data"):
                text = check_captions(caps, tok)
            res = generate(model, text, dvae, draws=draws, batch_size=cfg.batch_size, generator=g,
                           temperature=cfg.temperature, top_k=cfg.top_k, guidance=cfg.guidance)  # fmt: skip
            images = quantize(res["images"])  # (C, draws, 3, H, W)
            if scorer is not None:
                flat = images.flatten(0, 1)
                scores = _clip_similarity(scorer, flat, [c for c in caps for _ in range(draws)]).view(len(caps), draws)
            else:
                scores = torch.full((len(caps), draws), float("nan"))
            store.save(k, images, scores)
        rows = torch.arange(len(caps))
        for j, (n, pick) in enumerate(best_of_first(scores, ns).items()):
            kept = images[rows, pick]
            for i in range(0, len(kept), cfg.feature_batch):
                gen[n].accumulate(extractor, kept[i : i + cfg.feature_batch])
            clip_sum[j] += float(scores[rows, pick].double().sum())
        bar.update(len(caps))
        if k == chunks - 1 or time.time() - last_save > 60:
            named = {f"N{n}/{name}": s for n in ns for name, s in gen[n].named().items()}
            save_stats(stats_path, named, {**stats_meta, "chunks": k + 1, "clip_sum": clip_sum.tolist()})
            last_save = time.time()
    bar.close()
    return gen, (clip_sum / len(captions)).tolist(), store, per


# ---- 5: near duplicates ---------------------------------------------------------------------------


def _near_duplicates(cfg, spec, size, extractor, eval_features, seed):
    """Each evaluation image's nearest training image: (cosine similarity (n,), training index (n,)), and
    the training set (to draw the pairs)."""
    with field_errors("train_data"):
        train, _ = open_datasets(spec, size, seed, flag="train_data")
    e = F.normalize(eval_features.float(), dim=-1)
    best = torch.full((len(e),), -2.0)
    where = torch.full((len(e),), -1, dtype=torch.long)
    bar = Progress(cfg.train_n, f"near duplicates in {spec}", unit="img")
    batch, idx, seen = [], [], 0

    def flush():
        if not batch:
            return
        f = F.normalize(extractor(quantize(torch.stack(batch)))[0], dim=-1)
        sim, arg = (e @ f.T).max(1)
        better = sim > best
        best[better], where[better] = sim[better], torch.tensor(idx)[arg[better]]
        bar.update(len(batch))
        batch.clear()
        idx.clear()

    iterable = isinstance(train, torch.utils.data.IterableDataset)
    items = iter(train) if iterable else (train[i] for i in range(min(len(train), cfg.train_n)))
    for i, item in enumerate(items):
        if seen == cfg.train_n:
            break
        if not item:
            continue
        batch.append(item[0])
        idx.append(i)
        seen += 1
        if len(batch) == cfg.feature_batch:
            flush()
    flush()
    bar.close()
    return best, where, train, iterable


def _duplicate_pairs_png(path: Path, eval_set, eval_idx, train, sims, where, top: int = 8) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = sims.argsort(descending=True)[:top].tolist()
    fig, axes = plt.subplots(2, len(order), figsize=(1.6 * len(order), 3.6), squeeze=False)
    for col, i in enumerate(order):
        for row, img in enumerate((eval_set[eval_idx[i]][0], train[int(where[i])][0])):
            ax = axes[row][col]
            ax.imshow(img.permute(1, 2, 0).clamp(0, 1).numpy())
            ax.set_xticks([])
            ax.set_yticks([])
        axes[0][col].set_title(f"{float(sims[i]):.3f}", fontsize=8)
    axes[0][0].set_ylabel("evaluation", fontsize=8)
    axes[1][0].set_ylabel("training", fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, dpi=100, format="png"))
    plt.close(fig)


# ---- the whole evaluation ---------------------------------------------------------------------------


def _default_extractor(cfg, meta) -> str:
    if cfg.extractor:
        return cfg.extractor
    if (cfg.data or meta.get("train", {}).get("data", "shapes")) == "shapes":
        return "shapes"
    raise FieldError("extractor", "required for data other than shapes: inception:WEIGHTS.pth or a TorchScript file")


def report_folder(cfg: ImagesConfig, out: Path) -> Path:
    return Path(cfg.report) if cfg.report else out


def evaluate_images(cfg: ImagesConfig, out: Path) -> dict:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    ns = parse_numbers(cfg.rerank, "rerank", int, 1)
    blurs = parse_numbers(cfg.blur, "blur")
    with field_errors("run"):
        meta = load_config(cfg.run)
        model, tok, dvae = load_transformer(cfg.run)
    train_cfg = meta.get("train", {})
    size = dvae.cfg.image_size
    device = sampling_device(cfg.device, model)
    model.to(device)
    scorer, where_clip = find_scorer(cfg.run, cfg.clip)
    if scorer is None and max(ns) > 1:
        raise FieldError("rerank", f"N > 1 needs a CLIP reranker: none at {where_clip} (give clip)")
    cache = Path(cfg.cache or default_cache())
    extractor: Extractor = load_extractor(_default_extractor(cfg, meta), image_size=size, cache=cache,
                                          expected_sha256=cfg.extractor_sha256, steps=cfg.extractor_steps)  # fmt: skip
    extractor.to(choose_device(cfg.device))
    if cfg.data:
        spec = cfg.data
        with field_errors("data"):
            dataset = open_eval_set(spec, size, cfg.n, cfg.seed)
    else:  # the held-out part of the run's training data
        spec = train_cfg.get("data", "shapes")
        with field_errors("run"):
            dataset = open_datasets(spec, size, cfg.seed, val_spec=train_cfg.get("val_data") or None,
                                    stream_heldout=cfg.n)[1]  # fmt: skip
        spec = f"held-out part of {spec}" + (f" ({train_cfg['val_data']})" if train_cfg.get("val_data") else "")
    print(f"extractor: {extractor.spec} (sha256 {extractor.sha256[:16]}...)", file=sys.stderr)
    ev = _eval_pass(cfg, spec, dataset, size, extractor, blurs, cache, scorer, keep_features=cfg.train_n > 0)
    captions = ev["captions"]
    gen, clip_scores, store, per = _generated_pass(
        cfg, out, model, tok, dvae, scorer, extractor, captions, ns, blurs, device
    )
    real: BlurStats = ev["real"]
    results: dict = {
        **extractor.identity(),
        "run": str(cfg.run),
        "data": spec,
        "image_size": size,
        "captions": len(captions),
        "skipped_items": ev["skipped"],
        "N": ns,
        "blur": blurs,
        "sampling": {"temperature": cfg.temperature, "top_k": cfg.top_k, "guidance": cfg.guidance, "seed": cfg.seed},
        "clip": where_clip if scorer is not None else None,
        "real_stats_cached_for_blur": ev["cached_blurs"],
        "fid": {str(n): {f"{r:g}": fid(real.features[r], gen[n].features[r]) for r in blurs} for n in ns},
        "is": {str(n): {f"{r:g}": gen[n].inception_score(r) for r in blurs} for n in ns},
        "is_real": {f"{r:g}": real.inception_score(r) for r in blurs},
    }
    if scorer is not None:
        results["clip_score"] = {str(n): 100 * s for n, s in zip(ns, clip_scores, strict=True)}
        results["clip_score_real"] = 100 * ev["real_clip"]
    if cfg.train_n:
        results["near_duplicates"] = _near_duplicate_results(cfg, out, train_cfg, size, extractor, ev, dataset,
                                                             real, gen, ns, store, per)  # fmt: skip
    atomic_write(report_folder(cfg, out) / "quality.json", lambda p: p.write_text(json.dumps(results, indent=1)))
    return results


def _near_duplicate_results(cfg, out, train_cfg, size, extractor, ev, dataset, real, gen, ns, store, per) -> dict:
    spec = cfg.train_data or train_cfg.get("data", "shapes")
    sims, where, train, streamed = _near_duplicates(cfg, spec, size, extractor, ev["features"], cfg.seed)
    dup = (sims >= cfg.dup_threshold).nonzero().flatten()
    n = max(ns)
    res = {
        "train_data": spec,
        "train_images": cfg.train_n,
        "threshold": cfg.dup_threshold,
        "count": len(dup),
        "share": len(dup) / len(sims),
        "similarity_quantiles": {q: float(sims.quantile(float(q))) for q in ("0.5", "0.9", "0.99", "1.0")},
        "N": n,
        "fid_with": fid(real.features[0.0], gen[n].features[0.0]) if 0.0 in real.features else None,
    }
    if 0.0 in real.features and 0 < len(dup) <= len(sims) - 2:
        # Their real features are in ev["features"]; their captions' kept samples are re-read from the chunks.
        real_dup = FeatureStats(ev["features"].shape[1]).update(ev["features"][dup])
        gen_dup = FeatureStats(ev["features"].shape[1])
        for k in sorted({int(i) // per for i in dup}):
            images, scores = store.load(k)
            rows = torch.tensor([int(i) - k * per for i in dup if int(i) // per == k])
            pick = best_of_first(scores[rows], [n])[n]
            gen_dup.update(extractor(images[rows, pick])[0])
        res["fid_without"] = fid(real.features[0.0] - real_dup, gen[n].features[0.0] - gen_dup)
    if not streamed and len(sims):
        _duplicate_pairs_png(
            report_folder(cfg, out) / "near_duplicates.png", dataset, ev["indices"], train, sims, where
        )
        res["pairs_png"] = "near_duplicates.png"
    return res


# ---- the report -------------------------------------------------------------------------------------


def write_quality_report(results: dict, out: Path) -> Path:
    """quality.md (tables) and the plots quality_blur.png, quality_rerank.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns, blurs = results["N"], results["blur"]
    radii = [f"{r:g}" for r in blurs]

    def is_cell(v):
        return "n/a" if v is None else f"{v[0]:.2f} ± {v[1]:.2f}"

    lines = [
        "# Image quality: FID, IS and CLIP score",
        "",
        f"Run `{results['run']}`, {results['captions']:,} captions of {results['data']} "
        f"({results['image_size']} px; {results['skipped_items']} unreadable items skipped). "
        f"Extractor `{results['extractor']}` ({results['extractor_kind']}), sha256 `{results['extractor_sha256']}`: "
        "FID and IS are comparable only with figures from the same extractor.",
        "",
        "FID against the real images (both sides blurred by the radius, px); N: each caption's image is the "
        "best by CLIP of its first N draws (N = 1: no reranking).",
        "",
        "| N | " + " | ".join(f"FID, blur {r}" for r in radii) + " |",
        "|---:|" + "---:|" * len(radii),
        *(f"| {n} | " + " | ".join(f"{results['fid'][str(n)][r]:.3f}" for r in radii) + " |" for n in ns),
        "",
        "Inception score (mean ± std over splits) with the extractor's classes:",
        "",
        "| images | " + " | ".join(f"IS, blur {r}" for r in radii) + " |",
        "|---|" + "---:|" * len(radii),
        "| real | " + " | ".join(is_cell(results["is_real"][r]) for r in radii) + " |",
        *(f"| N = {n} | " + " | ".join(is_cell(results["is"][str(n)][r]) for r in radii) + " |" for n in ns),
    ]
    if "clip_score" in results:
        lines += [
            "",
            f"CLIP score (100 x cosine similarity of image and caption, `{results['clip']}`): real images "
            f"{results['clip_score_real']:.2f}; "
            + ", ".join(f"N = {n}: {results['clip_score'][str(n)]:.2f}" for n in ns)
            + ".",
        ]
    nd = results.get("near_duplicates")
    if nd:
        without = f"{nd['fid_without']:.3f}" if nd.get("fid_without") is not None else "n/a"
        lines += [
            "",
            f"Near duplicates: {nd['count']} of {results['captions']} evaluation images ({nd['share']:.1%}) have a "
            f"training image (of the first {nd['train_images']:,} of {nd['train_data']}) at cosine similarity >= "
            f"{nd['threshold']} of their features; median nearest similarity "
            f"{nd['similarity_quantiles']['0.5']:.3f}. FID (N = {nd['N']}, blur 0) with them "
            f"{nd['fid_with']:.3f}, without them (those captions left out on both sides) {without}.",
        ]
    md = out / "quality.md"
    atomic_write(md, lambda p: p.write_text("\n".join(lines) + "\n"))

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for n in sorted({ns[0], ns[-1]}):
        axes[0].plot(blurs, [results["fid"][str(n)][r] for r in radii], marker="o", label=f"N = {n}")
        scores = [results["is"][str(n)][r] for r in radii]
        if all(s is not None for s in scores):
            axes[1].plot(blurs, [s[0] for s in scores], marker="o", label=f"N = {n}")
    real_is = [results["is_real"][r] for r in radii]
    if all(s is not None for s in real_is):
        axes[1].plot(blurs, [s[0] for s in real_is], "k--", marker=".", label="real")
    for ax, name in zip(axes, ("FID", "IS"), strict=True):
        ax.set_xlabel("blur radius (px)")
        ax.set_ylabel(name)
        ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(out / "quality_blur.png", lambda p: fig.savefig(p, dpi=100, format="png"))
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 3.6))
    ax.plot(ns, [results["fid"][str(n)][radii[0]] for n in ns], marker="o", label=f"FID (blur {radii[0]})")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("N draws reranked by CLIP (best kept)")
    ax.set_ylabel("FID")
    if "clip_score" in results:
        ax2 = ax.twinx()
        ax2.plot(ns, [results["clip_score"][str(n)] for n in ns], "g--", marker="s", label="CLIP score")
        ax2.set_ylabel("CLIP score", color="g")
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    atomic_write(out / "quality_rerank.png", lambda p: fig.savefig(p, dpi=100, format="png"))
    plt.close(fig)
    return md
