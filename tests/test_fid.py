"""FID, IS and the evaluation of image quality: the statistics against closed forms and torchmetrics, the
extractors' loading and refusals, the image convention (blur on both sides), the `fid` and `images`
commands (errors, skips, resuming) and the rerank curve."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from dalle_fast.errors import FieldError
from dalle_fast.evaluate import main
from dalle_fast.evaluation.extractors import Extractor, file_sha256, load_extractor
from dalle_fast.evaluation.image_sets import gaussian_blur, quantize
from dalle_fast.evaluation.quality import best_of_first
from dalle_fast.evaluation.statistics import (
    ClassStats,
    FeatureStats,
    fid,
    frechet_distance,
    inception_score_of,
    load_stats,
    save_stats,
)


def stats_of(x: torch.Tensor) -> FeatureStats:
    return FeatureStats(x.shape[1]).update(x)


def random_cov(d: int, g: torch.Generator, rank: int | None = None) -> torch.Tensor:
    a = torch.randn(d, rank or d, generator=g, dtype=torch.float64)
    return a @ a.T / d


# ---- statistics -------------------------------------------------------------------------------------


def test_fid_of_a_set_with_itself_is_zero_and_fid_is_symmetric():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(50, 6, generator=g), torch.randn(40, 6, generator=g) * 2 + 1
    assert fid(stats_of(x), stats_of(x)) == pytest.approx(0, abs=1e-9)
    assert fid(stats_of(x), stats_of(y)) == pytest.approx(fid(stats_of(y), stats_of(x)), rel=1e-9)
    assert fid(stats_of(x), stats_of(y)) > 1


@pytest.mark.parametrize("rank", [None, 2])
def test_frechet_distance_closed_forms(rank):
    """Covariances sharing eigenvectors: the distance is |mu1 - mu2|^2 + sum (sqrt(a_i) - sqrt(b_i))^2,
    also when one is rank-deficient (eigenvalues 0)."""
    g = torch.Generator().manual_seed(1)
    d = 5
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    a = torch.rand(d, generator=g, dtype=torch.float64) * 3
    if rank is not None:
        a[rank:] = 0
    b = torch.rand(d, generator=g, dtype=torch.float64) + 0.5
    mu1, mu2 = torch.randn(d, generator=g, dtype=torch.float64), torch.randn(d, generator=g, dtype=torch.float64)
    want = float((mu1 - mu2).square().sum() + (a.sqrt() - b.sqrt()).square().sum())
    got = frechet_distance(mu1, q @ torch.diag(a) @ q.T, mu2, q @ torch.diag(b) @ q.T)
    assert got == pytest.approx(want, rel=1e-6)
    # 1-D Gaussians N(m, s^2): (m1 - m2)^2 + (s1 - s2)^2.
    one = frechet_distance(torch.tensor([1.0]), torch.tensor([[4.0]]), torch.tensor([-2.0]), torch.tensor([[9.0]]))
    assert one == pytest.approx(9 + 1, rel=1e-6)


def test_frechet_distance_matches_a_reference_for_general_covariances():
    """Against tr(sqrtm(C1 C2)) from the eigenvalues of the (non-symmetric) product, as torchmetrics computes it."""
    g = torch.Generator().manual_seed(2)
    c1, c2 = random_cov(6, g), random_cov(6, g)
    mu1, mu2 = torch.zeros(6, dtype=torch.float64), torch.ones(6, dtype=torch.float64)
    ref = 6 + c1.trace() + c2.trace() - 2 * torch.linalg.eigvals(c1 @ c2).sqrt().real.sum()
    assert frechet_distance(mu1, c1, mu2, c2) == pytest.approx(float(ref), rel=1e-6)


def test_streaming_statistics_equal_one_pass_and_subtract():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(37, 4, generator=g, dtype=torch.float64) * 5 + 100  # a large mean: float64 sums hold it
    s = FeatureStats(4)
    for i in range(0, 37, 8):
        s.update(x[i : i + 8])
    torch.testing.assert_close(s.mean(), x.mean(0))
    torch.testing.assert_close(s.cov(), torch.from_numpy(np.cov(x.numpy(), rowvar=False)))
    rest = s - stats_of(x[:10])
    torch.testing.assert_close(rest.cov(), stats_of(x[10:]).cov())
    assert rest.n == 27


def test_rank_deficient_covariances_stay_finite():
    """Fewer images than feature dimensions: singular covariances, a finite distance, 0 against itself."""
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(5, 64, generator=g), torch.randn(7, 64, generator=g) + 0.5
    d = fid(stats_of(x), stats_of(y))
    assert math.isfinite(d) and d > 0
    assert fid(stats_of(x), stats_of(x)) == pytest.approx(0, abs=1e-6)


def test_inception_score_of_known_class_distributions():
    k = 4
    # Confident and evenly spread over k classes: IS = k. One class for all: 1. Uniform predictions: 1.
    assert inception_score_of(torch.eye(k).repeat(5, 1)) == pytest.approx(k, rel=1e-9)
    assert inception_score_of(torch.eye(k)[[0] * 8]) == pytest.approx(1, rel=1e-9)
    assert inception_score_of(torch.full((6, k), 1 / k)) == pytest.approx(1, rel=1e-9)
    # Two classes, p(y|x) = (0.9, 0.1) or (0.1, 0.9) half each: exp(KL((0.9, 0.1) || (0.5, 0.5))).
    p = torch.tensor([[0.9, 0.1], [0.1, 0.9]]).repeat(3, 1)
    want = math.exp(0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5))
    assert inception_score_of(p) == pytest.approx(want, rel=1e-9)
    # Splits: image i in split i mod s; each split here sees both classes alike, so every split agrees.
    mean, std = ClassStats(2, splits=3).update(p.log()).inception_score()
    assert mean == pytest.approx(want, rel=1e-9) and std == pytest.approx(0, abs=1e-12)


def test_statistics_save_and_load(tmp_path):
    g = torch.Generator().manual_seed(5)
    f = stats_of(torch.randn(9, 3, generator=g))
    c = ClassStats(3, 2).update(torch.randn(9, 3, generator=g))
    save_stats(tmp_path / "s.safetensors", {"N1/features@0": f, "N1/classes@0": c}, {"key": {"a": 1}})
    named, meta = load_stats(tmp_path / "s.safetensors")
    assert meta == {"key": {"a": 1}} and named["N1/features@0"].n == 9
    torch.testing.assert_close(named["N1/features@0"].cov(), f.cov())
    assert named["N1/classes@0"].inception_score() == pytest.approx(c.inception_score())
    (tmp_path / "bad.safetensors").write_bytes(b"not a file of statistics")
    with pytest.raises(ValueError, match="not a statistics file"):
        load_stats(tmp_path / "bad.safetensors")


class MeanColour(torch.nn.Module):
    """A small feature module: a fixed random conv, then mean and max pooling (any image size)."""

    def __init__(self, dim: int = 8):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, dim // 2, 3)
        torch.nn.init.normal_(self.conv.weight, generator=torch.Generator().manual_seed(0))

    def forward(self, x):
        h = self.conv(x)
        return torch.cat([h.mean((2, 3)), h.amax((2, 3))], 1)


def test_fid_equals_torchmetrics_with_the_same_feature_module():
    tm = pytest.importorskip("torchmetrics.image.fid")
    g = torch.Generator().manual_seed(6)
    a = torch.randint(0, 256, (30, 3, 12, 12), generator=g, dtype=torch.uint8)
    b = (a.float() * 0.7 + 20).round().to(torch.uint8)
    module = MeanColour().eval()
    metric = tm.FrechetInceptionDistance(feature=module, normalize=True, input_img_size=(3, 12, 12))
    metric.update(a.float() / 255, real=True)
    metric.update(b.float() / 255, real=False)
    ext = Extractor(module, "test", "torchscript", "0" * 64)
    ours = fid(FeatureStats(8).update(ext(a)[0]), FeatureStats(8).update(ext(b)[0]))
    assert ours == pytest.approx(float(metric.compute()), rel=1e-4)


# ---- extractors -------------------------------------------------------------------------------------


def save_torchscript(module, path, size=12):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.trace(module.eval(), torch.rand(1, 3, size, size)).save(str(path))
    return path


def test_torchscript_extractor_and_its_refusals(tmp_path):
    path = save_torchscript(MeanColour(), tmp_path / "ext.pt")
    ext = load_extractor(str(path))
    feats, logits = ext(torch.randint(0, 256, (3, 3, 20, 20), dtype=torch.uint8))
    assert feats.shape == (3, 8) and logits is None and ext.sha256 == file_sha256(path)
    assert ext.identity()["extractor_sha256"] == ext.sha256
    with pytest.raises(FieldError, match="extractor_sha256: .* expected 0000") as e:
        load_extractor(str(path), expected_sha256="0" * 64)
    assert e.value.field == "extractor_sha256"
    assert load_extractor(str(path), expected_sha256=ext.sha256.upper()).sha256 == ext.sha256
    with pytest.raises(FieldError, match="no such file"):
        load_extractor(str(tmp_path / "missing.pt"))
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(FieldError, match="not a TorchScript file"):
        load_extractor(str(tmp_path / "junk.pt"))
    with pytest.raises(FieldError, match="required"):
        load_extractor("")

    class Wrong(torch.nn.Module):
        def forward(self, x):
            return x.mean(1)  # (B, H, W): not features

    wrong = load_extractor(str(save_torchscript(Wrong(), tmp_path / "wrong.pt")))
    with pytest.raises(FieldError, match=r"must return features \[B, D\]"):
        wrong(torch.zeros(2, 3, 12, 12, dtype=torch.uint8))


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    """A random-weight standard InceptionV3 (torch-fidelity's) saved as its weights file is saved."""
    fe = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3")
    mp = pytest.MonkeyPatch()
    # Built without its download: the loader of the URL weights returns nothing and loading is skipped.
    mp.setattr(fe, "load_state_dict_from_url", lambda *a, **k: {})
    mp.setattr(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, *a, **k: None)
    model = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    mp.undo()
    path = tmp_path_factory.mktemp("inception") / "random-inception.pth"
    torch.save(model.state_dict(), path)
    return path


def test_a_random_inception_loads_like_real_weights(inception_weights, tmp_path):
    ext = load_extractor(f"inception:{inception_weights}")
    assert ext.kind == "inception" and ext.sha256 == file_sha256(inception_weights)
    feats, logits = ext(torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8))
    assert feats.shape == (2, 2048) and logits.shape == (2, 1008) and torch.isfinite(feats).all()
    # A name with a hash prefix (as torch hub names the real file) must match the content.
    renamed = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
    renamed.write_bytes(inception_weights.read_bytes())
    with pytest.raises(FieldError, match="altered or truncated"):
        load_extractor(f"inception:{renamed}")
    # Not a weights file: said so, nothing unpickled.
    (tmp_path / "x.pth").write_bytes(b"\x80\x04junk")
    with pytest.raises(FieldError, match="not a torch-fidelity InceptionV3 weights file"):
        load_extractor(f"inception:{tmp_path / 'x.pth'}")
    torch.save({"fc.weight": torch.zeros(3)}, tmp_path / "small.pth")
    with pytest.raises(FieldError, match="not InceptionV3 weights"):
        load_extractor(f"inception:{tmp_path / 'small.pth'}")


