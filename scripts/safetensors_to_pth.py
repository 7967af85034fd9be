#!/usr/bin/env python3
"""Writes a safetensors file's tensors as a PyTorch checkpoint (`torch.save` of a
state_dict: zip format, pickle protocol 2), with the Python standard library only.

    python3 scripts/safetensors_to_pth.py IN.safetensors OUT.pth

It made `data/pretrained-cnn_bn.pth`, the checkpoint of README's walk-through, from an
`ldt` export (see `data/README.md`). The layout is what torch 2.x writes and
`torch.load(weights_only=True)` reads: `archive/data.pkl` (an OrderedDict of
`torch._utils._rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict())`
with storages as persistent ids `('storage', torch.<T>Storage, key, 'cpu', numel)`),
`archive/data/<key>` (raw little-endian bytes), `archive/byteorder`, `archive/version`.
The torch names are stand-ins registered here only so that pickle records them by name;
nothing of torch is needed to write or to read the file with `ldt`.
"""

import collections
import io
import pickle
import sys
import types
import zipfile

from safetensors_raw import read_safetensors

STORAGES = {"F32": "FloatStorage", "F64": "DoubleStorage", "I64": "LongStorage"}


def stand_ins():
    """Modules `torch` and `torch._utils` with the names the pickle refers to."""
    torch = types.ModuleType("torch")
    utils = types.ModuleType("torch._utils")

    def _rebuild_tensor_v2(*args):
        raise RuntimeError("stand-in: only pickled by name")

    _rebuild_tensor_v2.__module__ = "torch._utils"
    _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
    utils._rebuild_tensor_v2 = _rebuild_tensor_v2
    torch._utils = utils
    for name in STORAGES.values():
        setattr(torch, name, type(name, (), {"__module__": "torch"}))
    sys.modules["torch"] = torch
    sys.modules["torch._utils"] = utils
    return torch, utils


class Storage:
    def __init__(self, kind, key, numel):
        self.kind, self.key, self.numel = kind, key, numel


class Tensor:
    def __init__(self, rebuild, storage, shape):
        self.rebuild, self.storage, self.shape = rebuild, storage, shape

    def __reduce__(self):
        stride, s = [], 1
        for d in reversed(self.shape):
            stride.insert(0, s)
            s *= d
        args = (self.storage, 0, tuple(self.shape), tuple(stride), False, collections.OrderedDict())
        return (self.rebuild, args)


class Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, Storage):
            return ("storage", obj.kind, obj.key, "cpu", obj.numel)
        return None


def main(src, dst):
    tensors = read_safetensors(src)
    torch, utils = stand_ins()
    state = collections.OrderedDict()
    blobs = []
    for key, (name, (dtype, shape, raw)) in enumerate(sorted(tensors.items())):
        kind = getattr(torch, STORAGES[dtype])
        numel = 1
        for d in shape:
            numel *= d
        storage = Storage(kind, str(key), numel)
        state[name] = Tensor(utils._rebuild_tensor_v2, storage, shape)
        blobs.append((str(key), raw))
    buf = io.BytesIO()
    Pickler(buf, protocol=2).dump(state)
    # Entries dated 1980-01-01, so that the same tensors give the same bytes.
    entry = lambda name: zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    with zipfile.ZipFile(dst, "w", compression=zipfile.ZIP_STORED) as z:
        z.writestr(entry("archive/data.pkl"), buf.getvalue())
        z.writestr(entry("archive/byteorder"), "little")
        for key, raw in blobs:
            z.writestr(entry(f"archive/data/{key}"), raw)
        z.writestr(entry("archive/version"), "3\n")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
