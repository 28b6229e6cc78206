"""The command lines speak of flags; the library speaks of config fields and paths."""

from dataclasses import dataclass

import pytest

from dalle_fast.cli import flag_message
from dalle_fast.errors import FieldError, field_errors
from dalle_fast.runs.load import load_dvae


@dataclass
class Config:
    batch_size: int = 1
    vae: str = ""


def test_field_errors_become_flags():
    assert flag_message(FieldError("batch_size", "must be >= 2"), Config) == "--batch-size: must be >= 2"
    assert flag_message(ValueError("batch_size must be >= 2, got 1"), Config) == "--batch-size must be >= 2, got 1"
    # A message that does not start with a field is left as it is ("batch" is not a field).
    assert flag_message(ValueError("batch of nothing"), Config) == "batch of nothing"


def test_library_errors_name_the_path_and_the_field(tmp_path):
    with pytest.raises(ValueError) as e:
        load_dvae(tmp_path / "none")
    assert str(tmp_path / "none") in str(e.value) and "--" not in str(e.value)
    with pytest.raises(FieldError) as e, field_errors("vae"):
        load_dvae(tmp_path / "none")
    assert e.value.field == "vae" and flag_message(e.value, Config).startswith(f"--vae: {tmp_path / 'none'}")


@pytest.mark.parametrize(
    "cls_name,kw,match",
    [
        ("vae", {"lr": float("inf")}, "lr: must be a finite number, got inf"),
        ("dalle", {"grad_clip": float("nan")}, "grad_clip: must be a finite number, got nan"),
        ("dalle", {"text_len": 1}, "text_len must be 0"),
        ("clip", {"time_limit": float("inf")}, "time_limit: must be a finite number"),
        ("generate", {"run": "r", "temperature": float("nan")}, "temperature: must be a finite number"),
        ("generate", {"run": "r", "temperature": 1e-45}, "--temperature >= 0.001"),
        ("generate", {"run": "r", "guidance": float("inf")}, "guidance: must be a finite number"),
        ("evaluate", {"run": "r", "guidance": float("inf")}, "guidance: must be a finite number"),
        ("pipeline", {"dalle_minutes": float("nan")}, "dalle_minutes: must be a finite number"),
    ],
)
def test_non_finite_and_out_of_range_settings_are_refused(cls_name, kw, match):
    from dalle_fast.evaluation.fidelity import EvaluateConfig
    from dalle_fast.generate import GenerateConfig
    from dalle_fast.training.clip import CLIPTrainConfig
    from dalle_fast.training.dalle import DALLETrainConfig
    from dalle_fast.training.pipeline import PipelineConfig
    from dalle_fast.training.vae import VAETrainConfig

    cls = {"vae": VAETrainConfig, "dalle": DALLETrainConfig, "clip": CLIPTrainConfig, "generate": GenerateConfig,
           "evaluate": EvaluateConfig, "pipeline": PipelineConfig}[cls_name]  # fmt: skip
    with pytest.raises(ValueError, match=match):
        cls(**kw)


def test_an_unwritable_output_is_refused_before_any_work(tmp_path, capsys):
    from dalle_fast.files import check_writable

    blocked = tmp_path / "file"
    blocked.write_text("a file where a folder should be")
    with pytest.raises(FieldError, match="out: cannot write to"):
        check_writable(blocked / "sub")
    from dalle_fast.train import main

    with pytest.raises(SystemExit):
        main(["vae", "--out", str(blocked / "run"), "--steps", "1"])
    assert "--out: cannot write to" in capsys.readouterr().err


def test_results_are_valid_json_and_runtime_errors_skip_the_usage(tmp_path, capsys):
    import json
    import math

    from dalle_fast.cli import json_line
    from dalle_fast.train import main

    line = json_line({"step": 3, "val_near_miss": math.nan, "loss": 1.23456, "x": math.inf})
    assert json.loads(line) == {"step": 3, "val_near_miss": None, "loss": 1.2346, "x": None}
    args = ["vae", "--out", str(tmp_path / "run"), "--steps", "1", "--batch-size", "2", "--eval-images", "2"]
    assert main(args) == 0
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(args)  # the folder holds a run: a clear error, no usage text above it
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--out: " in err and "already holds a run" in err and "usage:" not in err


def test_auto_precision_is_one_rule(monkeypatch):
    """auto on a CPU: bf16 where the CPU multiplies it in hardware, else fp32 (training and the main job
    alike); on CUDA fp16, or bf16 when sharded."""
    import torch

    from dalle_fast.ops import device as policy

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for native, want in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(policy, "cpu_has_native_bf16", lambda native=native: native)
        assert policy.choose_precision("auto", cpu) == want
    assert policy.choose_precision("auto", cuda) == "fp16"
    assert policy.choose_precision("auto", cuda, sharded=True) == "bf16"
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        policy.choose_precision("fp16", cpu)


def test_serve_without_its_extra_names_the_extra(monkeypatch, tmp_path, capsys):
    """The core package imports no web framework; a missing one is a usage error naming the extra."""
    import subprocess
    import sys

    from dalle_fast.serve import main

    check = "import sys, dalle_fast.serve; assert not {'starlette', 'uvicorn'} & set(sys.modules)"
    subprocess.run([sys.executable, "-c", check], check=True)  # importing the module pulls in no framework
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # import uvicorn now raises ImportError
    with pytest.raises(SystemExit) as e:
        main(["--run", str(tmp_path)])
    assert e.value.code == 2
    assert "optional extra 'serve' (uvicorn is missing): pip install -e \".[serve]\"" in capsys.readouterr().err
