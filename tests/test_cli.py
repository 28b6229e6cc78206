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