# ---- the image convention and the fid command --------------------------------------------------------


def test_quantize_and_blur():
    x = torch.rand(2, 3, 10, 10)
    q = quantize(x)
    assert q.dtype == torch.uint8 and torch.equal(q, (x * 255).round().byte())
    assert torch.equal(gaussian_blur(q, 0), q)
    flat = torch.full((1, 3, 9, 9), 77, dtype=torch.uint8)
    assert torch.equal(gaussian_blur(flat, 2), flat)
    soft = gaussian_blur(q, 1).float()
    assert soft.diff(dim=-1).abs().mean() < q.float().diff(dim=-1).abs().mean()
    assert gaussian_blur(q, 8).shape == q.shape  # taps wider than the image: edges replicated
    with pytest.raises(ValueError, match="radius"):
        gaussian_blur(q, -1)


def write_images(folder, images):
    folder.mkdir(parents=True, exist_ok=True)
    for i, x in enumerate(images):
        Image.fromarray(x.permute(1, 2, 0).numpy()).save(folder / f"{i:03d}.png")
    return folder


def run_cli(capsys, args):
    code = main([str(a) for a in args])
    out = capsys.readouterr().out.strip().splitlines()
    return code, json.loads(out[-1])


@pytest.fixture
def folders(tmp_path):
    g = torch.Generator().manual_seed(7)
    a = torch.randint(0, 256, (12, 3, 12, 12), generator=g, dtype=torch.uint8)
    b = (a.float() * 0.5 + 60).round().to(torch.uint8)
    ext = save_torchscript(MeanColour(), tmp_path / "ext.pt")
    return write_images(tmp_path / "a", a), write_images(tmp_path / "b", b), ext, a, b


