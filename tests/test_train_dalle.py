"""Stage-2 training: the token cache, exact resume, the CLI and its errors, sampling, and a smoke run of
the whole main job (every stage, micro-sized)."""

import csv
import dataclasses
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from dalle_fast.data.shapes import ShapesDataset
from dalle_fast.data.token_cache import TokenCache
from dalle_fast.models.transformer import DALLE, preset
from dalle_fast.ops.support import cpu_has_native_bf16, cuda_unusable_reason
from dalle_fast.runs.load import load_transformer
from dalle_fast.sampling.sample import filter_logits, sample_tokens
from dalle_fast.train import main
from dalle_fast.training.dalle import DALLERun as Trainer
from dalle_fast.training.dalle import DALLETrainConfig, resolve_device, train_dalle
from dalle_fast.training.pipeline import PipelineConfig, run_pipeline
from dalle_fast.training.vae import VAETrainConfig, train_vae


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("vae")
    train_vae(VAETrainConfig(out=str(out), steps=2, batch_size=4, ckpt_every=2, log_every=2, eval_images=8))
    return out


def _cfg(vae_run, out, **kw):
    base = dict(
        vae=str(vae_run), out=str(out), preset="micro", steps=6, batch_size=4, ckpt_every=3, log_every=3,
        max_items=48, val_items=8, samples=0, warmup=2, bpe_variants=2, vocab_size=300, text_len=48, seed=3,
        device="cpu",  # also where a GPU is present: micro's head_dim 16 has no CUDA kernel
    )  # fmt: skip
    base.update(kw)
    return DALLETrainConfig(**base)


def test_resume_is_exact(vae_run, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    train_dalle(_cfg(vae_run, a, samples=1))
    # The BPE-dropout encodings in the token cache come from the tokenizers library's own (unseeded)
    # RNG: run b starts from run a's cache, as a resumed run starts from its own.
    b.mkdir()
    for f in ("cache_train.pt", "cache_val.pt", "tokenizer.json"):
        shutil.copy(a / f, b / f)
    train_dalle(_cfg(vae_run, b, samples=1), stop_at=3)  # "killed" right after its step-3 checkpoint
    assert json.loads((b / "config.json").read_text())["step"] == 3
    train_dalle(_cfg(vae_run, b, samples=1, resume=True))
    for name in ("model", "ema"):
        wa, wb = load_file(a / f"{name}.safetensors"), load_file(b / f"{name}.safetensors")
        assert wa.keys() == wb.keys()
        for k in wa:
            assert torch.equal(wa[k], wb[k]), (name, k)
    rows = list(csv.DictReader(open(b / "log.csv")))
    assert [int(r["step"]) for r in rows] == [3, 6]
    assert sorted(p.name for p in b.glob("samples_*.png")) == ["samples_0000003.png", "samples_0000006.png"]


def test_training_lowers_the_loss(vae_run, tmp_path):
    metrics = train_dalle(_cfg(vae_run, tmp_path / "r", steps=30, ckpt_every=30, log_every=30, lr=3e-3))
    rows = list(csv.DictReader(open(tmp_path / "r" / "log.csv")))
    assert metrics["step"] == 30
    # Cross-entropy starts near log(vocab); 30 updates on a few dozen items must cut the image loss.
    assert metrics["image"] < 0.8 * torch.log(torch.tensor(64.0)).item(), rows


def test_token_cache(vae_run, tmp_path):
    trainer = Trainer(_cfg(vae_run, tmp_path / "c"))
    cache = trainer.train_cache
    assert len(cache) == 48 and cache.codes.shape == (48, 64) and cache.codes.dtype == torch.int16
    assert cache.text.shape[1:] == (3, trainer.tok.text_len)  # clean + 2 dropout variants
    # The shapes data lists every paraphrase of an item.
    assert (cache.ptr.diff() >= 3).all()
    text, image = cache.batch(torch.tensor([0, 5]), torch.Generator().manual_seed(0), dropout=False)
    assert text.dtype == image.dtype == torch.long and image.shape == (2, 64)
    assert trainer.tok.decode(text[0]) in ShapesDataset("train", 100, 32, seed=3).captions(0)
    # Same (seed, step), same batch; the cache is reused by a second trainer for the same data.
    assert all(torch.equal(x, y) for x, y in zip(trainer.batch(4), trainer.batch(4), strict=True))
    assert TokenCache.load(tmp_path / "c" / "cache_train.pt", {"other": "key"}) is None


def test_caption_dropout_empties_whole_captions(vae_run, tmp_path):
    from dalle_fast.data.tokenizer import PAD

    plain = Trainer(_cfg(vae_run, tmp_path / "c", batch_size=256))
    dropped = Trainer(_cfg(vae_run, tmp_path / "c", batch_size=256, caption_dropout=0.25))
    a, b = plain.batch(1)[0], dropped.batch(1)[0]
    empty = (b == PAD).all(1)
    assert not (a == PAD).all(1).any()  # no caption is empty by itself
    assert 0.15 < empty.float().mean() < 0.35  # about a quarter of them (256 draws)
    assert torch.equal(a[~empty], b[~empty])  # the others are untouched
    with pytest.raises(ValueError, match="caption_dropout"):
        _cfg(vae_run, tmp_path / "x", caption_dropout=1.0)


def test_samples_and_filters(vae_run, tmp_path):
    train_dalle(_cfg(vae_run, tmp_path / "s", steps=3))
    model, tok, dvae = load_transformer(tmp_path / "s")
    text = tok.encode(["a small red circle", "a large blue square"])
    a = sample_tokens(model, text, generator=torch.Generator().manual_seed(1), top_k=5)
    b = sample_tokens(model, text, generator=torch.Generator().manual_seed(1), top_k=5)
    assert torch.equal(a, b) and a.shape == (2, 64) and 0 <= a.min() and a.max() < dvae.cfg.codebook
    prime = a[:, :16]
    c = sample_tokens(model, text, generator=torch.Generator().manual_seed(2), prime=prime)
    assert torch.equal(c[:, :16], prime)
    assert dvae.decode(a.view(2, 8, 8)).shape == (2, 3, 32, 32)
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[True, False, False, True]]
    # top_p: the smallest set reaching the mass; the top token always stays.
    assert torch.isinf(filter_logits(logits, top_p=0.5)).tolist() == [[True, False, True, True]]
    with pytest.raises(ValueError, match="top_p"):
        filter_logits(logits, top_p=0.0)


