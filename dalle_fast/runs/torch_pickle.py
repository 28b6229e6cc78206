"""Reading a whole-module `torch.save` file without running any code from it.

A `torch.save`d module is a zip archive: `<name>/data.pkl` (a pickle of the module object) and one record
per tensor storage, `<name>/data/<key>`. Unpickling runs whatever the pickle names: `torch.load` with
`weights_only=False` imports the module's classes and can be made to call any function (os.system, eval).
This reader admits a short list of globals and nothing else:

- tensors: the storage types (torch.FloatStorage, ...), torch._utils._rebuild_tensor_v2 and
  _rebuild_parameter, replaced by functions of this module that check the offsets and shapes against the
  storage they index;
- containers: collections.OrderedDict, builtins.set; torch.device (kept as its string);
- the module classes a caller names (e.g. "dall_e.utils.Conv2d", "torch.nn.modules.activation.ReLU"),
  each replaced by an inert stand-in (`Stub`) that only keeps the state the pickle gives it.

Any other global is refused (`RefusedGlobal`, naming it) before it is imported, so nothing runs. Storages
are read from the archive by this module (persistent_load), never through torch's loader. The legacy
(pre-zip, torch < 1.6) format is not read.
"""

from __future__ import annotations

import io
import pickle
import zipfile
from collections import OrderedDict
from pathlib import Path

import torch

# torch.<Name>Storage -> the dtype of its elements (the storage types a tensor's pickle names).
STORAGE_DTYPES = {
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


class RefusedGlobal(ValueError):
    """The pickle names a global this reader does not admit (str() says which)."""


class Stub:
    """Inert stand-in for a pickled object of an admitted class: `qualname` says which class the file
    named, `state` holds what the pickle gave it (a module's __dict__), and it has no other behaviour."""

    qualname = ""

    def __init__(self, *args):
        self.args = args  # only reached through a REDUCE of the class, which torch.save does not write

    def __setstate__(self, state):
        self.state = state

    def __repr__(self) -> str:
        return f"<stub of {self.qualname}>"


class _StorageType:
    """What a torch.<Name>Storage global stands for in a persistent id: the dtype of its elements."""

    def __init__(self, name: str):
        self.name, self.dtype = name, STORAGE_DTYPES[name]


def _ints(value, what: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or not all(isinstance(v, int) and v >= 0 for v in value):
        raise ValueError(f"{what} must be a tuple of ints >= 0, got {value!r}")
    return tuple(value)


def _rebuild_tensor(storage, offset, size, stride, *_ignored) -> torch.Tensor:
    """torch._utils._rebuild_tensor_v2's job (requires_grad, hooks and metadata ignored): a view of the
    storage, checked to lie inside it."""
    if not isinstance(storage, torch.Tensor) or storage.dim() != 1:
        raise ValueError("a tensor rebuild names no storage")
    if not isinstance(offset, int) or offset < 0:
        raise ValueError(f"a tensor's storage offset must be an int >= 0, got {offset!r}")
    size, stride = _ints(size, "a tensor's size"), _ints(stride, "a tensor's stride")
    if len(size) != len(stride):
        raise ValueError(f"a tensor's size {size} and stride {stride} differ in length")
    if all(size):
        last = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
        if last >= storage.numel():
            raise ValueError(f"a tensor of size {size} at offset {offset} overruns its storage ({storage.numel()})")
    return storage.as_strided(size, stride, offset).clone()


def _rebuild_parameter(data, *_ignored) -> torch.Tensor:
    """torch._utils._rebuild_parameter's job: the plain tensor (requires_grad and hooks ignored)."""
    if not isinstance(data, torch.Tensor):
        raise ValueError("a parameter rebuild names no tensor")
    return data


def _device(name, *_ignored) -> str:
    if not isinstance(name, str):
        raise ValueError(f"a device must be named by a string, got {name!r}")
    return name


ADMITTED = {
    ("collections", "OrderedDict"): OrderedDict,
    ("builtins", "set"): set,
    ("__builtin__", "set"): set,  # protocol 2 writes Python 2's name
    ("torch", "device"): _device,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): _StorageType(name) for name in STORAGE_DTYPES},
}


