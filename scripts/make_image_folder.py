#!/usr/bin/env python3
"""Writes `data/digit-folders/`, the image folder of README's walk-through, from the
bundled RotatedMNIST-5k data, with the Python standard library only:

    python3 scripts/make_image_folder.py data/rotmnist5k data/digit-folders

Layout: `<domain>/<class>/<split><n>.png` (8-bit grayscale PNG, 28x28), the domains
rot30 and rot45 (the walk-through trains on them) and rot75 (held out), the classes
spelled out and numbered (`0_zero` .. `9_nine`: sorted as the digits, so that label k is
digit k, as the pretrained head expects), the first PER_CLASS examples of each class
from each domain's train split, then its test split. Deterministic: the same bytes on
every run.
"""

import json
import os
import struct
import sys
import zlib

from safetensors_raw import read_safetensors

PER_CLASS = 16
DOMAINS = ["rot30", "rot45", "rot75"]
NAMES = ["0_zero", "1_one", "2_two", "3_three", "4_four", "5_five", "6_six", "7_seven", "8_eight", "9_nine"]


def png(width, height, rows):
    """An 8-bit grayscale PNG of `rows` (bytes per row), filter 0, zlib level 9."""

    def chunk(kind, data):
        c = kind + data
        return struct.pack(">I", len(data)) + c + struct.pack(">I", zlib.crc32(c))

    raw = b"".join(b"\x00" + r for r in rows)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(raw, 9))
        + chunk(b"IEND", b"")
    )


def main(src, dst):
    manifest = json.load(open(os.path.join(src, "manifest.json")))
    by_name = {d["name"]: d for d in manifest["domains"]}
    for domain in DOMAINS:
        counts = [0] * 10
        for split in ("train", "test"):
            t = read_safetensors(os.path.join(src, by_name[domain]["splits"][split]["file"]))
            dtype, shape, images = t["images"]
            assert dtype == "U8" and shape[1:] == [1, 28, 28], (dtype, shape)
            labels = struct.unpack(f"<{shape[0]}q", t["labels"][2])
            for i, label in enumerate(labels):
                if counts[label] >= PER_CLASS:
                    continue
                counts[label] += 1
                px = images[i * 784 : (i + 1) * 784]
                d = os.path.join(dst, domain, NAMES[label])
                os.makedirs(d, exist_ok=True)
                rows = [px[r * 28 : (r + 1) * 28] for r in range(28)]
                with open(os.path.join(d, f"{split}{i:04d}.png"), "wb") as f:
                    f.write(png(28, 28, rows))
        assert min(counts) == PER_CLASS, (domain, counts)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