def test_dense_and_causal_attention_modes(vae_run, tmp_path):
    for mode in ("dense", "causal"):
        metrics = train_dalle(_cfg(vae_run, tmp_path / mode, steps=2, attention=mode))
        assert metrics["step"] == 2


def test_bf16_training(vae_run, tmp_path):
    metrics = train_dalle(_cfg(vae_run, tmp_path / "bf16", steps=3, precision="bf16"))
    assert metrics["step"] == 3 and metrics["loss"] == metrics["loss"]  # finite, not NaN


def test_cli_errors(vae_run, tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["dalle", "--vae", str(vae_run), "--out", str(out), "--preset", "micro", "--steps", "2"]
    args += ["--batch-size", "2", "--max-items", "16", "--val-items", "4", "--samples", "0", "--vocab-size", "300"]
    args += ["--device", "cpu"]
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["step"] == 2
    with pytest.raises(SystemExit):  # an existing run needs --resume
        main(args)
    (out / "state.pt").write_bytes(b"truncated")
    with pytest.raises(SystemExit):  # a damaged checkpoint: a clean error, not a traceback
        main(args + ["--resume"])
    assert "unreadable" in capsys.readouterr().err
    for bad in (
        ["--vae", str(tmp_path / "nowhere")],
        ["--precision", "fp8"],
        ["--attention", "flash"],
        ["--steps", "0"],
        ["--device", "tpu"],
        ["--precision", "fp16", "--device", "cpu"],
    ):
        with pytest.raises(SystemExit):
            main(["dalle", "--out", str(tmp_path / "x"), "--vae", str(vae_run), *bad])
    err = capsys.readouterr().err
    assert "--vae" in err and "not a run directory" in err
    assert "precision" in err and "attention" in err
    assert main(["transformer"]) == 2


def test_load_transformer_errors(vae_run, tmp_path):
    with pytest.raises(ValueError, match="not a run directory"):
        load_transformer(tmp_path)
    with pytest.raises(ValueError, match="not a transformer run"):
        load_transformer(vae_run)


def test_main_job_smoke(tmp_path):
    """Every stage of `python -m dalle_fast.train`, micro-sized: files land where it says."""
    cfg = PipelineConfig(
        root=str(tmp_path), name="smoke", vae_steps=2, dalle_steps=2, clip_steps=2, items=32, captions=2, rerank=3
    )
    where = run_pipeline(cfg)
    run = tmp_path / "smoke"
    assert where["samples"] == str(run / "samples.png") and (run / "samples.png").exists()
    assert where["reranker"] == str(run / "clip")
    for f in ("vae/ema.safetensors", "dalle/ema.safetensors", "dalle/tokenizer.json", "clip/config.json"):
        assert (run / f).exists(), f
    # The transformer trains in bf16 on a CPU that multiplies bf16 in hardware (the policy's auto).
    native = cuda_unusable_reason() is not None and cpu_has_native_bf16()  # the stage runs on the CPU
    state = torch.load(run / "dalle" / "state.pt", weights_only=False)
    assert state["precision"] == ("bf16" if native else "fp32") or cuda_unusable_reason() is None
    # A second call finds every stage done and only draws the samples again.
    before = (run / "dalle" / "model.safetensors").stat().st_mtime_ns
    run_pipeline(cfg)
    assert (run / "dalle" / "model.safetensors").stat().st_mtime_ns == before


def test_model_from_a_run_matches_the_trained_config(vae_run, tmp_path):
    train_dalle(_cfg(vae_run, tmp_path / "m", steps=1))
    model, _, _ = load_transformer(tmp_path / "m")
    assert isinstance(model, DALLE)
    assert model.cfg.image_size == 8 and model.cfg.d_model == preset("micro").d_model
    train_dalle(_cfg(vae_run, tmp_path / "w", steps=1, d_model=64))  # micro's head_dim 16: 4 heads
    model, _, _ = load_transformer(tmp_path / "w")
    assert (model.cfg.d_model, model.cfg.n_heads, model.cfg.head_dim) == (64, 4, 16)
    with pytest.raises(ValueError, match="d_model"):
        _cfg(vae_run, tmp_path / "x", d_model=40)


def test_main_job_grid_width_and_batch(tmp_path):
    """--grid, --width and --dalle-batch reach the stages: a 16x16 dVAE, a narrower transformer on its
    256 image tokens, and samples drawn from them."""
    cfg = PipelineConfig(
        root=str(tmp_path), name="g16", vae_steps=1, dalle_steps=1, clip_steps=1, items=16, captions=1, rerank=2,
        per_caption=1, grid=16, width=64, dalle_batch=4, device="cpu",
    )  # fmt: skip
    run_pipeline(cfg)
    run = tmp_path / "g16"
    for stage in ("vae", "dalle", "clip"):  # --device reaches every stage
        assert json.loads((run / stage / "config.json").read_text())["train"]["device"] == "cpu", stage
    precision = torch.load(run / "dalle" / "state.pt", weights_only=False)["precision"]
    assert precision == ("bf16" if cpu_has_native_bf16() else "fp32")
    with pytest.raises(ValueError, match="device must be auto, cpu, cuda or cuda:N"):
        dataclasses.replace(cfg, device="cuda:first")
    assert json.loads((run / "vae" / "config.json").read_text())["dvae"]["groups"] == 2
    assert json.loads((run / "dalle" / "config.json").read_text())["train"]["batch_size"] == 4
    model, _, _ = load_transformer(run / "dalle")
    assert (model.cfg.image_size, model.cfg.d_model, model.cfg.n_heads) == (16, 64, 2)
    assert (run / "samples.png").exists()
    with pytest.raises(ValueError, match="grid"):
        run_pipeline(dataclasses.replace(cfg, name="bad", grid=12))


def test_main_job_on_a_folder_of_the_user_s_images(tmp_path, capsys):
    """python -m dalle_fast.train --data folder:DIR: every stage trains on the folder (the reranker too), at
    --image-size, says what the data is, and draws samples for the captions of its held-out items."""
    from PIL import Image

    data = tmp_path / "my_pictures"
    data.mkdir()
    colours = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}
    for i in range(30):
        name, rgb = list(colours.items())[i % 3]
        Image.new("RGB", (40 + i, 30), rgb).save(data / f"{i:02d}.png")
        (data / f"{i:02d}.txt").write_text(f"a {name} picture\na picture that is {name}\n")
    Image.new("RGB", (8, 8)).save(data / "uncaptioned.png")  # no .txt: left out, and said so
    cfg = PipelineConfig(
        data=f"folder:{data}", root=str(tmp_path / "runs"), image_size=16, vae_steps=2, dalle_steps=2,
        clip_steps=2, items=32, captions=2, rerank=2, per_caption=1, device="cpu",
    )  # fmt: skip
    assert cfg.name == "my_pictures"
    where = run_pipeline(cfg)
    run = tmp_path / "runs" / "my_pictures"
    for stage in ("vae", "dalle", "clip"):
        assert json.loads((run / stage / "config.json").read_text())["train"]["data"] == f"folder:{data}", stage
    dvae = json.loads((run / "vae" / "config.json").read_text())["dvae"]
    assert (dvae["image_size"], 2 ** (dvae["groups"] - 1)) == (16, 4)  # the tiny preset's factor: a 4x4 grid
    assert where["samples"] == str(run / "samples.png") and (run / "samples.png").exists()
    err = capsys.readouterr().err
    assert "30 captioned images (29 for training, 1 held out)" in err and "resized to 16x16" in err
    assert "1 without a same-stem .txt caption left out" in err and "the first is 40x30" in err
    assert "samples for 1 captions of held-out items" in err
    with pytest.raises(ValueError, match="image_size: must be a positive multiple of the tiny preset's"):
        PipelineConfig(data=f"folder:{data}", image_size=18)


