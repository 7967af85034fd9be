#!/usr/bin/env python3
"""Writes tests/sr/quality.json, the reference `tests/quality.rs` checks
`ldt::task::quality` against: PSNR and SSIM of deterministic image pairs with the
conventions of BasicSR (`basicsr/metrics/psnr_ssim.py`), computed here with numpy and
OpenCV, and the 8-bit quantization of BasicSR's `tensor2img`.

    python3 -m venv /tmp/qv && /tmp/qv/bin/pip install -r scripts/requirements-quality.txt
    /tmp/qv/bin/python scripts/make_quality_fixtures.py tests/sr/quality.json

The conventions, as BasicSR applies them to HWC uint8 images:

- crop `border` pixels from each side (none when 0);
- Y channel: the image to float32 in [0, 1] (`u8 / 255`), the BT.601 luma
  `65.481 R + 128.553 G + 24.966 B + 16` as numpy's dot of the float32 pixels with
  float64 weights (so float64), divided by 255 and stored as float32, times 255 in
  float32 (BasicSR's `to_y_channel` over `bgr2ycbcr(y_only=True)`; not rounded);
- PSNR: `10 log10(255^2 / MSE)` in float64, MSE over every scored value, inf when 0;
- SSIM, per channel in float64: `cv2.filter2D` with the outer product of
  `cv2.getGaussianKernel(11, 1.5)`, the valid region `[5:-5, 5:-5]`, C1 = (0.01*255)^2,
  C2 = (0.03*255)^2, the mean of the SSIM map; over channels, their mean;
- quantization of a float32 network output: clip to [0, 1], times 255 in float32,
  numpy's `round` (half to even), to uint8.

The same inputs give the same file on one machine; OpenCV computes the 11x11 filter by
DFT, so the last digits may differ between CPUs (far below the tests' tolerance).
"""

import json
import sys

import cv2
import numpy as np

# BasicSR's images are BGR; this file keeps RGB (as ldt does) and reverses to BGR
# before the luma, so that numpy adds the three products in the order BasicSR does.
LUMA_BGR = np.array([24.966, 128.553, 65.481])


def hwc(chw):
    return np.ascontiguousarray(chw.transpose(1, 2, 0))


def cut(img, border):
    return img[border:-border, border:-border, :] if border else img


def luma(img):
    """HWC RGB uint8 -> HW1 float32 luma in [16, 235], BasicSR's way."""
    unit = img.astype(np.float32) / np.float32(255.0)
    y = np.dot(unit[..., ::-1], LUMA_BGR) + 16.0
    return ((y / 255.0).astype(np.float32) * np.float32(255.0))[..., None]


def scored(chw, border, channel):
    img = cut(hwc(chw), border)
    if channel == "y":
        img = luma(img)
    return img.astype(np.float64)


def psnr(a, b, border, channel):
    x, y = scored(a, border, channel), scored(b, border, channel)
    mse = np.mean((x - y) ** 2)
    return float("inf") if mse == 0 else float(10.0 * np.log10(255.0**2 / mse))


def ssim_channel(x, y):
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    g = cv2.getGaussianKernel(11, 1.5)
    window = g @ g.T

    def local(img):
        return cv2.filter2D(img, -1, window)[5:-5, 5:-5]

    mx, my = local(x), local(y)
    vx = local(x * x) - mx * mx
    vy = local(y * y) - my * my
    cov = local(x * y) - mx * my
    num = (2 * mx * my + c1) * (2 * cov + c2)
    den = (mx * mx + my * my + c1) * (vx + vy + c2)
    return float(np.mean(num / den))


def ssim(a, b, border, channel):
    x, y = scored(a, border, channel), scored(b, border, channel)
    return float(np.mean([ssim_channel(x[..., c], y[..., c]) for c in range(x.shape[2])]))


def quantize(out):
    """float32 network output -> uint8, as BasicSR's tensor2img."""
    v = np.clip(out.astype(np.float32), np.float32(0), np.float32(1)) * np.float32(255.0)
    assert v.dtype == np.float32
    return np.round(v).astype(np.uint8)


