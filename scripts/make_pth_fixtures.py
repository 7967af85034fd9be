#!/usr/bin/env python3
"""Writes the PyTorch checkpoints `tests/pth.rs` reads, with torch itself.

    python3 -m venv /tmp/tv && /tmp/tv/bin/pip install -r scripts/requirements-pth.txt
    /tmp/tv/bin/python scripts/make_pth_fixtures.py tests/pth/cnn_bn.safetensors tests/pth

The input is a small network exported by `ldt` (cnn_bn, channels [4, 8], fc_hidden 16);
its safetensors file is read here without the safetensors package (header length, JSON
header, raw little-endian bytes). The outputs, each from `torch.save` unless said:

- plain.pth: `model.state_dict()` as PyTorch writes it (an OrderedDict with
  `_metadata`, pickle protocol 2, zip format).
- wrapped.pth: a training checkpoint holding the state_dict of a
  DataParallel-wrapped model (`module.` before every key) under `state_dict`, beside
  an epoch, a learning rate, a flag and a list.
- views.pth: pickle protocol 4; no `num_batches_tracked` (state dicts older than
  PyTorch 0.4.1); the first convolution's weight stored transposed-back (non-contiguous
  strides), a bias as a slice at an offset of a larger storage, two biases sharing one
  storage, and the fully connected weights in float64.
- evil.pth: a dict whose pickle calls `os.system` when PyTorch loads it without
  `weights_only=True`; `ldt` must refuse it without running anything.
- legacy.pth: the pre-1.6 format (`_use_new_zipfile_serialization=False`).
- script.pt: a TorchScript archive (`torch.jit.save`), not a state_dict.
"""

import collections
import json
import os
import struct
import sys

import torch

import safetensors_raw


def read_safetensors(path):
    dtypes = {"F32": torch.float32, "I64": torch.int64, "F64": torch.float64}
    out = collections.OrderedDict()
    for name, (dtype, shape, raw) in safetensors_raw.read_safetensors(path).items():
        t = torch.frombuffer(bytearray(raw), dtype=dtypes[dtype])
        out[name] = t.reshape(shape).clone()
    return out


class Evil:
    def __reduce__(self):
        return (os.system, ("echo this-ran > /tmp/ldt-pth-evil-ran",))


def state_dict_like(tensors):
    """An OrderedDict with `_metadata`, as `nn.Module.state_dict()` returns."""
    sd = collections.OrderedDict(tensors)
    sd._metadata = collections.OrderedDict({"": {"version": 1}, "bn1": {"version": 2}})
    return sd


def main():
    src, out = sys.argv[1], sys.argv[2]
    os.makedirs(out, exist_ok=True)
    sd = read_safetensors(src)
    torch.save(state_dict_like(sd), os.path.join(out, "plain.pth"))

    wrapped = {
        "epoch": 3,
        "lr": 0.1,
        "best": True,
        "milestones": [30, 60],
        "state_dict": state_dict_like((f"module.{k}", v) for k, v in sd.items()),
    }
    torch.save(wrapped, os.path.join(out, "wrapped.pth"))

    views = collections.OrderedDict()
    names = list(sd)
    biases = [k for k in names if k.endswith(".bias") and sd[k].dim() == 1]
    shared_a, shared_b = biases[0], biases[1]
    shared = torch.cat([sd[shared_a], sd[shared_b]])
    for k, v in sd.items():
        if k.endswith("num_batches_tracked"):
            continue
        if k == "conv1.weight":
            v = v.permute(3, 2, 1, 0).contiguous().permute(3, 2, 1, 0)
            assert not v.is_contiguous()
        elif k == shared_a:
            v = shared[: sd[shared_a].numel()]
        elif k == shared_b:
            v = shared[sd[shared_a].numel() :]
            assert v.storage_offset() > 0
        elif k.startswith("fc") and k.endswith(".weight"):
            v = v.double()
        elif k.endswith("running_var"):
            big = torch.cat([torch.zeros(5), v])
            v = big[5:]
            assert v.storage_offset() == 5
        views[k] = v
    torch.save(state_dict_like(views), os.path.join(out, "views.pth"), pickle_protocol=4)

    torch.save({"conv1.weight": sd["conv1.weight"], "hook": Evil()}, os.path.join(out, "evil.pth"))
    torch.save(
        state_dict_like(sd),
        os.path.join(out, "legacy.pth"),
        _use_new_zipfile_serialization=False,
    )
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), os.path.join(out, "script.pt"))
    print(f"torch {torch.__version__}: wrote {sorted(os.listdir(out))} in {out}")


if __name__ == "__main__":
    main()