def test_folder_data_keeps_every_caption_and_skips_bad_images(vae_run, tmp_path):
    from PIL import Image

    root = tmp_path / "imgs"
    root.mkdir()
    for i in range(7):
        Image.new("RGB", (40, 36), (30 * i, 100, 200 - 20 * i)).save(root / f"{i}.png")
        (root / f"{i}.txt").write_text(f"thing number {i}\nanother caption {i}\n")
    (root / "3.png").write_bytes(b"not a png")  # corrupt: skipped and counted
    with pytest.warns(UserWarning, match="skipped 1"):
        trainer = Trainer(_cfg(vae_run, tmp_path / "f", data=f"folder:{root}", max_items=0, steps=2))
    assert len(trainer.train_cache) == 5  # 7 items, 1 held out, 1 corrupt
    assert trainer.train_cache.ptr.diff().tolist() == [2] * 5
    assert trainer.train()["step"] == 2


def test_learning_rate_schedule():
    from dalle_fast.training.schedules import Budget, warmup_cosine

    def learning_rate(step, cfg, seconds=0.0):
        progress = Budget(cfg.steps, cfg.time_limit).progress(step, seconds)
        return warmup_cosine(step, progress, cfg.lr, cfg.lr_end, cfg.warmup, cfg.steps)

    cfg = DALLETrainConfig(lr=1e-3, lr_end=1e-5, warmup=10, steps=110)
    assert learning_rate(0, cfg) == pytest.approx(1e-4)
    assert learning_rate(9, cfg) == pytest.approx(1e-3)
    assert learning_rate(60, cfg) == pytest.approx((1e-3 + 1e-5) / 2)
    assert learning_rate(110, cfg) == pytest.approx(1e-5)
    timed = DALLETrainConfig(lr=1e-3, lr_end=1e-5, warmup=10, steps=10_000, time_limit=100.0)
    # Cut short by the clock, the decay follows the time: half-way in time (after the warm-up's 0.1%),
    # half-way down.
    assert learning_rate(20, timed, seconds=50.05) == pytest.approx((1e-3 + 1e-5) / 2)
    assert learning_rate(20, timed, seconds=100.0) == pytest.approx(1e-5)