class _Unpickler(pickle.Unpickler):
    def __init__(self, data: bytes, stubs: dict[tuple[str, str], type], read_storage):
        super().__init__(io.BytesIO(data))
        self.stubs, self.read_storage = stubs, read_storage

    def find_class(self, module: str, name: str):
        found = ADMITTED.get((module, name)) or self.stubs.get((module, name))
        if found is None:
            raise RefusedGlobal(f"refused global {module}.{name}: not something a saved model holds")
        return found

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise ValueError(f"unknown persistent id {pid!r:.80}")
        _, kind, key, _location, numel = pid[:5]
        if not isinstance(kind, _StorageType) or not isinstance(key, str) or not isinstance(numel, int):
            raise ValueError(f"malformed storage reference {pid!r:.80}")
        return self.read_storage(key, kind.dtype, numel)


def stub_classes(names: list[str] | tuple[str, ...]) -> dict[tuple[str, str], type]:
    """ "package.module.Class" -> (module, Class): a Stub subclass of that name (never the class itself)."""
    out = {}
    for full in names:
        module, _, name = full.rpartition(".")
        out[(module, name)] = type(name, (Stub,), {"qualname": full})
    return out


def read_torch_file(path: str | Path, classes: list[str] | tuple[str, ...]) -> object:
    """The object a `torch.save` zip file holds, with tensors as plain CPU tensors and every object of the
    named classes as a Stub. ValueError naming the file when it is not such a file, is truncated or names
    a global outside the admitted list (RefusedGlobal)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path} is not a file")
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            head = f.read(2)
        if head[:1] == b"\x80":
            raise ValueError(
                f"{path} is a pickle outside a zip archive (torch's legacy format, or not a torch file): not read"
            )
        raise ValueError(f"{path} is not a torch.save file, or it is truncated (no zip archive in it)")
    try:
        with zipfile.ZipFile(path) as z:
            return _read_archive(path, z, stub_classes(classes))
    except RefusedGlobal as e:
        raise RefusedGlobal(f"{path}: {e}") from None
    except (
        zipfile.BadZipFile, pickle.UnpicklingError, EOFError, AttributeError, IndexError, KeyError, TypeError,
        ValueError, RuntimeError, OverflowError,
    ) as e:  # fmt: skip
        raise ValueError(f"{path} is damaged or not a saved model: {type(e).__name__}: {e}") from None


def _read_archive(path: Path, z: zipfile.ZipFile, stubs: dict) -> object:
    pickles = [n for n in z.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
        raise ValueError(f"expected one <name>/data.pkl record, found {len(pickles)}")
    prefix = pickles[0][: -len("data.pkl")]
    if f"{prefix}byteorder" in z.namelist() and z.read(f"{prefix}byteorder").strip() != b"little":
        raise ValueError("saved on a big-endian machine: not read")
    storages: dict[str, torch.Tensor] = {}

    def read_storage(key: str, dtype: torch.dtype, numel: int) -> torch.Tensor:
        if key not in storages:
            info = z.getinfo(f"{prefix}data/{key}")
            want = numel * torch.empty((), dtype=dtype).element_size()
            if info.file_size != want:
                raise ValueError(f"storage {key} holds {info.file_size} bytes, its reference says {want}")
            raw = bytearray(z.read(info))
            storages[key] = torch.frombuffer(raw, dtype=dtype) if want else torch.empty(0, dtype=dtype)
        if storages[key].dtype != dtype:
            raise ValueError(f"storage {key} is read as two dtypes")
        return storages[key]

    return _Unpickler(z.read(pickles[0]), stubs, read_storage).load()
