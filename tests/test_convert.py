"""Converting OpenAI's released dVAE: parity with DALL-E 0.1's own modules (when that package is installed:
the openai-parity extra), the restricted reader's refusals, clear errors for damaged or mismatched files,
and a converted dVAE under stage 2."""

import io
import json
import math
import os
import pickle
import zipfile

import pytest
import torch

from dalle_fast.models.dvae import DVAE, PRESETS, DVAEConfig
from dalle_fast.runs.openai_dvae import convert_openai_dvae
from dalle_fast.runs.torch_pickle import RefusedGlobal, read_torch_file

# The smallest sizes DALL-E 0.1's validators allow: n_hid >= 64, vocab_size >= 512 (4 groups, fixed).
SMALL = dict(n_hid=64, n_blk_per_group=2, vocab_size=512)


def _randomise(module: torch.nn.Module, seed: int) -> None:
    """Every parameter random, biases included (the released Conv2d starts its biases at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            scale = 1 / math.sqrt(p[0].numel()) if p.dim() > 1 else 0.1
            p.copy_(torch.randn(p.shape, generator=g) * scale)


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """DALL-E 0.1's Encoder and Decoder at small sizes, random, saved whole as the released files are."""
    pytest.importorskip("dall_e", reason="the DALL-E 0.1 package (openai-parity extra) is not installed")
    from dall_e.decoder import Decoder
    from dall_e.encoder import Encoder

    root = tmp_path_factory.mktemp("released")
    enc, dec = Encoder(**SMALL), Decoder(n_init=32, **SMALL)
    _randomise(enc, 0)
    _randomise(dec, 1)
    torch.save(enc, root / "encoder.pkl")
    torch.save(dec, root / "decoder.pkl")
    other = Decoder(n_init=32, n_hid=64, n_blk_per_group=2, vocab_size=1024)
    torch.save(other, root / "decoder_1024.pkl")
    return root, enc.eval(), dec.eval()


def test_parity_with_the_released_modules(released, tmp_path):
    from dall_e.utils import map_pixels, unmap_pixels

    from dalle_fast.convert import main

    root, enc, dec = released
    out = tmp_path / "run"
    assert main(["openai-dvae", str(root / "encoder.pkl"), str(root / "decoder.pkl"), "--out", str(out),
                 "--image-size", "32"]) == 0  # fmt: skip
    import dalle_fast

    model = dalle_fast.load_dvae(out)
    assert model.cfg == DVAEConfig(
        groups=4, blocks_per_group=2, hidden=64, codebook=512, image_size=32, decoder_init=32, encoder_input="phi"
    )
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want_logits = enc(map_pixels(x))
        got_logits = model.logits(x)
        torch.testing.assert_close(got_logits, want_logits, rtol=0, atol=1e-5)
        codes = model.encode(x)
        assert torch.equal(codes, want_logits.argmax(1))
        assert codes.unique().numel() > 1
        # Decoding: the encoded codes, and random ones that reach across the codebook.
        for c in (codes, torch.randint(0, 512, (3, 4, 4), generator=torch.Generator().manual_seed(3))):
            z = torch.nn.functional.one_hot(c, 512).permute(0, 3, 1, 2).float()
            want = unmap_pixels(torch.sigmoid(dec(z)[:, :3]))
            torch.testing.assert_close(model.decode(c), want, rtol=0, atol=1e-6)
        # The log-scale maps come through too (channels 3-5), and soft codes decode alike.
        soft = torch.softmax(want_logits, 1)
        mu, ln_b = model.decode_soft(soft)
        torch.testing.assert_close(torch.cat([mu, ln_b], 1), dec(soft), rtol=0, atol=1e-5)
    meta = json.loads((out / "config.json").read_text())
    assert meta["step"] == 0 and meta["train"]["source"] == "openai-dvae" and len(meta["train"]["encoder_sha256"]) == 64