def test_resblock_scaling_path_resumes_exactly(vae_run, tmp_path):
    """The fp16 path's machinery (per-resblock scales, BlockAdamW, the scaler's state in the checkpoint),
    run in fp32 on the CPU."""
    a, b = tmp_path / "a", tmp_path / "b"
    fp32 = dict(resblock_scaling=True, bpe_dropout=0.0, precision="fp32")
    train_dalle(_cfg(vae_run, a, **fp32))
    train_dalle(_cfg(vae_run, b, **fp32), stop_at=3)
    # Resumed without the scaling (as a fp16 GPU run resumed in fp32 on a CPU would be): a clear refusal.
    with pytest.raises(ValueError, match=r"trained with precision fp32 \(with per-resblock gradient scaling\)"):
        Trainer(_cfg(vae_run, b, bpe_dropout=0.0, precision="fp32", resume=True))
    trainer = Trainer(_cfg(vae_run, b, resume=True, **fp32))
    assert trainer.scaler is not None and trainer.step == 3
    assert (trainer.scaler.scales > 2.0**13).all()  # three clean updates grew every scale
    trainer.train()
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow
@pytest.mark.parametrize("resblock_scaling", [False, True])  # True: what fp16 on CUDA always runs
def test_compiled_training(vae_run, tmp_path, resblock_scaling):
    cfg = _cfg(vae_run, tmp_path / "compiled", steps=2, compile=True, resblock_scaling=resblock_scaling)
    metrics = train_dalle(cfg)
    assert metrics["step"] == 2 and metrics["loss"] == metrics["loss"]


