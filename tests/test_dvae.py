"""The dVAE's pieces: phi, the logit-Laplace density, schedules, shapes of encode/decode, the loss."""

import math

import pytest
import torch

from dalle_fast.models.dvae import (
    DVAE,
    EPS,
    PRESETS,
    DVAEConfig,
    codebook_usage,
    logit_laplace_nll,
    logit_normal_nll,
    phi,
    phi_inv,
    psnr,
)
from dalle_fast.training.schedules import cosine_anneal, linear_ramp


def test_phi_round_trip_and_range():
    x = torch.rand(1000)
    y = phi(x)
    assert y.min() >= EPS and y.max() <= 1 - EPS
    torch.testing.assert_close(phi_inv(y), x)


@pytest.mark.parametrize("mu,ln_b", [(0.0, 0.0), (1.5, -1.0), (-2.0, 0.7)])
def test_logit_laplace_density_integrates_to_one(mu, ln_b):
    # Integrate over x in (0, 1) through x = sigmoid(y), dx = x (1 - x) dy, on a wide fine grid of y.
    y = torch.linspace(-30, 30, 400001, dtype=torch.float64)  # sigmoid(+-30) stays inside (0, 1)
    x = torch.sigmoid(y)
    density = torch.exp(
        -logit_laplace_nll(x, torch.tensor(mu, dtype=torch.float64), torch.tensor(ln_b, dtype=torch.float64))
    )
    total = torch.trapezoid(density * x * (1 - x), y).item()
    assert total == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize("mu,sigma", [(0.0, 1.0), (1.5, 0.2), (-2.0, 0.05)])
def test_logit_normal_density_integrates_to_one(mu, sigma):
    y = torch.linspace(-30, 30, 400001, dtype=torch.float64)
    x = torch.sigmoid(y)
    density = torch.exp(-logit_normal_nll(x, torch.tensor(mu, dtype=torch.float64), sigma))
    assert torch.trapezoid(density * x * (1 - x), y).item() == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize("likelihood,maps", [("logit_laplace", 6), ("logit_normal", 3)])
def test_likelihood_choice(likelihood, maps, monkeypatch):
    # Without the gumbel noise, the relaxed codes at tau -> 0 are the argmax codes.
    monkeypatch.setattr(torch.nn.functional, "gumbel_softmax", lambda lg, tau, hard, dim: (lg / tau).softmax(dim))
    cfg = DVAEConfig(groups=2, blocks_per_group=1, hidden=4, codebook=8, image_size=8, likelihood=likelihood)
    model = DVAE(cfg)
    assert model.decoder.output.out_channels == maps
    x = torch.rand(2, 3, 8, 8)
    z = torch.nn.functional.one_hot(model.encode(x), 8).permute(0, 3, 1, 2).float()
    mu, ln_b = model.decode_soft(z)
    nll = logit_laplace_nll(phi(x), mu, ln_b) if maps == 6 else logit_normal_nll(phi(x), mu, cfg.sigma)
    out = model(x, tau=1e-6, beta=0.0)
    torch.testing.assert_close(out["nll"], nll.mean(), rtol=1e-4, atol=1e-4)


def test_schedules_end_points():
    assert cosine_anneal(0, 100, 1.0, 1 / 16) == pytest.approx(1.0)
    assert cosine_anneal(100, 100, 1.0, 1 / 16) == pytest.approx(1 / 16)
    assert cosine_anneal(500, 100, 1.0, 1 / 16) == pytest.approx(1 / 16)
    assert cosine_anneal(50, 100, 1.0, 0.0) == pytest.approx(0.5)
    assert linear_ramp(0, 5000, 6.6) == 0.0 and linear_ramp(5000, 5000, 6.6) == pytest.approx(6.6)
    assert linear_ramp(2500, 5000, 6.6) == pytest.approx(3.3)


