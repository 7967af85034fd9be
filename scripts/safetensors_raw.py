"""A safetensors file read (and written) with the Python standard library: the scripts
that make the bundled files and fixtures (`make_image_folder.py`, `safetensors_to_pth.py`,
`make_pth_fixtures.py`, `make_sr_fixtures.py`) share it."""

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


def write_safetensors(path, tensors, metadata=None):
    """Writes `[(name, dtype, shape, raw little-endian bytes)]` in that order (the
    header lists them so, data back to back), with the free-form string map `metadata`
    as `__metadata__`; the header is padded with spaces to a multiple of 8 bytes."""
    header = {}
    if metadata:
        header["__metadata__"] = metadata
    at = 0
    for name, dtype, shape, raw in tensors:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [at, at + len(raw)]}
        at += len(raw)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for _, _, _, raw in tensors:
            f.write(raw)