def test_cuda_device_checks_without_a_gpu(monkeypatch, pretend_gpu):
    """The device checks that apply on CUDA, reached here by pretending one is present (resolve_device
    touches no GPU): a preset whose head_dim has no CUDA kernel is refused up front, with what to do."""
    from dalle_fast.ops import support as ops

    cpu_auto = "bf16" if cpu_has_native_bf16() else "fp32"  # the policy's auto on a CPU
    pretend_gpu()
    with pytest.raises(ValueError, match=r"head_dim 16 has no CUDA attention kernel.*run on the CPU"):
        resolve_device(DALLETrainConfig(preset="micro", device="cuda"))
    assert resolve_device(DALLETrainConfig(preset="micro", device="cuda", attention="dense")) == (
        torch.device("cuda"),
        "fp16",
    )
    assert resolve_device(DALLETrainConfig(preset="tiny", device="auto")) == (torch.device("cuda"), "fp16")
    with pytest.warns(UserWarning, match="running on the CPU, since head_dim 16"):
        assert resolve_device(DALLETrainConfig(preset="micro", device="auto")) == (torch.device("cpu"), cpu_auto)
    # Sharded (FSDP) runs take bf16: per-resblock scaling does not combine with sharding.
    assert resolve_device(DALLETrainConfig(preset="tiny", device="auto", shard=True)) == (torch.device("cuda"), "bf16")
    with pytest.raises(ValueError, match="precision fp32 on CUDA"):
        resolve_device(DALLETrainConfig(preset="tiny", device="cuda", precision="fp32"))
    # A GPU the kernels cannot use: auto trains on the CPU and says why; an explicit cuda is refused.
    for why in ("compute capability 8.0", "built without CUDA kernels"):
        if why.startswith("compute"):
            pretend_gpu((7, 5))
        else:
            monkeypatch.setattr(ops, "CUDA_BACKEND", None)
            monkeypatch.setattr(ops, "_NO_BACKEND_REASON", "dalle_fast was built without CUDA kernels")
        with pytest.warns(UserWarning, match=why):
            assert resolve_device(DALLETrainConfig(preset="tiny", device="auto")) == (torch.device("cpu"), cpu_auto)
        with pytest.raises(ValueError, match=why):
            resolve_device(DALLETrainConfig(preset="tiny", device="cuda"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device(DALLETrainConfig(preset="micro", device="auto")) == (torch.device("cpu"), cpu_auto)


@pytest.mark.skipif(cuda_unusable_reason() is not None, reason="needs a GPU this build's CUDA kernels run on")
def test_cuda_main_job(tmp_path):
    """Every stage of the main job on the GPU: dVAE, transformer (fp16, per-resblock scaling), reranker,
    and the reranked samples."""
    cfg = PipelineConfig(
        root=str(tmp_path), name="gpu", vae_steps=2, dalle_steps=2, clip_steps=2, items=32, captions=2, rerank=3,
        device="cuda",
    )  # fmt: skip
    where = run_pipeline(cfg)
    run = tmp_path / "gpu"
    assert (run / "samples.png").exists() and where["samples"] == str(run / "samples.png")
    state = torch.load(run / "dalle" / "state.pt", weights_only=False)
    assert state["precision"] == "fp16" and "scaler" in state


@pytest.mark.skipif(cuda_unusable_reason() is not None, reason="needs a GPU this build's CUDA kernels run on")
def test_cuda_fp16_training(vae_run, tmp_path):
    metrics = train_dalle(_cfg(vae_run, tmp_path / "cuda", steps=4, device="cuda", preset="tiny"))
    assert metrics["step"] == 4 and torch.isfinite(torch.tensor(metrics["loss"]))
