"""Caption fidelity: the classifier's targets and decisions, the report, and the CLI's errors."""

import pytest
import torch

from dalle_fast.data.shapes import COLORS, SHAPES, ShapesDataset
from dalle_fast.errors import FieldError
from dalle_fast.evaluate import main
from dalle_fast.evaluation.fidelity import _augment, _blur, caption_match, detected_pairs, scene_targets, write_report
from dalle_fast.models.judge import AttributeClassifier


def test_targets_and_detection_round_trip():
    ds = ShapesDataset("heldout", 20, 32)
    for sc in distinct_colours(ds):
        present, shape, _ = scene_targets(sc)
        logits = torch.nn.functional.one_hot(shape.clamp(min=0), len(SHAPES)).float()
        (seen,) = detected_pairs((present * 2 - 1)[None], logits[None])
        assert seen == {(o["color"], o["shape"]) for o in sc["objects"]}


def distinct_colours(ds):
    """Scenes whose objects differ in colour (the classifier has one shape per colour: see its docstring)."""
    scenes = [ds.scene(i) for i in range(len(ds))]
    return [sc for sc in scenes if len({o["color"] for o in sc["objects"]}) == len(sc["objects"])]


class Oracle(AttributeClassifier):
    """Answers from known scenes (one per image, in order): what a perfect classifier would say."""

    def __init__(self, scenes, shift=(0.0, 0.0)):
        super().__init__(len(COLORS), len(SHAPES), width=4)
        self.scenes, self.shift = scenes, torch.tensor(shift)

    def forward(self, images):
        t = [scene_targets(sc) for sc in self.scenes]
        present = torch.stack([p for p, _, _ in t]) * 2 - 1
        shapes = torch.nn.functional.one_hot(torch.stack([s for _, s, _ in t]).clamp(min=0), len(SHAPES)).float()
        return present, shapes, torch.stack([c for _, _, c in t]) + self.shift


def test_caption_match():
    scenes = distinct_colours(ShapesDataset("train", 60, 32))
    images = torch.zeros(len(scenes), 3, 32, 32)
    ok = caption_match(Oracle(scenes), images, scenes)
    assert ok["pairs"].all() and ok["position"].all()
    # Judged against other captions, most fail (a scene named by another scene's caption).
    wrong = caption_match(Oracle(scenes), images, scenes[1:] + scenes[:1])
    assert wrong["pairs"].float().mean() < 0.5
    # Relations: swapping the two objects' detected centres breaks "position" but not "pairs".
    two = [sc for sc in scenes if sc["relation"]]
    swapped = [
        {
            **sc,
            "objects": [{**a, "center": b["center"]} for a, b in zip(sc["objects"], sc["objects"][::-1], strict=True)],
        }
        for sc in two
    ]
    res = caption_match(Oracle(swapped), torch.zeros(len(two), 3, 32, 32), two)
    assert res["pairs"].all() and not res["position"].any()


def test_report(tmp_path):
    results = {"classifier_accuracy": 0.9, "N": [1, 2, 4]}
    for s in ("held-out pairs", "seen pairs"):
        results[s] = {"pairs": 0.5, "position": 0.3, "rerank_pairs": [0.5, 0.6, 0.7], "rerank_position": [0.3] * 3}
        results[s].update(real=0.9, recon=0.55 if s == "seen pairs" else 0.45)
    md, png = write_report(results, tmp_path)
    text = md.read_text()
    assert "| held-out pairs | colour + shape | 50.0% | 50.0% | 60.0% | 70.0% |" in text
    assert "| held-out pairs | 90.0% | 45.0% |" in text and "| seen pairs | 90.0% | 55.0% |" in text
    assert png.stat().st_size > 0


def test_report_without_a_reranker(tmp_path):
    """No reranker (--clip none, or none beside the run): the table has the plain column only, no NaN
    columns, and says why."""
    results = {"classifier_accuracy": 0.9, "N": [1, 2, 4]}
    for s in ("held-out pairs", "seen pairs"):
        results[s] = {"pairs": 0.25, "position": 0.125, "real": 0.9, "recon": 0.5}
    md, png = write_report(results, tmp_path)
    text = md.read_text()
    assert "| held-out pairs | colour + shape | 25.0% |\n" in text and "nan" not in text
    assert "rerank N=" not in text and "No reranker" in text and png.stat().st_size > 0


def test_clip_none_means_no_reranker(tmp_path):
    from dalle_fast.sampling.rerank import find_scorer

    assert find_scorer(tmp_path / "dalle", "none") == (None, "none")
    assert find_scorer(tmp_path / "dalle", "")[0] is None  # nothing beside the run: none either
    with pytest.raises(FieldError, match="clip"):
        find_scorer(tmp_path / "dalle", str(tmp_path / "missing"))


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "--run: required"),
        (["--run", "{tmp}/x"], "not a run directory"),
        (["--run", "{tmp}/x", "--device", "gpu"], "device must be auto, cpu, cuda or cuda:N, got 'gpu'"),
    ],
)
def test_cli_errors(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as e:
        main([a.format(tmp=tmp_path) for a in args])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and "Traceback" not in err


def test_blur_and_augment():
    x = torch.rand(3, 3, 12, 12)
    # A tiny sigma leaves the image as it is; a flat image stays flat; blurring lowers the variation.
    torch.testing.assert_close(_blur(x, torch.full((3,), 1e-3)), x)
    flat = torch.full((2, 3, 8, 8), 0.3)
    torch.testing.assert_close(_blur(flat, torch.tensor([0.5, 1.0])), flat)
    soft = _blur(x, torch.ones(3))
    assert soft.diff(dim=-1).abs().mean() < x.diff(dim=-1).abs().mean()
    # Each image gets its own sigma.
    one = _blur(x[1:2], torch.ones(1))
    torch.testing.assert_close(_blur(x, torch.tensor([1e-3, 1.0, 1e-3]))[1:2], one)
    y = _augment(x, torch.Generator().manual_seed(0))
    assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1 and not torch.equal(y, x)
    torch.testing.assert_close(y, _augment(x, torch.Generator().manual_seed(0)))