def test_fid_command(folders, capsys, tmp_path):
    a_dir, b_dir, ext, a, b = folders
    code, res = run_cli(capsys, ["fid", a_dir, b_dir, "--extractor", ext, "--threads", "1"])
    want = fid(*(stats_of(Extractor(torch.jit.load(str(ext)), "", "", "")(x)[0]) for x in (a, b)))
    assert code == 0 and res["fid"] == pytest.approx(want, rel=1e-3) and res["images_a"] == 12
    assert res["extractor_sha256"] == file_sha256(ext)
    _, same = run_cli(capsys, ["fid", a_dir, a_dir, "--extractor", ext])
    assert same["fid"] == 0


def test_the_blur_sweep_blurs_both_sides(folders, capsys, tmp_path):
    """FID at radius r equals FID at radius 0 between the two folders blurred beforehand."""
    a_dir, b_dir, ext, a, b = folders
    _, res = run_cli(capsys, ["fid", a_dir, b_dir, "--extractor", ext, "--blur", "0,2"])
    pre_a, pre_b = (
        write_images(tmp_path / "a2", gaussian_blur(a, 2)),
        write_images(tmp_path / "b2", gaussian_blur(b, 2)),
    )
    _, pre = run_cli(capsys, ["fid", pre_a, pre_b, "--extractor", ext])
    assert res["fid_blur"]["2"] == pytest.approx(pre["fid"], rel=1e-6, abs=1e-4)
    assert res["fid_blur"]["2"] != pytest.approx(res["fid_blur"]["0"], rel=1e-3)