def smooth(rng, c, h, w, amp=100.0):
    """A smooth colour image: per channel, a few random low-frequency waves."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.empty((c, h, w))
    for i in range(c):
        f = 127.5 * np.ones((h, w))
        for _ in range(3):
            fy, fx, ph = rng.uniform(0.02, 0.15), rng.uniform(0.02, 0.15), rng.uniform(0, 6.3)
            f += amp / 3 * np.sin(fy * yy + fx * xx + ph)
        img[i] = f
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def u8(rng, shape):
    return rng.integers(0, 256, size=shape, dtype=np.uint8)


def quantize_case(rng):
    """Floats for `quantize`: outside [0, 1], exact halves of 1/255 and their
    neighbours, random values."""
    f32 = np.float32
    xs = [-1e6, -1.0, -1e-7, -0.0, 0.0, 1e-30, 0.25, 0.5, 1.0, 1.0000001, 1.5, 3e9]
    for k in range(256):
        tie = f32(k + 0.5) / f32(255.0)
        xs += [tie, np.nextafter(tie, f32(-1)), np.nextafter(tie, f32(2))]
        xs.append(f32((k + 0.5) / 255.0))
    xs += list(rng.uniform(-0.1, 1.1, size=200))
    x = np.array(xs, dtype=np.float32)
    scaled = np.clip(x, f32(0), f32(1)) * f32(255.0)
    ties = scaled[(scaled % 1) == 0.5]
    down = int(np.sum(np.floor(ties) % 2 == 0))
    # Ties that half-away-from-zero would round differently must be there.
    assert down > 10 and len(ties) - down > 10, (down, len(ties))
    return x, quantize(x), len(ties), down


def dumps(v, ind=""):
    """JSON with one key a line, lists of numbers on one line (json.dumps's numbers)."""
    if isinstance(v, dict):
        inner = ind + " "
        items = [inner + json.dumps(k) + ": " + dumps(x, inner) for k, x in v.items()]
        return "{\n" + ",\n".join(items) + "\n" + ind + "}"
    if isinstance(v, list) and any(isinstance(x, (dict, list)) for x in v):
        inner = ind + " "
        return "[\n" + ",\n".join(inner + dumps(x, inner) for x in v) + "\n" + ind + "]"
    return json.dumps(v)


def main(path):
    rng = np.random.default_rng(20)
    cases = []

    def case(name, a, b, borders, note, output=None):
        assert a.shape == b.shape and a.dtype == b.dtype == np.uint8
        scores = []
        for border in borders:
            for channel in ("y", "rgb"):
                p = psnr(a, b, border, channel)
                scores.append({
                    "border": border,
                    "channel": channel,
                    "psnr": None if p == float("inf") else p,
                    "ssim": ssim(a, b, border, channel),
                })
        c = {"name": name, "note": note, "shape": list(a.shape),
             "a": a.tobytes().hex(), "b": b.tobytes().hex()}
        if output is not None:
            c["b_output"] = [float(v) for v in output.ravel()]
        c["scores"] = scores
        cases.append(c)

    case("random", u8(rng, (3, 40, 52)), u8(rng, (3, 40, 52)), [0, 2, 4],
         "two independent uniform images")
    s = smooth(rng, 3, 31, 47)
    case("smooth", s, smooth(rng, 3, 31, 47), [0, 2, 4], "two smooth images")
    base = smooth(rng, 3, 40, 52, amp=60.0).astype(np.int16) + rng.integers(-30, 31, (3, 40, 52))
    base = np.clip(base, 0, 255).astype(np.uint8)
    noisy = np.clip(np.round(base + rng.normal(0, 4, base.shape)), 0, 255).astype(np.uint8)
    case("noise", base, noisy, [0, 2, 4], "a textured image and it plus Gaussian noise (sd 4)")
    same = u8(rng, (3, 24, 24))
    case("identical", same, same.copy(), [0, 2, 4], "one image twice: PSNR inf (null), SSIM 1")
    gt = smooth(rng, 3, 23, 21)
    out = (gt / 255.0 + rng.normal(0, 0.03, gt.shape)).astype(np.float32)
    out.ravel()[:40] = (np.arange(40) + 0.5) / 255.0  # exact halves
    case("quantized", gt, quantize(out), [0, 2, 4],
         "b is quantize(b_output), a network output around a (noise sd 0.03, values "
         "outside [0, 1], exact halves)", output=out)
    m = u8(rng, (3, 21, 23))
    case("minimal", m, np.clip(m.astype(np.int16) + rng.integers(-20, 21, m.shape), 0, 255)
         .astype(np.uint8), [0, 5],
         "border 5 leaves 11x13, the smallest SSIM window fits in height")
    inv = u8(rng, (3, 16, 16))
    case("inverted", inv, 255 - inv, [0, 2], "a uniform image and its negative: SSIM below 0")

    x, q, ties, down = quantize_case(rng)
    doc = {
        "about": "Written by scripts/make_quality_fixtures.py (numpy %s, OpenCV %s): "
                 "BasicSR's PSNR and SSIM of CHW RGB uint8 pairs (a, b as hex bytes), "
                 "per border and channel (y or rgb); psnr null = inf. quantize: float32 "
                 "inputs and the uint8 of BasicSR's tensor2img (%d exact ties, %d rounding "
                 "down)." % (np.__version__, cv2.__version__, ties, down),
        "quantize": {"input": [float(v) for v in x], "output": q.tolist()},
        "cases": cases,
    }
    with open(path, "w") as f:
        f.write(dumps(doc) + "\n")
    for c in cases:
        print(c["name"], c["shape"], [(s["border"], s["channel"], s["psnr"], s["ssim"])
                                      for s in c["scores"]])
    print("quantize: %d values, %d exact ties (%d down)" % (len(x), ties, down))


if __name__ == "__main__":
    main(sys.argv[1])
