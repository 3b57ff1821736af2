"""Read a legacy (pre-1.6) PyTorch `.pth` state dict into numpy arrays, without importing torch.

The file is a sequence of pickles (magic number, protocol, system info, the state dict, the storage keys) followed by
each storage's raw bytes. The unpickler here only rebuilds tensors and ordered dicts: any other global in the file is
refused, which also makes it safe on an untrusted file (a plain `pickle.load` would run whatever the file names).
"""

from __future__ import annotations

import collections
import pickle
import struct
from pathlib import Path

import numpy as np

MAGIC = 0x1950A86A20F9469CFC6C
DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class _Storage:
    def __init__(self, dtype, numel):
        self.dtype, self.numel, self.data = dtype, numel, None


class _StorageType:
    def __init__(self, name):
        self.dtype = DTYPES[name]


class _Tensor:
    """Placeholder until storages are read: the state dict is unpickled before the raw bytes that follow it."""

    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)

    def to_numpy(self) -> np.ndarray:
        item = np.dtype(self.storage.dtype).itemsize
        base = self.storage.data
        if not self.size:
            return base[self.offset : self.offset + 1].reshape(()).copy()
        return np.lib.stride_tricks.as_strided(
            base[self.offset :], shape=self.size, strides=[s * item for s in self.stride]
        ).copy()


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    return _Tensor(storage, offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, hooks=None):
    return data


class RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, f, storages):
        super().__init__(f)
        self.storages = storages

    def find_class(self, module, name):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor_v2
        if (module, name) == ("torch._utils", "_rebuild_parameter"):
            return _rebuild_parameter
        if module == "torch" and name in DTYPES:
            return _StorageType(name)
        raise pickle.UnpicklingError(f"refused global {module}.{name}: only tensors and dicts are allowed")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"refused persistent id {pid!r}")
        storage_type, key, _location, numel, view = pid[1:]
        if view is not None:
            raise pickle.UnpicklingError("storage views are not supported")
        if key not in self.storages:
            self.storages[key] = _Storage(storage_type.dtype, numel)
        return self.storages[key]


def load_state_dict(path: Path) -> collections.OrderedDict[str, np.ndarray]:
    with open(path, "rb") as f:
        if pickle.load(f) != MAGIC:  # plain ints: safe to read with the default unpickler... but be strict anyway
            raise ValueError(f"{path}: not a legacy PyTorch file")
        f.seek(0)
        storages: dict = {}
        header = [RestrictedUnpickler(f, storages).load() for _ in range(3)]  # magic, protocol, sys info
        if header[0] != MAGIC:
            raise ValueError(f"{path}: not a legacy PyTorch file")
        state = RestrictedUnpickler(f, storages).load()
        keys = RestrictedUnpickler(f, storages).load()
        for key in keys:
            st = storages[key]
            (numel,) = struct.unpack("<q", f.read(8))
            raw = f.read(numel * np.dtype(st.dtype).itemsize)
            st.data = np.frombuffer(raw, dtype=st.dtype)
    return collections.OrderedDict((k, v.to_numpy()) for k, v in state.items())