def test_encode_decode_shapes_and_loss():
    cfg = DVAEConfig(groups=3, blocks_per_group=1, hidden=8, codebook=16, image_size=16)
    model = DVAE(cfg)
    x = torch.rand(2, 3, 16, 16)
    codes = model.encode(x)
    assert codes.shape == (2, 4, 4) and codes.dtype == torch.long and codes.max() < 16
    rec = model.decode(codes)
    assert rec.shape == (2, 3, 16, 16) and rec.min() >= 0 and rec.max() <= 1
    out = model(x, tau=1.0, beta=6.6)
    assert set(out) == {"loss", "nll", "kl", "mse"} and out["kl"] >= 0
    out["loss"].backward()
    assert all(p.grad is not None for p in model.parameters())
    # Readable state-dict names, as in openai/DALL-E.
    assert "encoder.blocks.group_1.block_1.res_path.1.weight" in model.state_dict()


def test_kl_is_zero_for_uniform_codes():
    cfg = DVAEConfig(groups=2, blocks_per_group=1, hidden=4, codebook=8, image_size=8)
    model = DVAE(cfg)
    with torch.no_grad():
        model.encoder.output.weight.zero_()
        model.encoder.output.bias.zero_()
    assert model(torch.rand(1, 3, 8, 8), 1.0, 1.0)["kl"].item() == pytest.approx(0.0, abs=1e-6)


def test_presets_and_metrics():
    assert PRESETS["paper"].grid == 32 and PRESETS["paper"].codebook == 8192 and PRESETS["paper"].factor == 8
    assert PRESETS["tiny"].grid == 8
    assert psnr(torch.zeros(4), torch.full((4,), 0.1)) == pytest.approx(20.0)
    used, ppl = codebook_usage(torch.tensor([0, 1, 1, 3]), 8)
    assert used == 3 / 8 and ppl == pytest.approx(math.exp(-(0.25 * math.log(0.25) * 2 + 0.5 * math.log(0.5))))


def test_batch_limit_keeps_large_dvaes_in_small_batches(monkeypatch):
    with torch.device("meta"):  # the paper's dVAE, without allocating it
        paper = DVAE(PRESETS["paper"])
    tiny = DVAE(PRESETS["tiny"])
    assert paper.batch_limit() == 5 and tiny.batch_limit() == 256
    per_image = 6 * 32 * 32**2 * 4  # six fp32 maps of 32 channels at 32x32
    assert tiny.batch_limit(budget_bytes=5 * per_image) == 5 and tiny.batch_limit(budget_bytes=1) == 1
    # Stage 2's encoding in batches of 3 gives the codes of one large batch.
    from dalle_fast.data.shapes import ShapesDataset
    from dalle_fast.data.token_cache import encode_images

    ds = ShapesDataset("train", 10, 32, seed=1)
    whole = tiny.encode(torch.stack([ds[i][0] for i in range(10)])).flatten(1).to(torch.int16)
    monkeypatch.setattr(DVAE, "batch_limit", lambda self, *a, **k: 3)
    codes, lines, index = encode_images(ds, tiny, 0, 0, "shapes")
    assert torch.equal(codes, whole) and len(lines) == 10 and index == list(range(10))
    # encode() and decode() themselves work in batches of batch_limit() (here 3): the same results.
    images = torch.stack([ds[i][0] for i in range(10)])
    assert torch.equal(tiny.encode(images).flatten(1).to(torch.int16), whole)
    grid = whole.long().view(10, 8, 8)
    monkeypatch.setattr(DVAE, "batch_limit", lambda self, *a, **k: 256)
    at_once = tiny.decode(grid)
    monkeypatch.setattr(DVAE, "batch_limit", lambda self, *a, **k: 3)
    torch.testing.assert_close(tiny.decode(grid), at_once, rtol=0, atol=1e-6)  # convolution sums may regroup


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: DVAEConfig(groups=0), "groups"),
        (lambda: DVAEConfig(image_size=100), "multiple"),
        (lambda: DVAEConfig(tau_end=2.0), "tau_end"),
        (lambda: DVAEConfig(likelihood="gaussian"), "likelihood"),
        (lambda: DVAEConfig(sigma=0.0), "sigma"),
        (lambda: DVAE(PRESETS["tiny"]).encode(torch.rand(1, 1, 64, 64)), "images"),
        (lambda: DVAE(PRESETS["tiny"]).decode(torch.zeros(1, 4, 4)), "LongTensor"),
        (lambda: DVAE(PRESETS["tiny"]).decode(torch.full((1, 4, 4), 9999)), "codes"),
    ],
)
def test_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()
