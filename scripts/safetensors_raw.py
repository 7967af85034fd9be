"""A safetensors file read with the Python standard library: the scripts that make the
bundled files and fixtures (`make_image_folder.py`, `safetensors_to_pth.py`,
`make_pth_fixtures.py`) share it."""

import json
import struct


def read_safetensors(path):
    """`{name: (dtype, shape, raw little-endian bytes)}` in the header's order (the
    free-form `__metadata__` left out)."""
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    body = data[8 + n :]
    out = {}
    for name, h in header.items():
        if name == "__metadata__":
            continue
        a, b = h["data_offsets"]
        out[name] = (h["dtype"], h["shape"], body[a:b])
    return out
