"""Caption fidelity on the built-in shapes data (python -m dalle_fast.evaluate --run runs/shapes/dalle).

An attribute classifier, trained on the dataset's own rendered images (every colour-shape pair, the
held-out ones included: it is the judge, not the model), predicts for each colour whether an object of
it is present, its shape and its centre (one shape per colour: a scene with two objects of one colour
can be judged only by one of them, a known limit). Its accuracy on fresh real images is reported. A
sample MATCHES its caption when every colour-shape pair the caption names is detected; it matches WITH
POSITION when, for two-object captions, the detected centres also stand in the caption's relation.

For captions of held-out pairs (zero-shot composition) and of seen pairs it reports the fidelity of a
plain sample (the mean over all draws) and of the CLIP-reranked best of N draws for N = 1, 2, 4, ...,
the paper's curve of diminishing returns; as a markdown table (fidelity.md) and a PNG plot (fidelity.png).
Above them, the ceiling: the judge on real images of each split and on the dVAE's reconstructions of
them, the most a sampler drawing through that dVAE could score.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from dalle_fast.data.shapes import COLORS, RELATIONS, SHAPES, ShapesDataset
from dalle_fast.errors import FieldError, check_finite, field_errors
from dalle_fast.models.judge import AttributeClassifier
from dalle_fast.ops.device import parse_device
from dalle_fast.runs.checkpoint import load_config
from dalle_fast.runs.load import load_transformer
from dalle_fast.sampling.rerank import find_scorer
from dalle_fast.sampling.sample import generate, sampling_device

COLOR_NAMES = list(COLORS)
CEILING_IMAGES = 256  # real images per set for the ceiling (the judge on them and on their reconstructions)


def scene_targets(scene: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(presence (C,), shape index (C,) (-100 where absent), centres (C, 2)) of a ShapesDataset scene."""
    present, shape = torch.zeros(len(COLORS)), torch.full((len(COLORS),), -100, dtype=torch.long)
    centres = torch.zeros(len(COLORS), 2)
    for o in scene["objects"]:
        i = COLOR_NAMES.index(o["color"])
        present[i] = 1
        shape[i] = SHAPES.index(o["shape"])
        centres[i] = torch.tensor(o["center"])
    return present, shape, centres


def detected_pairs(presence: torch.Tensor, shape_logits: torch.Tensor) -> list[set]:
    """The (colour, shape) pairs the classifier sees in each image."""
    shapes = shape_logits.argmax(-1)
    return [
        {(COLOR_NAMES[c], SHAPES[int(shapes[b, c])]) for c in range(len(COLORS)) if presence[b, c] > 0}
        for b in range(len(presence))
    ]


