"""OpenAI's released dVAE (encoder.pkl, decoder.pkl) as a dVAE run of this project.

The released files are whole modules saved with torch.save: DALL-E 0.1's `dall_e.encoder.Encoder` and
`dall_e.decoder.Decoder`, built from its `dall_e.utils.Conv2d` (parameters `w`, `b`), EncoderBlock /
DecoderBlock and torch.nn containers and layers. They are read with `torch_pickle.read_torch_file`, which
admits exactly those classes as inert stand-ins and runs nothing from the file; the module tree is then
checked against the architecture this project builds (`DVAEConfig`, the `openai` preset at the released
size) and its parameters renamed into a `DVAE` state dict.

What the files do not say, and is assumed: the image size the model was trained at (256, the paper's; a
dVAE is convolutional and encodes any multiple of 8); how the decoder's last three output maps were
trained (they are taken to be the logit-Laplace ln b of the paper, docs/openai_dvae.md).
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import torch

from dalle_fast.errors import FieldError
from dalle_fast.files import check_writable, file_sha256
from dalle_fast.models.dvae import DVAE, DVAEConfig
from dalle_fast.runs.checkpoint import save_run
from dalle_fast.runs.torch_pickle import Stub, read_torch_file

ENCODER, DECODER = "dall_e.encoder.Encoder", "dall_e.decoder.Decoder"
CONV = "dall_e.utils.Conv2d"
NN = "torch.nn.modules."
CLASSES = (
    ENCODER, DECODER, "dall_e.encoder.EncoderBlock", "dall_e.decoder.DecoderBlock", CONV,
    NN + "container.Sequential", NN + "activation.ReLU", NN + "pooling.MaxPool2d", NN + "upsampling.Upsample",
    NN + "linear.Identity",
)  # fmt: skip
SOURCE = "openai-dvae"  # config.json's train.source of a converted run


def _walk(module: Stub, prefix: str, kinds: dict[str, Stub], params: dict[str, torch.Tensor]) -> None:
    """kinds: dotted module path -> its stub; params: dotted parameter name -> tensor."""
    state = getattr(module, "state", None)
    if not isinstance(state, dict):
        raise ValueError(f"{prefix or 'the root'} ({module.qualname}) holds no module state")
    kinds[prefix] = module
    for name, p in (state.get("_parameters") or {}).items():
        if isinstance(p, torch.Tensor):
            params[f"{prefix}.{name}" if prefix else name] = p
    for name, child in (state.get("_modules") or {}).items():
        if not isinstance(child, Stub):
            raise ValueError(f"{prefix}.{name} is not a module")
        _walk(child, f"{prefix}.{name}" if prefix else name, kinds, params)


def read_half(path: str | Path, want: str) -> tuple[dict, dict[str, Stub], dict[str, torch.Tensor]]:
    """(the root module's attributes, its module tree, its parameters) of encoder.pkl (want=ENCODER) or
    decoder.pkl (DECODER); ValueError naming the file when it holds something else."""
    root = read_torch_file(path, CLASSES)
    what = getattr(root, "qualname", type(root).__name__)
    if what != want:
        swapped = " (the encoder and decoder files swapped?)" if what in (ENCODER, DECODER) else ""
        raise ValueError(f"{path} holds a {what}, expected a {want}{swapped}")
    kinds: dict[str, Stub] = {}
    params: dict[str, torch.Tensor] = {}
    _walk(root, "", kinds, params)
    return root.state, kinds, params


def _int_attr(state: dict, name: str, path) -> int:
    value = state.get(name)
    if not isinstance(value, int):
        raise ValueError(f"{path}: its {name} is {value!r}, expected an int")
    return value


def _openai_name(ours: str) -> str:
    """A DVAE parameter name (without its encoder./decoder. prefix) -> the released module's."""
    leaf = {"weight": "w", "bias": "b"}
    if m := re.fullmatch(r"(input|output)\.(weight|bias)", ours):
        return f"blocks.{m[1]}{'.conv' if m[1] == 'output' else ''}.{leaf[m[2]]}"
    if m := re.fullmatch(r"blocks\.(group_\d+\.block_\d+)\.id_path\.(weight|bias)", ours):
        return f"blocks.{m[1]}.id_path.{leaf[m[2]]}"
    if m := re.fullmatch(r"blocks\.(group_\d+\.block_\d+)\.res_path\.(\d+)\.(weight|bias)", ours):
        return f"blocks.{m[1]}.res_path.conv_{(int(m[2]) + 1) // 2}.{leaf[m[3]]}"
    raise AssertionError(f"no released name for {ours}")


def _check_layers(path, kinds: dict[str, Stub], resample: str, cfg: DVAEConfig) -> None:
    """The layers between the convolutions are the ones the DVAE applies: ReLUs, 2x2 max-pools (encoder) or
    nearest 2x upsampling (decoder), and each block's residual gain 1 / n_layers^2."""
    gain = 1.0 / (cfg.groups * cfg.blocks_per_group) ** 2
    for name, stub in kinds.items():
        s, leaf = stub.state, name.rsplit(".", 1)[-1]
        if stub.qualname == NN + "activation.ReLU" or stub.qualname == CONV:
            continue
        if stub.qualname == NN + "pooling.MaxPool2d":
            ok = resample == "pool" and s.get("kernel_size") in (2, (2, 2)) and s.get("stride") in (2, (2, 2), None)
            ok = ok and s.get("padding") in (0, (0, 0)) and s.get("dilation") in (1, (1, 1)) and not s.get("ceil_mode")
        elif stub.qualname == NN + "upsampling.Upsample":
            ok = resample == "upsample" and s.get("mode") == "nearest" and s.get("scale_factor") in (2, 2.0, (2.0, 2.0))
        elif stub.qualname.endswith("Block"):
            ok = isinstance(s.get("post_gain"), float) and abs(s["post_gain"] - gain) <= 1e-12 * gain
        else:  # containers and the identity shortcut
            ok = stub.qualname in (NN + "container.Sequential", NN + "linear.Identity", ENCODER, DECODER)
        if not ok:
            raise ValueError(f"{path}: {name or 'the root'} ({stub.qualname}, {leaf}) is not the released layer")


def _state_dict(path, half: str, cfg: DVAEConfig, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The DVAE's `half` (encoder | decoder) parameters from the released ones; ValueError naming the file
    and the parameter when one is missing, extra or of another shape."""
    want = {k[len(half) + 1 :]: v for k, v in DVAE(cfg).state_dict().items() if k.startswith(half + ".")}
    out, used = {}, set()
    for ours, ref in want.items():
        theirs = _openai_name(ours)
        if theirs not in params:
            raise ValueError(f"{path}: parameter {theirs} is missing")
        p = params[theirs]
        if tuple(p.shape) != tuple(ref.shape):
            raise ValueError(f"{path}: {theirs} is {tuple(p.shape)}, expected {tuple(ref.shape)}")
        out[f"{half}.{ours}"] = p.to(torch.float32).contiguous()
        used.add(theirs)
    if extra := sorted(set(params) - used):
        raise ValueError(f"{path}: parameters this architecture has no place for: {', '.join(extra[:4])}")
    return out


def _groups(kinds: dict[str, Stub]) -> int:
    return sum(1 for k in kinds if re.fullmatch(r"blocks\.group_\d+", k))


def _blocks(kinds: dict[str, Stub]) -> int:
    return sum(1 for k in kinds if re.fullmatch(r"blocks\.group_1\.block_\d+", k))


def convert_openai_dvae(encoder: str | Path, decoder: str | Path, image_size: int = 256) -> tuple[DVAE, dict]:
    """(the DVAE in eval mode, a description of the source) from the released encoder.pkl and decoder.pkl.
    ValueError naming the file for a damaged, foreign or refused file, and naming both values where the two
    halves disagree (codebook, width, blocks)."""
    enc_state, enc_kinds, enc_params = read_half(encoder, ENCODER)
    dec_state, dec_kinds, dec_params = read_half(decoder, DECODER)
    enc = {n: _int_attr(enc_state, n, encoder) for n in ("n_hid", "n_blk_per_group", "vocab_size", "input_channels")}
    dec = {n: _int_attr(dec_state, n, decoder) for n in ("n_hid", "n_blk_per_group", "vocab_size", "n_init")}
    dec["output_channels"] = _int_attr(dec_state, "output_channels", decoder)
    enc["groups"], dec["groups"] = _groups(enc_kinds), _groups(dec_kinds)
    for name in ("vocab_size", "n_hid", "n_blk_per_group", "groups"):
        if enc[name] != dec[name]:
            raise ValueError(
                f"the encoder and decoder are not one dVAE: {name} is {enc[name]} in {encoder} and {dec[name]} in "
                f"{decoder}"
            )
    if enc["input_channels"] != 3 or dec["output_channels"] != 3:
        raise ValueError(
            f"expected RGB models, got {enc['input_channels']} input channels ({encoder}) and "
            f"{dec['output_channels']} output channels ({decoder})"
        )
    if _blocks(enc_kinds) != enc["n_blk_per_group"] or _blocks(dec_kinds) != dec["n_blk_per_group"]:
        raise ValueError(f"{encoder}, {decoder}: the block count of the first group is not n_blk_per_group")
    cfg = DVAEConfig(
        groups=enc["groups"], blocks_per_group=enc["n_blk_per_group"], hidden=enc["n_hid"],
        codebook=enc["vocab_size"], image_size=image_size, decoder_init=dec["n_init"], encoder_input="phi",
    )  # fmt: skip
    _check_layers(encoder, enc_kinds, "pool", cfg)
    _check_layers(decoder, dec_kinds, "upsample", cfg)
    sd = {**_state_dict(encoder, "encoder", cfg, enc_params), **_state_dict(decoder, "decoder", cfg, dec_params)}
    model = DVAE(cfg)
    model.load_state_dict(sd)
    source = {"source": SOURCE}
    for name, p in (("encoder", encoder), ("decoder", decoder)):
        source[name] = str(Path(p).resolve())
        source[f"{name}_sha256"] = file_sha256(p)
    return model.eval(), source


def write_dvae_run(out: str | Path, model: DVAE, train: dict) -> Path:
    """A dVAE run folder as `train vae` writes one (config.json, model.safetensors, ema.safetensors,
    state.pt) at step 0, with `train` as config.json's train entry. Refuses a folder that holds a run."""
    out = Path(out)
    if (out / "config.json").exists() or (out / "state.pt").exists():
        raise FieldError("out", f"{out} already holds a run: choose another folder")
    check_writable(out)
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    meta = {"train": train, "dvae": dataclasses.asdict(model.cfg), "step": 0}
    save_run(out, {"model": sd, "ema": sd}, {"step": 0, "source": train.get("source")}, meta)
    return out
