"""Sampling: the key/value cache against the full forward pass for every mask kind, determinism, priming,
and the generate CLI's errors. (The decode op itself: tests/test_decode.py.)"""

import json

import pytest
import torch

from dalle_fast.data.tokenizer import PAD
from dalle_fast.models.kv_cache import kernel_position
from dalle_fast.models.transformer import DALLE, Layer, TransformerConfig
from dalle_fast.ops.masks import MASK_KINDS
from dalle_fast.ops.support import cuda_unusable_reason
from dalle_fast.sampling.sample import sample_tokens, sampling_autocast

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


def test_kernel_position_is_the_column_transposition():
    from dalle_fast.ops.masks import transpose_image_index

    T, W = 5, 4
    perm = transpose_image_index(T, W)
    for t in range(T + W * W):
        assert kernel_position("column", T, W, t) == int(perm[t])
        assert kernel_position("row", T, W, t) == kernel_position("conv", T, W, t) == t


@pytest.mark.parametrize("kind", MASK_KINDS)
@pytest.mark.parametrize("start", [0, 6])
def test_cache_logits_equal_the_forward_per_kind(kind, start):
    model = model_of([kind, kind])
    text, image = tokens(model.cfg)
    full = model(text, image)[1]  # (B, 16, V)
    cached = model.cached_image_logits(text, image, start)
    assert cached.shape == full[:, start:].shape
    torch.testing.assert_close(cached, full[:, start:], rtol=1e-5, atol=1e-5)
    # The check has teeth: the logits depend strongly on the attention pattern.
    assert (full[:, 1:] - full[:, :-1]).abs().max() > 0.1


@pytest.mark.parametrize("attention", ["sparse", "causal", "dense"])
def test_cache_logits_equal_the_forward_per_mode(attention):
    """The paper's schedule (row, column, row, row, conv) and the dense baselines."""
    model = model_of(attention=attention)
    text, image = tokens(model.cfg)
    torch.testing.assert_close(model.cached_image_logits(text, image), model(text, image)[1], rtol=1e-5, atol=1e-5)


def test_a_wrong_mask_in_the_cache_is_caught():
    """Decoding a layer under another kind's keys must break the equality the tests above check."""
    model = model_of(["row", "conv"])
    text, image = tokens(model.cfg)
    want = model(text, image)[1][:, 1:]
    cache, _ = model.prefill(text, image, 0)
    model.layers[1].attn.branch.kind = "causal"  # decoding reads the attention's kind; the cache was built as conv
    got = torch.stack([model.decode_step(cache, image[:, j]) for j in range(15)], 1)
    assert (got - want).abs().max() > 1e-3


