"""A safetensors file read and written with the Python standard library: the scripts
that make the bundled files and fixtures (`make_image_folder.py`, `safetensors_to_pth.py`,
`make_pth_fixtures.py`, `make_sr_benchmark.py`, `make_sr_fixtures.py`,
`make_swinir_fixtures.py`) share it."""

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


ITEM_SIZE = {"BOOL": 1, "U8": 1, "I8": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
             "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


def safetensors_bytes(tensors, metadata=None, keep_order=False):
    """The bytes of a safetensors file holding `tensors`, `{name: (dtype, shape, raw
    little-endian bytes)}` (as `read_safetensors` returns them), with the free-form
    string map `metadata` as `__metadata__`. Laid out as the `safetensors` library lays
    them out, so the same tensors give the same bytes: the tensors sorted by item size
    (largest first) then by name (with `keep_order`, in the dict's order), stored back to
    back in that order; the header compact JSON (no spaces) padded with spaces to a
    multiple of 8 bytes."""
    order = list(tensors) if keep_order else sorted(tensors, key=lambda k: (-ITEM_SIZE[tensors[k][0]], k))
    header, body, offset = {}, [], 0
    if metadata:
        header["__metadata__"] = metadata
    for name in order:
        dtype, shape, raw = tensors[name]
        count = 1
        for d in shape:
            count *= d
        if len(raw) != count * ITEM_SIZE[dtype]:
            raise ValueError(f"{name}: {len(raw)} bytes for {dtype} {list(shape)}")
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + len(raw)]}
        body.append(raw)
        offset += len(raw)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(body)


def write_safetensors(path, tensors, metadata=None):
    """Writes `[(name, dtype, shape, raw little-endian bytes)]` in that order with
    `metadata` (see `safetensors_bytes`)."""
    named = {name: (dtype, shape, raw) for name, dtype, shape, raw in tensors}
    with open(path, "wb") as f:
        f.write(safetensors_bytes(named, metadata, keep_order=True))