def _render(ds: ShapesDataset, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    items = [(ds[i][0], *scene_targets(ds.scene(i))) for i in range(n)]
    return tuple(torch.stack(x) for x in zip(*items, strict=True))


def _blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-image separable Gaussian blur (5 taps, edges replicated); sigma (B,) in pixels."""
    B, C, H, W = x.shape
    t = torch.arange(-2, 3, dtype=x.dtype)
    w = torch.exp(-(t**2) / (2 * sigma.clamp(min=1e-3)[:, None] ** 2))
    w = (w / w.sum(1, keepdim=True)).repeat_interleave(C, 0)  # (B * C, 5)
    y = x.reshape(1, B * C, H, W)
    y = F.conv2d(F.pad(y, (2, 2, 0, 0), mode="replicate"), w[:, None, None, :], groups=B * C)
    y = F.conv2d(F.pad(y, (0, 0, 2, 2), mode="replicate"), w[:, None, :, None], groups=B * C)
    return y.view(B, C, H, W)


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Soft edges and faint noise, as a decoder draws them: three images in four blurred (sigma up to 1
    px), every image with pixel noise of std up to 0.02. Without it the judge, trained on crisp renders,
    missed shapes in the dVAE's own reconstructions of real images far more often (docs/evaluation.md)."""
    sigma = torch.rand(len(x), generator=g)
    x = torch.where((sigma > 0.25)[:, None, None, None], _blur(x, sigma), x)
    noise = torch.randn(x.shape, generator=g) * 0.02 * torch.rand(len(x), 1, 1, 1, generator=g)
    return (x + noise).clamp(0, 1)


def train_classifier(image_size: int = 32, items: int = 8000, steps: int = 1200, seed: int = 0) -> dict:
    """Trains the judge on rendered train + held-out-pair images (augmented: `_augment`); returns
    {"model", "accuracy"} where accuracy is how often it names exactly the colour-shape pairs of fresh
    images of both splits."""
    torch.manual_seed(seed)
    parts = [_render(ShapesDataset(s, items // 2, image_size, seed + 11), items // 2) for s in ("train", "heldout")]
    x, present, shape, centres = (torch.cat(t) for t in zip(*parts, strict=True))
    model = AttributeClassifier(len(COLORS), len(SHAPES))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        idx = torch.randint(0, len(x), (64,), generator=g)
        logits, shape_logits, pos = model(_augment(x[idx], g))
        loss = F.binary_cross_entropy_with_logits(logits, present[idx])
        loss = loss + F.cross_entropy(shape_logits.flatten(0, 1), shape[idx].flatten(), ignore_index=-100)
        mask = present[idx].unsqueeze(-1)
        loss = loss + 10 * ((pos - centres[idx]) ** 2 * mask).sum() / mask.sum().clamp(min=1)
        for group in opt.param_groups:
            group["lr"] = 2e-3 * (1 - step / steps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    tests = [_render(ShapesDataset(s, 200, image_size, seed + 12), 200) for s in ("val", "heldout")]
    tx, tp, ts, _ = (torch.cat(t) for t in zip(*tests, strict=True))
    with torch.no_grad():
        presence, shape_logits, _ = model(tx)
    want = detected_pairs(tp * 2 - 1, F.one_hot(ts.clamp(min=0), len(SHAPES)).float())
    acc = sum(a == b for a, b in zip(detected_pairs(presence, shape_logits), want, strict=True)) / len(want)
    return {"model": model, "accuracy": acc}


@torch.no_grad()
def caption_match(model: AttributeClassifier, images: torch.Tensor, scenes: list[dict]) -> dict[str, torch.Tensor]:
    """Per image: "pairs" (every colour-shape pair of its caption detected) and "position" (that, and for
    two objects the detected centres in the caption's relation), as bool tensors (B,)."""
    presence, shape_logits, centres = model(images)
    seen = detected_pairs(presence, shape_logits)
    pairs_ok, pos_ok = [], []
    for b, sc in enumerate(scenes):
        idx = [COLOR_NAMES.index(o["color"]) for o in sc["objects"]]
        ok = all((o["color"], o["shape"]) in seen[b] for o in sc["objects"])
        pos = ok
        if ok and sc["relation"] is not None and idx[0] != idx[1]:
            (dx, dy), _ = RELATIONS[sc["relation"]]
            d = centres[b, idx[0]] - centres[b, idx[1]]  # first object relative to the second
            pos = bool(d[0] * dx + d[1] * dy > 0.05)
        pairs_ok.append(ok)
        pos_ok.append(pos)
    return {"pairs": torch.tensor(pairs_ok), "position": torch.tensor(pos_ok)}


def dvae_ceiling(judge: AttributeClassifier, dvae, split: str, seed: int = 0) -> dict[str, float]:
    """What a dVAE lets any sampler reach on a split ("heldout" or "val"): {"real": the judge's caption
    match on CEILING_IMAGES real images, "recon": on the dVAE's reconstructions of the same images}."""
    real = ShapesDataset(split, CEILING_IMAGES, dvae.cfg.image_size, seed + 9)
    x, scenes = _render(real, len(real))[0], [real.scene(i) for i in range(len(real))]
    with torch.no_grad():
        recon = dvae.decode(dvae.encode(x))
    return {
        "real": float(caption_match(judge, x, scenes)["pairs"].float().mean()),
        "recon": float(caption_match(judge, recon, scenes)["pairs"].float().mean()),
    }


@dataclass
class EvaluateConfig:
    """Caption fidelity of a stage-2 run on the shapes data, with and without CLIP reranking."""

    run: str = field(default="", metadata={"help": "the stage-2 run directory"})
    clip: str = field(default="", metadata={"help": "CLIP run for reranking; empty: RUN/../clip (none: no reranking)"})
    captions: int = field(default=32, metadata={"help": "captions per set (held-out pairs, seen pairs)"})
    draws: int = field(default=32, metadata={"help": "samples per caption (the largest N of the curve)"})
    top_k: int = field(default=0, metadata={"help": "top-k of the sampling; 0: all"})
    guidance: float = field(default=1.0, metadata={"help": "classifier-free guidance scale of the sampling; 1: none"})
    classifier_steps: int = field(default=1200, metadata={"help": "updates of the attribute classifier"})
    out: str = field(default="", metadata={"help": "output folder; empty: RUN/eval"})
    batch_size: int = field(default=64, metadata={"help": "images sampled at once"})
    seed: int = field(default=0, metadata={"help": "seed of the captions, the classifier and the sampling"})
    threads: int = field(default=0, metadata={"help": "torch CPU threads; 0: torch's default"})
    device: str = field(
        default="auto",
        metadata={"help": "where to sample: auto (the GPU when the model runs there) | cpu | cuda | cuda:N"},
    )

    def __post_init__(self):
        check_finite(self)
        if not self.run:
            raise FieldError("run", "required: the stage-2 run directory")
        for name in ("captions", "draws", "classifier_steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.threads < 0:
            raise FieldError("threads", f"must be >= 0 (0: torch's default), got {self.threads}")
        if not self.guidance >= 1:
            raise ValueError(f"guidance must be >= 1 (1: none), got {self.guidance}")
        parse_device(self.device)


def evaluate(cfg: EvaluateConfig) -> dict:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    with field_errors("run"):
        data = load_config(cfg.run).get("train", {}).get("data", "shapes")
        if data != "shapes":  # the judge knows only the built-in scenes
            raise ValueError(
                f"{cfg.run} was trained on {data}; caption fidelity here is judged on the built-in shapes data "
                "only. For other data, the reranker's held-out retrieval (python -m dalle_fast.train clip "
                "prints it) measures how well images and captions match"
            )
        model, tok, dvae = load_transformer(cfg.run)
    device = sampling_device(cfg.device, model)  # the sampling only: the classifier is small
    model.to(device)
    if dvae.cfg.image_size < 8:
        raise FieldError("run", f"its dVAE's images are {dvae.cfg.image_size} px; the classifier needs >= 8")
    scorer, _ = find_scorer(cfg.run, cfg.clip)
    print("training the attribute classifier", file=sys.stderr)
    judge = train_classifier(dvae.cfg.image_size, steps=cfg.classifier_steps, seed=cfg.seed)
    ns = [n for n in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512) if n <= cfg.draws]
    results: dict = {"classifier_accuracy": judge["accuracy"], "N": ns, "top_k": cfg.top_k, "guidance": cfg.guidance}
    g = torch.Generator(device).manual_seed(cfg.seed)
    for name, split in (("held-out pairs", "heldout"), ("seen pairs", "val")):
        # The ceiling: real images of the split, and the dVAE's reconstructions of them (no sampler can
        # beat what the dVAE can draw).
        ceiling = dvae_ceiling(judge["model"], dvae, split, cfg.seed)
        ds = ShapesDataset(split, cfg.captions, dvae.cfg.image_size, cfg.seed + 7)
        captions = [ds.captions(i)[0] for i in range(cfg.captions)]
        scenes = [ds.scene(i) for i in range(cfg.captions)]
        print(f"sampling {cfg.draws} images for each of {cfg.captions} captions of {name}", file=sys.stderr)
        out = generate(model, tok.encode(captions), dvae, draws=cfg.draws, batch_size=cfg.batch_size, generator=g,
                       top_k=cfg.top_k, guidance=cfg.guidance)  # fmt: skip
        images = out["images"].flatten(0, 1)
        match = caption_match(judge["model"], images, [s for s in scenes for _ in range(cfg.draws)])
        row = {k: float(v.float().mean()) for k, v in match.items()}  # a plain sample
        row.update(ceiling)
        if scorer is not None:
            scores = scorer.score(images, [c for c in captions for _ in range(cfg.draws)]).view(cfg.captions, -1)
            for k, v in match.items():
                v = v.view(cfg.captions, -1)
                # The best of the first n draws by CLIP, for each n of the curve.
                row[f"rerank_{k}"] = [
                    float(v[torch.arange(cfg.captions), scores[:, :n].argmax(1)].float().mean()) for n in ns
                ]
        results[name] = row
    return results


def write_report(results: dict, out: Path) -> tuple[Path, Path]:
    """fidelity.md (a table) and fidelity.png (fidelity against N)."""
    out.mkdir(parents=True, exist_ok=True)
    ns = results["N"]
    sets = [k for k in ("held-out pairs", "seen pairs") if k in results]
    lines: list[str] = [
        "# Caption fidelity (attribute classifier)",
        "",
        f"Classifier exact-set accuracy on fresh real images: {results['classifier_accuracy']:.1%}.",
        "",
        "Ceiling (colour + shape, 256 real images per set): the judge on the real images, and on the dVAE's",
        "reconstructions of them (argmax codes): what a sampler that predicted every token right would score.",
        "",
        "| captions | real images | dVAE reconstructions |",
        "|---|---:|---:|",
        *(f"| {s} | {results[s]['real']:.1%} | {results[s]['recon']:.1%} |" for s in sets),
        "",
        f"Samples (top-k {results.get('top_k', 0) or 'off'}, guidance {results.get('guidance', 1.0):g}):",
        "",
    ]
    reranked = any("rerank_pairs" in results[s] for s in sets)
    shown = ns if reranked else []  # no reranker: the plain column only
    lines += [
        "| " + " | ".join(["captions", "check", "no reranking", *(f"rerank N={n}" for n in shown)]) + " |",
        "|---|---|---:|" + "---:|" * len(shown),
    ]
    for s in sets:
        for k, label in (("pairs", "colour + shape"), ("position", "colour + shape + position")):
            rr = results[s].get(f"rerank_{k}", [float("nan")] * len(shown))
            lines.append("| " + " | ".join([s, label, *(f"{v:.1%}" for v in [results[s][k], *rr])]) + " |")
    if not reranked:
        lines += ["", "No reranker (none given, none beside the run): samples are not reranked."]
    md = out / "fidelity.md"
    md.write_text("\n".join(lines) + "\n")
    png = out / "fidelity.png"
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for s in sets:
        for k, style in (("pairs", "-"), ("position", "--")):
            if f"rerank_{k}" in results[s]:
                ax.plot(ns, results[s][f"rerank_{k}"], style, marker="o", label=f"{s}, {k}")
            else:  # no reranker: the plain samples' level
                ax.axhline(results[s][k], linestyle=style, color="C0" if s == "held-out pairs" else "C1",
                           label=f"{s}, {k} (no reranking)")  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.set_xlabel("N samples reranked by CLIP (best kept)")
    ax.set_ylabel("fidelity")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return md, png