def test_the_openai_preset_is_the_released_shape():
    pytest.importorskip("dall_e", reason="the DALL-E 0.1 package (openai-parity extra) is not installed")
    from dall_e.decoder import Decoder
    from dall_e.encoder import Encoder

    ours = DVAE(PRESETS["openai"])
    sizes = [p.numel() for p in ours.parameters()]
    theirs = [p.numel() for m in (Encoder(), Decoder()) for p in m.parameters()]
    assert sorted(sizes) == sorted(theirs) and sum(sizes) == sum(theirs)


def test_errors_for_mismatched_files(released):
    root, _, _ = released
    enc, dec = root / "encoder.pkl", root / "decoder.pkl"
    with pytest.raises(ValueError, match=r"holds a dall_e.decoder.Decoder, expected a dall_e.encoder.Encoder.*swapped"):
        convert_openai_dvae(dec, enc)
    with pytest.raises(ValueError, match=r"vocab_size is 512 in .*encoder.pkl and 1024 in .*decoder_1024.pkl"):
        convert_openai_dvae(enc, root / "decoder_1024.pkl")


def _zip_of(tmp_path, name: str, payload: bytes) -> str:
    """A torch.save-like archive whose data.pkl is `payload`."""
    path = tmp_path / name
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", payload)
        z.writestr("archive/byteorder", "little")
    return str(path)


