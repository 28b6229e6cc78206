"""The stage-2 transformer: mask structure per layer, causality of the whole model, the loss weighting,
sparse vs dense agreement, presets, resblock scaling and bad input."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from dalle_fast.data.tokenizer import PAD
from dalle_fast.models.transformer import DALLE, Attention, TransformerConfig, preset
from dalle_fast.ops.masks import MASK_KINDS, attention_mask, layer_kinds
from dalle_fast.presets import main
from dalle_fast.training.amp import ResblockGradScaler

# 5 text tokens + a 4x4 grid; kernel 3 so that the conv mask is a real subset at this size.
SMALL = dict(text_vocab=40, text_len=5, image_vocab=12, image_size=4, d_model=32, n_heads=2, head_dim=16, kernel_size=3)


def small(**kw) -> TransformerConfig:
    return TransformerConfig(**{**SMALL, "n_layers": 5, **kw})


def tokens(cfg: TransformerConfig, batch: int = 2, seed: int = 0, pad_from: int | None = None):
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(0, cfg.text_vocab, (batch, cfg.text_len), generator=g)
    if pad_from is not None:
        text[:, pad_from:] = PAD
    image = torch.randint(0, cfg.image_vocab, (batch, cfg.image_size**2), generator=g)
    return text, image


@pytest.mark.parametrize("kind", MASK_KINDS)
def test_attention_branch_depends_exactly_on_the_mask(kind):
    """d(output at i)/d(input at j) is nonzero exactly where attention_mask(kind) allows (i, j): the
    branch runs the right mask, column included (transposed inside the branch, raster outside)."""
    cfg = small(n_layers=1)
    torch.manual_seed(0)
    attn = Attention(cfg, kind)
    n = cfg.seq_len
    x = torch.randn(1, n, cfg.d_model, requires_grad=True)
    out = attn(x)
    r = torch.randn_like(out)
    depends = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):  # one backward per query position: which inputs reach output i
        (g,) = torch.autograd.grad((out[0, i] * r[0, i]).sum(), x, retain_graph=True)
        depends[i] = g[0].abs().sum(dim=-1) > 0
    expected = attention_mask(kind, cfg.text_len, cfg.image_size, cfg.kernel_size)
    assert torch.equal(depends, expected)


def test_layers_follow_layer_kinds():
    for n in (1, 2, 5, 9):
        model = DALLE(small(n_layers=n))
        assert [layer.kind for layer in model.layers] == layer_kinds(n)
        assert [layer.attn.branch.kind for layer in model.layers] == layer_kinds(n)
    assert all(layer.kind == "causal" for layer in DALLE(small(attention="causal")).layers)


@pytest.mark.parametrize("attention", ["sparse", "causal", "dense"])
def test_model_is_causal(attention):
    """Changing a token never changes a logit at an earlier position (logit t predicts token t + 1)."""
    cfg = small(attention=attention)
    torch.manual_seed(0)
    model = DALLE(cfg).eval()
    text, image = tokens(cfg, pad_from=3)
    with torch.no_grad():
        h0 = model.hidden(text, image)
    T = cfg.text_len
    for pos in (1, T - 1, T, T + 5, cfg.seq_len - 1):
        t2, i2 = text.clone(), image.clone()
        if pos < T:
            t2[:, pos] = (t2[:, pos].clamp(min=0) + 1) % cfg.text_vocab
        else:
            i2[:, pos - T] = (i2[:, pos - T] + 1) % cfg.image_vocab
        with torch.no_grad():
            h1 = model.hidden(t2, i2)
        assert torch.equal(h0[:, :pos], h1[:, :pos]), f"a change at {pos} reached an earlier position"
        assert not torch.allclose(h0[:, pos:], h1[:, pos:]), "the change had no effect at all"


def test_loss_weighting():
    cfg = small()
    torch.manual_seed(0)
    model = DALLE(cfg)
    text, image = tokens(cfg, batch=3, pad_from=2)
    parts = model.loss(text, image)
    text_logits, image_logits = model(text, image)
    assert text_logits.dtype == image_logits.dtype == torch.float32
    assert text_logits.shape == (3, cfg.text_len - 1, cfg.text_vocab + cfg.text_len)
    assert image_logits.shape == (3, cfg.image_size**2, cfg.image_vocab)
    # PAD targets are the per-position pad tokens: position p's pad has id text_vocab + p.
    targets = text[:, 1:].clone()
    pos = torch.arange(1, cfg.text_len).expand_as(targets)
    targets = torch.where(targets == PAD, cfg.text_vocab + pos, targets)
    lt = F.cross_entropy(text_logits.reshape(-1, text_logits.shape[-1]), targets.reshape(-1))
    li = F.cross_entropy(image_logits.reshape(-1, cfg.image_vocab), image.reshape(-1))
    torch.testing.assert_close(parts["text"], lt)
    torch.testing.assert_close(parts["image"], li)
    torch.testing.assert_close(parts["loss"], lt / 8 + 7 * li / 8)


def test_pad_tokens_are_per_position():
    cfg = small()
    model = DALLE(cfg)
    text = torch.full((1, cfg.text_len), PAD)
    ids = model.text_ids(text)
    assert ids.tolist() == [[cfg.text_vocab + p for p in range(cfg.text_len)]]


def test_sparse_causal_equals_dense():
    """attention="causal" (the kernels) and "dense" (SDPA) compute the same model."""
    torch.manual_seed(0)
    a = DALLE(small(attention="causal"))
    b = DALLE(small(attention="dense"))
    b.load_state_dict(a.state_dict())
    text, image = tokens(small(), batch=2)
    la, lb = a.loss(text, image), b.loss(text, image)
    torch.testing.assert_close(la["loss"], lb["loss"], rtol=1e-5, atol=1e-5)
    la["loss"].backward()
    lb["loss"].backward()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    a = DALLE(small())
    b = DALLE(small(checkpoint=True))
    b.load_state_dict(a.state_dict())
    text, image = tokens(small())
    a.loss(text, image)["loss"].backward()
    b.loss(text, image)["loss"].backward()
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa.grad, pb.grad)


def test_resblock_scaler_keeps_names_and_values():
    torch.manual_seed(0)
    model = DALLE(small())
    text, image = tokens(small())
    before = model.loss(text, image)["loss"].detach()
    keys = list(model.state_dict())
    scaler = ResblockGradScaler(2 * model.cfg.n_layers)
    model.use_resblock_scaler(scaler)
    assert list(model.state_dict()) == keys
    assert len(scaler.param_groups(model)) == 2 * model.cfg.n_layers + 1  # every resblock + the outside group
    torch.testing.assert_close(model.loss(text, image)["loss"].detach(), before)
    with pytest.raises(ValueError, match="num_blocks"):
        DALLE(small()).use_resblock_scaler(ResblockGradScaler(3))


def test_presets():
    with torch.device("meta"):
        paper = DALLE(preset("paper"))
    n = paper.num_params()
    assert 11.5e9 < n < 12.5e9, n  # the paper's "12B"
    assert paper.cfg.seq_len == 256 + 32 * 32 and len(paper.layers) == 64
    assert [layer.kind for layer in paper.layers][:4] == ["row", "column", "row", "row"]
    assert paper.layers[-1].kind == "conv"
    long = preset("long")
    assert (long.text_len, long.image_size, long.d_model, long.n_heads, long.head_dim) == (256, 32, 256, 4, 64)
    assert preset("tiny", image_size=8).image_size == 8
    with pytest.raises(ValueError, match="preset"):
        preset("huge")


def test_preset_summary_cli(capsys):
    assert main(["paper"]) == 0
    out = capsys.readouterr().out
    assert "12.29B parameters" in out and "row x47, column x16, conv x1" in out


@pytest.mark.parametrize(
    "field,value",
    [("d_model", 0), ("head_dim", 300), ("attention", "flash"), ("dropout", 1.0), ("kernel_size", 4), ("text_len", -1)],
)
def test_bad_config(field, value):
    with pytest.raises(ValueError, match=field if field != "text_len" else "text_len"):
        dataclasses.replace(small(), **{field: value})


def test_bad_tokens():
    cfg = small()
    model = DALLE(cfg)
    text, image = tokens(cfg)
    with pytest.raises(ValueError, match="text must be a LongTensor"):
        model(text.float(), image)
    with pytest.raises(ValueError, match=r"text.shape\[1\]"):
        model(text[:, :-1], image)
    with pytest.raises(ValueError, match="text ids"):
        model(text + cfg.text_vocab, image)
    with pytest.raises(ValueError, match="image must have shape"):
        model(text, image[:, :-1])
    with pytest.raises(ValueError, match="image ids"):
        model(text, image - 1)
    with pytest.raises(ValueError, match="image must be a LongTensor"):
        model(text, image.view(2, 4, 4))


def test_bf16_autocast_runs_the_sparse_kernels():
    torch.manual_seed(0)
    model = DALLE(small())
    text, image = tokens(small())
    ref = model.loss(text, image)["loss"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model.loss(text, image)["loss"]
    assert low.dtype == torch.float32  # fp32 logits
    low.backward()
    torch.testing.assert_close(low, ref, rtol=3e-2, atol=3e-2)
    assert all(p.grad is not None and p.grad.isfinite().all() for p in model.parameters())


@pytest.mark.slow
def test_torch_compile_model():
    torch.manual_seed(0)
    model = DALLE(small())
    text, image = tokens(small())
    ref = model.loss(text, image)["loss"]
    compiled = torch.compile(model.loss, fullgraph=True)
    torch.testing.assert_close(compiled(text, image)["loss"], ref, rtol=1e-4, atol=1e-4)