def test_unreadable_and_mixed_sizes(folders, capsys, tmp_path):
    a_dir, b_dir, ext, _, _ = folders
    (a_dir / "broken.png").write_bytes(b"not an image")
    _, res = run_cli(capsys, ["fid", a_dir, b_dir, "--extractor", ext])
    assert res["skipped_a"] == 1 and res["images_a"] == 12 and res["skipped_a_first"][0].endswith("broken.png")
    Image.new("RGB", (20, 16)).save(b_dir / "wide.png")
    with pytest.raises(SystemExit) as e:
        main(["fid", str(a_dir), str(b_dir), "--extractor", str(ext)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "mixed sizes" in err and "wide.png" in err and "Traceback" not in err
    _, res = run_cli(capsys, ["fid", a_dir, b_dir, "--extractor", ext, "--size", "12"])
    assert res["images_b"] == 13 and res["size_b"] == [12, 12]


@pytest.mark.parametrize(
    "args, message",
    [
        (["fid", "{tmp}/empty", "{tmp}/empty", "--extractor", "{ext}"], "holds no images"),
        (["fid", "{tmp}/nowhere", "--extractor", "{ext}"], "folders: {tmp}/nowhere is not a folder"),
        (["fid", "{tmp}/a", "{tmp}/a", "{tmp}/a", "--extractor", "{ext}"], "give one folder"),
        (["fid", "{tmp}/a", "{tmp}/b"], "--extractor: required"),
        (["fid", "{tmp}/a", "{tmp}/b", "--extractor", "{tmp}/none.pt"], "no such file"),
        (["fid", "{tmp}/a", "{tmp}/b", "--extractor", "{ext}", "--extractor-sha256", "ab"], "expected ab"),
        (["fid", "{tmp}/a", "{tmp}/b", "--extractor", "{ext}", "--blur", "-1"], "--blur: must be a comma list"),
        (["fid", "{tmp}/junk", "{tmp}/b", "--extractor", "{ext}"], "none of the 2 images"),
        (["images"], "--run: required"),
        (["images", "--run", "{tmp}/x"], "not a run directory"),
        (["images", "--run", "{tmp}/x", "--rerank", "0,2"], "--rerank: must be a comma list of numbers >= 1"),
    ],
)
def test_cli_errors(folders, tmp_path, capsys, args, message):
    ext = folders[2]
    (tmp_path / "empty").mkdir()
    (tmp_path / "junk").mkdir()
    for name in ("x.png", "y.jpg"):
        (tmp_path / "junk" / name).write_bytes(b"junk")
    with pytest.raises(SystemExit) as e:
        main([a.format(tmp=tmp_path, ext=ext) for a in args])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message.format(tmp=tmp_path) in err and "Traceback" not in err


def test_inception_score_of_one_folder(folders, capsys, tmp_path):
    class WithClasses(torch.nn.Module):
        def forward(self, x):
            m = x.mean((2, 3))  # (B, 3): the colour means as features and as logits of 3 classes
            return m, 20 * m

    ext = save_torchscript(WithClasses(), tmp_path / "classes.pt")
    _, res = run_cli(capsys, ["fid", folders[0], "--extractor", ext, "--splits", "2"])
    assert "fid" not in res and 1 <= res["is_a"] <= 3 and res["is_a_std"] >= 0


# ---- the rerank curve and the images command ------------------------------------------------------


def test_the_rerank_curve_keeps_the_best_of_the_first_n_draws():
    scores = torch.tensor([[0.1, 0.5, 0.2, 0.9], [0.8, 0.1, 0.3, 0.2], [0.0, 0.0, 0.7, 0.1]])
    picks = best_of_first(scores, [1, 2, 4])
    assert picks[1].tolist() == [0, 0, 0]
    assert picks[2].tolist() == [1, 0, 0]
    assert picks[4].tolist() == [3, 0, 2]


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory, train_micro_runs):
    return train_micro_runs(tmp_path_factory.mktemp("fid_runs"))


def test_images_command_reports_and_resumes(micro_run, tmp_path, capsys):
    args = ["images", "--run", micro_run / "dalle", "--n", "6", "--rerank", "1,2", "--blur", "0,1",
            "--out", tmp_path / "eval", "--cache", tmp_path / "cache", "--extractor-steps", "2",
            "--train-n", "8", "--chunk", "4", "--batch-size", "8", "--threads", "1", "--device", "cpu"]  # fmt: skip
    assert main([str(a) for a in args]) == 0
    capsys.readouterr()
    out = tmp_path / "eval"
    res = json.loads((out / "quality.json").read_text())
    assert res["captions"] == 6 and res["N"] == [1, 2] and set(res["fid"]["2"]) == {"0", "1"}
    assert res["extractor"] == "shapes" and len(res["extractor_sha256"]) == 64
    assert all(math.isfinite(v) for row in res["fid"].values() for v in row.values())
    assert set(res["clip_score"]) == {"1", "2"} and res["clip_score"]["2"] >= res["clip_score"]["1"] - 1e-9
    assert res["near_duplicates"]["train_images"] == 8 and "fid_with" in res["near_duplicates"]
    for name in ("quality.md", "quality_blur.png", "quality_rerank.png", "near_duplicates.png"):
        assert (out / name).stat().st_size > 0
    chunks = sorted(p.name for p in (out / "samples").glob("chunk_*"))
    assert chunks == [f"chunk_{k:05d}.safetensors" for k in range(3)]  # 6 captions, 4 images a chunk, 2 draws
    assert res["real_stats_cached_for_blur"] == []
    # Stopped part-way: the statistics lost and a chunk missing. The run continues and agrees.
    (out / "stats_generated.safetensors").unlink()
    (out / "samples" / "chunk_00001.safetensors").unlink()
    assert main([str(a) for a in args]) == 0
    again = json.loads((out / "quality.json").read_text())
    assert again["real_stats_cached_for_blur"] == [0, 1]
    for n in ("1", "2"):
        for r in ("0", "1"):
            assert again["fid"][n][r] == pytest.approx(res["fid"][n][r], rel=1e-6)
    # Other sampling settings in the same folder: refused, naming the flag.
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args[:6] + ["1,4"] + args[7:]])
    assert e.value.code == 2 and "--out:" in capsys.readouterr().err