class _Payload:
    """Unpickling this calls os.system (the attack a torch.load of an untrusted file allows)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Eval:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (eval, (f"open({str(self.marker)!r}, 'w').write('ran')",))


@pytest.mark.parametrize("attack", [_Payload, _Eval])
def test_a_malicious_pickle_is_refused_and_does_not_run(tmp_path, attack):
    marker = tmp_path / "marker"
    payload = pickle.dumps({"_modules": {"x": attack(marker)}}, protocol=2)
    torch_file = tmp_path / "whole.pkl"
    torch.save({"x": attack(marker)}, torch_file)  # the same inside a real torch.save archive
    assert not marker.exists()
    for path in (_zip_of(tmp_path, "evil.pkl", payload), str(torch_file)):
        with pytest.raises(RefusedGlobal, match=r"refused global (posix\.system|__builtin__\.eval)") as e:
            read_torch_file(path, ["dall_e.encoder.Encoder"])
        assert str(path) in str(e.value)
        assert not marker.exists()
    with pytest.raises(ValueError, match="refused global"):
        convert_openai_dvae(torch_file, torch_file)
    assert not marker.exists()
    # The same files are what an unrestricted load would run: the check has teeth.
    pickle.loads(payload)
    assert marker.exists()


def test_unknown_classes_are_refused_by_name(tmp_path):
    path = tmp_path / "module.pkl"
    torch.save(torch.nn.Linear(2, 2), path)
    with pytest.raises(RefusedGlobal, match=r"refused global torch\.nn\.modules\.linear\.Linear"):
        read_torch_file(path, ["torch.nn.modules.activation.ReLU"])
    root = read_torch_file(path, ["torch.nn.modules.linear.Linear"])
    assert root.qualname == "torch.nn.modules.linear.Linear" and not isinstance(root, torch.nn.Module)
    torch.testing.assert_close(root.state["_parameters"]["weight"], torch.load(path, weights_only=False).weight.data)


def test_damaged_and_foreign_files(tmp_path, released):
    root, _, _ = released
    data = (root / "encoder.pkl").read_bytes()
    cut = tmp_path / "truncated.pkl"
    cut.write_bytes(data[: len(data) // 2])
    text = tmp_path / "notes.txt"
    text.write_text("not a model\n")
    legacy = tmp_path / "legacy.pkl"
    legacy.write_bytes(pickle.dumps(123, protocol=2))
    for path, message in (
        (cut, "not a torch.save file, or it is truncated"),
        (text, "not a torch.save file"),
        (legacy, "legacy format"),
        (tmp_path / "missing.pkl", "is not a file"),
    ):
        with pytest.raises(ValueError, match=message) as e:
            convert_openai_dvae(path, root / "decoder.pkl")
        assert str(path) in str(e.value)
    # A storage record cut short inside an intact archive.
    bad = tmp_path / "short_storage.pkl"
    with zipfile.ZipFile(root / "encoder.pkl") as z, zipfile.ZipFile(bad, "w") as w:
        for info in z.infolist():
            blob = z.read(info)
            w.writestr(info.filename, blob[:-4] if "/data/" in info.filename else blob)
    with pytest.raises(ValueError, match=r"short_storage.pkl is damaged.*bytes"):
        convert_openai_dvae(bad, root / "decoder.pkl")


def test_cli_errors_are_one_line(tmp_path, released, capsys):
    from dalle_fast.convert import main

    root, _, _ = released
    with pytest.raises(SystemExit) as e:
        main(["openai-dvae", str(root / "decoder.pkl"), str(root / "encoder.pkl"), "--out", str(tmp_path / "r")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "swapped" in err and "Traceback" not in err
    out = tmp_path / "ok"
    args = ["openai-dvae", str(root / "encoder.pkl"), str(root / "decoder.pkl"), "--out", str(out)]
    assert main(args) == 0
    with pytest.raises(SystemExit):
        main(args)  # the folder holds a run now
    assert capsys.readouterr().err.strip().endswith("already holds a run: choose another folder")
    assert main(["nonsense"]) == 2


def test_old_runs_keep_their_architecture():
    """The two new fields default to this project's dVAE: a config.json without them builds today's model."""
    cfg = DVAEConfig(**json.loads(json.dumps({"groups": 3, "blocks_per_group": 1, "hidden": 8, "codebook": 16})))
    model = DVAE(cfg)
    assert model.decoder.input.out_channels == 32 and isinstance(
        model.decoder.blocks.group_1.block_1.id_path, torch.nn.Identity
    )
    x = torch.rand(1, 3, 32, 32)
    centred = DVAE(cfg)
    phi = DVAE(DVAEConfig(**{**cfg.__dict__, "encoder_input": "phi"}))
    phi.load_state_dict(centred.state_dict())
    assert not torch.allclose(centred.logits(x), phi.logits(x))
    with pytest.raises(ValueError, match="encoder_input"):
        DVAEConfig(encoder_input="raw")
    with pytest.raises(ValueError, match="decoder_init"):
        DVAEConfig(decoder_init=-1)


def test_stage_2_on_a_converted_dvae(released, tmp_path):
    """A converted dVAE under the micro transformer: trains, samples, primes."""
    from dalle_fast.convert import main
    from dalle_fast.generate import main as generate
    from dalle_fast.training.dalle import DALLETrainConfig, train_dalle

    root, _, _ = released
    vae = tmp_path / "vae"
    main(["openai-dvae", str(root / "encoder.pkl"), str(root / "decoder.pkl"), "--out", str(vae), "--image-size", "32"])
    dalle = tmp_path / "dalle"
    metrics = train_dalle(DALLETrainConfig(
        vae=str(vae), out=str(dalle), preset="micro", steps=2, batch_size=4, ckpt_every=2, log_every=2, max_items=16,
        val_items=4, samples=1, warmup=1, bpe_variants=0, vocab_size=300, text_len=48, device="cpu", precision="fp32",
    ))  # fmt: skip
    assert metrics["step"] == 2 and math.isfinite(metrics["loss"])
    assert json.loads((dalle / "config.json").read_text())["transformer"]["image_vocab"] == 512
    from PIL import Image

    Image.new("RGB", (32, 32), (200, 40, 40)).save(tmp_path / "prime.png")
    buf = io.StringIO()
    import contextlib

    with contextlib.redirect_stdout(buf):
        assert generate(["--run", str(dalle), "a red circle", "-n", "2", "--prime", str(tmp_path / "prime.png"),
                         "--device", "cpu", "--out", str(tmp_path / "gen")]) == 0  # fmt: skip
    assert json.loads(buf.getvalue())["images"] == 2
