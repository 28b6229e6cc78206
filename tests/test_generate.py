"""Sampling: the key/value cache against the full forward pass for every mask kind, the key index sets
against the dense masks, determinism, priming, and the generate CLI's errors."""

import pytest
import torch

from dalle_fast.generate import sample_tokens
from dalle_fast.kv_cache import cached_image_logits, decode_step, key_index, prefill
from dalle_fast.masks import MASK_KINDS, attention_mask
from dalle_fast.tokenizer import PAD
from dalle_fast.transformer import DALLE, Layer, TransformerConfig

# 5 text tokens + a 4x4 grid; kernel 3 < grid, so the conv mask is a real subset of causal.
SMALL = dict(text_vocab=40, text_len=5, image_vocab=12, image_size=4, d_model=32, n_heads=2, head_dim=16, kernel_size=3)


def model_of(kinds: list[str] | None = None, **kw) -> DALLE:
    """A small model in eval mode with weights large enough that attention patterns move the logits a lot;
    kinds: every layer's mask kind (default: the config's schedule)."""
    cfg = TransformerConfig(**{**SMALL, "n_layers": len(kinds) if kinds else 5, **kw})
    torch.manual_seed(0)
    model = DALLE(cfg)
    if kinds:
        model.layers = torch.nn.ModuleList(Layer(cfg, k) for k in kinds)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return model.eval()


def tokens(cfg: TransformerConfig, batch: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(0, cfg.text_vocab, (batch, cfg.text_len), generator=g)
    text[0, 3:] = PAD  # a padded caption among them
    image = torch.randint(0, cfg.image_vocab, (batch, cfg.image_size**2), generator=g)
    return text, image


@pytest.mark.parametrize("kind", MASK_KINDS)
def test_key_index_is_the_mask(kind):
    T, W, ks = 5, 4, 3
    mask = attention_mask(kind, T, W, ks)
    for p, idx in enumerate(key_index(kind, T, W, ks)):
        assert torch.equal(idx, mask[T + p].nonzero().squeeze(1)), p


@pytest.mark.parametrize("kind", MASK_KINDS)
@pytest.mark.parametrize("start", [0, 6])
def test_cache_logits_equal_the_forward_per_kind(kind, start):
    model = model_of([kind, kind])
    text, image = tokens(model.cfg)
    full = model(text, image)[1]  # (B, 16, V)
    cached = cached_image_logits(model, text, image, start)
    assert cached.shape == full[:, start:].shape
    torch.testing.assert_close(cached, full[:, start:], rtol=1e-5, atol=1e-5)
    # The check has teeth: the logits depend strongly on the attention pattern.
    assert (full[:, 1:] - full[:, :-1]).abs().max() > 0.1


@pytest.mark.parametrize("attention", ["sparse", "causal", "dense"])
def test_cache_logits_equal_the_forward_per_mode(attention):
    """The paper's schedule (row, column, row, row, conv) and the dense baselines."""
    model = model_of(attention=attention)
    text, image = tokens(model.cfg)
    torch.testing.assert_close(cached_image_logits(model, text, image), model(text, image)[1], rtol=1e-5, atol=1e-5)


def test_a_wrong_mask_in_the_cache_is_caught():
    """Swapping one kind's key sets for another's must break the equality the tests above check."""
    model = model_of(["row", "conv"])
    text, image = tokens(model.cfg)
    cache, _ = prefill(model, text, image, 0)
    cache.index["conv"] = key_index("causal", 5, 4, 3)
    got = torch.stack([decode_step(model, cache, image[:, j]) for j in range(15)], 1)
    assert (got - model(text, image)[1][:, 1:]).abs().max() > 1e-3


def test_cache_and_recompute_sample_the_same_tokens():
    model = model_of()
    text, _ = tokens(model.cfg, batch=4)
    a = sample_tokens(model, text, top_k=5, generator=torch.Generator().manual_seed(7))
    b = sample_tokens(model, text, top_k=5, generator=torch.Generator().manual_seed(7), cache=False)
    c = sample_tokens(model, text, top_k=5, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and torch.equal(a, c)
    d = sample_tokens(model, text, top_k=5, generator=torch.Generator().manual_seed(8))
    assert not torch.equal(a, d)


@pytest.mark.parametrize("cache", [True, False])
def test_priming_keeps_the_given_tokens(cache):
    model = model_of()
    text, image = tokens(model.cfg)
    out = sample_tokens(model, text, prime=image[:, :6], generator=torch.Generator().manual_seed(0), cache=cache)
    assert torch.equal(out[:, :6], image[:, :6])
    full = sample_tokens(model, text, prime=image, generator=torch.Generator().manual_seed(0), cache=cache)
    assert torch.equal(full, image)