def test_cache_and_recompute_sample_the_same_tokens():
    model = model_of()
    text, _ = tokens(model.cfg, batch=4)
    a = sample_tokens(model, text, top_k=5, generator=torch.Generator().manual_seed(7))
    b = sample_tokens(model, text, top_k=5, generator=torch.Generator().manual_seed(7), cache=False)
    c = sample_tokens(model, text, top_k=5, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and torch.equal(a, c)
    d = sample_tokens(model, text, top_k=5, generator=torch.Generator().manual_seed(8))
    assert not torch.equal(a, d)


def test_sampled_tokens_are_an_ordinary_tensor():
    """The loop runs in inference mode; the tokens it returns are not an inference tensor, so callers may
    change them in place and use them anywhere."""
    model = model_of()
    text, _ = tokens(model.cfg, batch=2)
    out = sample_tokens(model, text, generator=torch.Generator().manual_seed(0))
    assert not out.is_inference()
    out[:, 0] = 0  # raises for an inference tensor outside inference mode


def test_sampling_device(monkeypatch, pretend_gpu):
    """--device: auto is the GPU only when the model's attention runs there; an explicit cuda that cannot
    run it says why. The GPU cases are reached by pretending one is present (nothing touches it)."""
    from dalle_fast.sampling.sample import sampling_device

    sparse16, dense16, sparse32 = model_of(), model_of(attention="dense"), model_of(head_dim=32)
    with pytest.raises(ValueError, match="device must be auto, cpu, cuda or cuda:N, got 'tpu'"):
        sampling_device("tpu", sparse16)
    assert sampling_device("cpu", sparse16) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert sampling_device("auto", dense16) == torch.device("cpu")
    with pytest.raises(ValueError, match="no CUDA device is available"):
        sampling_device("cuda", dense16)
    pretend_gpu()
    assert sampling_device("auto", dense16) == torch.device("cuda")
    with pytest.raises(ValueError, match="this machine has 1 CUDA device"):
        sampling_device("cuda:3", dense16)
    assert sampling_device("auto", sparse32) == torch.device("cuda")
    assert sampling_device("auto", sparse16) == torch.device("cpu")  # head dim 16: no CUDA kernel
    with pytest.raises(ValueError, match="head_dim 16 has no CUDA attention kernel.*run on the CPU"):
        sampling_device("cuda:0", sparse16)
    pretend_gpu((7, 5))
    assert sampling_device("auto", sparse32) == torch.device("cpu")
    with pytest.raises(ValueError, match="compute capability 8.0"):
        sampling_device("cuda", sparse32)
    # A dense model: the cache's decode kernel needs the build's kernels too; without the cache, any GPU.
    assert sampling_device("auto", dense16) == torch.device("cpu")
    assert sampling_device("auto", dense16, cache=False) == torch.device("cuda")


def test_sampling_autocast_is_bf16_on_cuda_for_sparse_models_only():
    """The CUDA attention kernels take fp16/bf16: an fp32 sparse model samples under bf16 autocast there.
    (Only the choice is checked here: without a GPU, the autocast it returns is disabled.)"""
    sparse, dense = model_of(), model_of(attention="dense")
    ctx = sampling_autocast(sparse, "cuda")
    assert isinstance(ctx, torch.autocast) and ctx.device == "cuda" and ctx.fast_dtype == torch.bfloat16
    for model, device in ((sparse, "cpu"), (dense, "cuda"), (dense, "cpu")):
        assert not isinstance(sampling_autocast(model, device), torch.autocast)


CUDA = pytest.mark.skipif(cuda_unusable_reason() is not None, reason="needs a GPU this build's CUDA kernels run on")


@CUDA
def test_cuda_sampling_of_an_fp32_model():
    """An fp32 sparse model samples on CUDA (under bf16 autocast) with and without the cache; its plain
    forward outside autocast is refused with what to do."""
    model = model_of(head_dim=32).cuda()
    text, image = tokens(model.cfg, batch=2)
    text, image = text.cuda(), image.cuda()
    for cache in (True, False):
        out = sample_tokens(model, text, top_k=5, cache=cache, generator=torch.Generator("cuda").manual_seed(0))
        assert out.shape == image.shape and out.is_cuda and 0 <= int(out.min()) <= int(out.max()) < 12
    with pytest.raises(ValueError, match="torch.autocast"):
        model.loss(text, image)


def test_guidance_mixes_caption_and_empty_caption_logits():
    """Greedy guided decoding against a hand-written loop over the full forward pass: each token is the
    argmax of u + g (c - u), c given the caption and u given the all-padding caption."""
    model = model_of()
    cfg = model.cfg
    text, image = tokens(model.cfg, batch=3)
    empty = torch.full_like(text, PAD)
    for g in (1.0, 3.0):
        want = torch.zeros(3, cfg.image_size**2, dtype=torch.long)
        for j in range(cfg.image_size**2):
            c, u = (model.image_logits(model.hidden(t, want)[:, cfg.text_len - 1 + j]) for t in (text, empty))
            want[:, j] = (u + g * (c - u)).argmax(-1)
        for cache in (True, False):
            got = sample_tokens(model, text, top_k=1, guidance=g, cache=cache)
            assert torch.equal(got, want), (g, cache)
    # The guided tokens differ from the unguided ones (the check has teeth), and a seeded guided draw
    # is the same with and without the cache.
    assert not torch.equal(sample_tokens(model, text, top_k=1, guidance=3.0), sample_tokens(model, text, top_k=1))
    a = sample_tokens(model, text, guidance=2.0, generator=torch.Generator().manual_seed(5))
    b = sample_tokens(model, text, guidance=2.0, generator=torch.Generator().manual_seed(5), cache=False)
    assert torch.equal(a, b)
    out = sample_tokens(model, text, guidance=2.0, prime=image[:, :5], generator=torch.Generator().manual_seed(5))
    assert torch.equal(out[:, :5], image[:, :5])
    with pytest.raises(ValueError, match="guidance"):
        sample_tokens(model, text, guidance=0.5)


@pytest.mark.parametrize("cache", [True, False])
def test_priming_keeps_the_given_tokens(cache):
    model = model_of()
    text, image = tokens(model.cfg)
    out = sample_tokens(model, text, prime=image[:, :6], generator=torch.Generator().manual_seed(0), cache=cache)
    assert torch.equal(out[:, :6], image[:, :6])
    full = sample_tokens(model, text, prime=image, generator=torch.Generator().manual_seed(0), cache=cache)
    assert torch.equal(full, image)


# ---- batched generation, reranking, the CLI ---------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory, train_micro_runs):
    """A dVAE, a transformer and a CLIP run, each trained for two updates (micro sizes)."""
    return train_micro_runs(tmp_path_factory.mktemp("runs"))


class FixedScorer:
    """Scores images by their mean brightness: a known order to check the reranking against."""

    def score(self, images, captions):
        return images.mean(dim=(1, 2, 3))


def test_generate_batches_rerank_and_prime(runs):
    from dalle_fast.runs.load import load_transformer
    from dalle_fast.sampling.sample import generate

    model, tok, dvae = load_transformer(runs / "dalle")
    captions = ["a large red circle", "a small blue square above a large green circle"]
    text = tok.encode(captions)
    kw = dict(draws=6, batch_size=4, top_k=8)  # 12 rows in batches of 4
    plain = generate(model, text, dvae, generator=torch.Generator().manual_seed(1), **kw)
    assert plain["tokens"].shape == (2, 6, 64) and plain["images"].shape == (2, 6, 3, 32, 32)
    again = generate(model, text, dvae, generator=torch.Generator().manual_seed(1), **kw)
    assert torch.equal(plain["tokens"], again["tokens"])
    best = generate(
        model, text, dvae, keep=2, scorer=FixedScorer(), captions=captions,
        generator=torch.Generator().manual_seed(1), **kw,
    )  # fmt: skip
    # Same draws, so the kept ones are the two brightest of each caption's six, best first.
    brightness = plain["images"].mean(dim=(2, 3, 4))
    top = brightness.topk(2, dim=1)
    torch.testing.assert_close(best["scores"], top.values)
    assert torch.equal(best["tokens"], plain["tokens"][torch.arange(2).unsqueeze(1), top.indices])
    prime = torch.arange(24) % dvae.cfg.codebook  # three token rows
    primed = generate(model, text, dvae, prime=prime, generator=torch.Generator().manual_seed(1), **kw)
    assert (primed["tokens"][:, :, :24] == prime).all()


def test_progress_counts_every_token_and_can_stop_the_sampling(runs):
    """generate's progress: image tokens of all draws across batches (after a prime's), the same images as
    without it; an exception raised in it stops the sampling (how the server cancels a request)."""
    from dalle_fast.runs.load import load_transformer
    from dalle_fast.sampling.sample import generate

    model, tok, dvae = load_transformer(runs / "dalle")
    text = tok.encode(["a large red circle", "a small blue square"])
    seen = []
    kw = dict(draws=3, batch_size=4, generator=torch.Generator().manual_seed(2))  # 6 rows: batches of 4 and 2
    watched = generate(model, text, dvae, progress=lambda done, total: seen.append((done, total)), **kw)
    plain = generate(model, text, dvae, **{**kw, "generator": torch.Generator().manual_seed(2)})
    assert torch.equal(watched["tokens"], plain["tokens"])
    assert [d for d, _ in seen] == [4 * j for j in range(1, 65)] + [256 + 2 * j for j in range(1, 65)]
    assert {t for _, t in seen} == {6 * 64}
    seen.clear()
    generate(
        model, text[:1], dvae, draws=1, prime=torch.zeros(16, dtype=torch.long), progress=lambda *a: seen.append(a)
    )
    assert seen[-1] == (48, 48) and len(seen) == 48

    def stop(done, total):
        if done >= 10:
            raise KeyboardInterrupt("stop")

    with pytest.raises(KeyboardInterrupt, match="stop"):
        generate(model, text, dvae, draws=2, progress=stop)


def test_cli_writes_a_grid_and_is_deterministic(runs, tmp_path, capsys):
    from dalle_fast.generate import main

    args = ["--run", str(runs / "dalle"), "a large red circle", "a small blue square", "-n", "2", "--rerank", "3"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert main([*args, "--out", str(tmp_path / "b"), "--top-k", "4", "--top-p", "0.9", "--temperature", "0.8"]) == 0
    assert main([*args, "--out", str(tmp_path / "c"), "--top-k", "4", "--top-p", "0.9", "--temperature", "0.8"]) == 0
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    drawn = ["000_a-large-red-circle_01.png", "000_a-large-red-circle_02.png", "001_a-small-blue-square_01.png"]
    assert names == [*drawn, "001_a-small-blue-square_02.png", "captions.json", "grid.png"]
    for name in names:
        if name != "captions.json":
            assert (tmp_path / "b" / name).read_bytes() == (tmp_path / "c" / name).read_bytes()
    # captions.json: every file's caption, rank and score, and the settings that drew them.
    record = json.loads((tmp_path / "b" / "captions.json").read_text())
    assert set(record["files"]) == set(names) - {"captions.json", "grid.png"}
    entry = record["files"]["001_a-small-blue-square_02.png"]
    assert (entry["caption"], entry["caption_index"], entry["rank"]) == ("a small blue square", 1, 2)
    first = record["files"]["001_a-small-blue-square_01.png"]["score"]
    assert first >= entry["score"]  # reranked: best first
    settings = record["settings"]
    assert (settings["seed"], settings["top_k"], settings["top_p"], settings["temperature"]) == (0, 4, 0.9, 0.8)
    assert settings["rerank"] == 3 and settings["run"] == str(runs / "dalle")
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["captions"] == str(tmp_path / "c" / "captions.json")


def test_cli_completion(runs, tmp_path):
    from PIL import Image

    from dalle_fast.data.images import preprocess
    from dalle_fast.data.shapes import ShapesDataset
    from dalle_fast.generate import main
    from dalle_fast.runs.load import load_transformer
    from dalle_fast.sampling.sample import load_prime

    _, _, dvae = load_transformer(runs / "dalle")
    ShapesDataset("heldout", 4, 32).render(0).save(tmp_path / "in.png")
    rows, recon = load_prime(tmp_path / "in.png", dvae, 3)
    codes = dvae.encode(preprocess(Image.open(tmp_path / "in.png"), 32)[None])
    assert torch.equal(rows, codes[0, :3].flatten()) and recon.shape == (3, 32, 32)
    out = tmp_path / "out"
    args = ["--run", str(runs / "dalle"), "a red triangle", "-n", "2", "--prime", str(tmp_path / "in.png")]
    assert main([*args, "--prime-rows", "3", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "000_a-red-triangle_01.png", "000_a-red-triangle_02.png", "captions.json", "grid.png"
    ]  # fmt: skip


@pytest.mark.parametrize(
    "args, message",
    [
        (["--run", "{run}", "   "], "caption 1 is empty"),
        (["--run", "{run}"], "no caption given"),
        (["--run", "{tmp}/nowhere", "a red circle"], "is not a run directory"),
        (["--run", "{run}", "a red circle", "--prime", "{tmp}/not.png"], "is not a readable image"),
        (["--run", "{run}", "a red circle", "--prime", "{tmp}/missing.png"], "does not exist"),
        (["--run", "{run}", "a red circle", "--prime", "{tmp}/not.png", "--prime-rows", "9"], "--prime-rows"),
        (["--run", "{run}", "a red circle", "-n", "4", "--rerank", "2"], "--rerank"),
        (
            ["--run", "{run}", "a red circle", "-n", "2", "--rerank", "4", "--clip", "{tmp}/noclip"],
            "is not a run directory",
        ),
        (["--run", "{run}", "a red circle", "-n", "2", "--rerank", "4", "--clip", "none"], "--clip is none"),
        (
            ["--run", "{run}", "a red circle", "-n", "2", "--rerank", "4", "--clip", "open_clip:ViT-B-32:/none.pt"],
            "open_clip",
        ),
        (["a red circle"], "--run is required"),
        (["--run", "{run}", "a red circle", "--guidance", "0.5"], "--guidance must be >= 1"),
    ],
)
def test_cli_errors_are_one_line(runs, tmp_path, capsys, args, message):
    from dalle_fast.generate import main

    (tmp_path / "not.png").write_text("not an image")
    args = [a.format(run=runs / "dalle", tmp=tmp_path) for a in args]
    with pytest.raises(SystemExit) as e:
        main([*args, "--out", str(tmp_path / "o")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("python -m dalle_fast.generate: error:")


def test_cli_warns_about_a_long_caption(runs, tmp_path, capsys):
    from dalle_fast.generate import main

    long = " ".join(["a small red circle above a large blue square"] * 10)
    assert main(["--run", str(runs / "dalle"), long, "-n", "1", "--out", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert "caption 1 is longer than 24 tokens and was truncated" in err and "Traceback" not in err


def test_cli_warns_about_words_never_seen_in_training(runs, tmp_path, capsys):
    from dalle_fast.generate import main

    args = ["--run", str(runs / "dalle"), "a red circle", "a zebra beside a red circle", "-n", "1"]
    threads = torch.get_num_threads()
    try:
        assert main([*args, "--threads", "1", "--out", str(tmp_path)]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    err = capsys.readouterr().err
    assert "caption 2 has words no training caption had: 'zebra', 'beside'" in err and "caption 1 has" not in err


def test_cli_guidance_warns_for_a_run_without_caption_dropout(runs, tmp_path, capsys):
    from dalle_fast.generate import main

    args = ["--run", str(runs / "dalle"), "a red circle", "-n", "1", "--guidance", "2", "--out", str(tmp_path)]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "trained without --caption-dropout" in err and "Traceback" not in err


def test_evaluate_end_to_end(runs, tmp_path):
    from dalle_fast.evaluation.fidelity import EvaluateConfig, evaluate, write_report

    res = evaluate(EvaluateConfig(run=str(runs / "dalle"), captions=2, draws=2, classifier_steps=2))
    assert res["N"] == [1, 2] and 0 <= res["classifier_accuracy"] <= 1
    for s in ("held-out pairs", "seen pairs"):
        row = res[s]
        assert all(0 <= row[k] <= 1 for k in ("pairs", "position", "real", "recon"))
        assert row["position"] <= row["pairs"] and len(row["rerank_pairs"]) == 2  # the CLIP run is found
    md, png = write_report(res, tmp_path)
    assert "dVAE reconstructions" in md.read_text() and png.stat().st_size > 0
