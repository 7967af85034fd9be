#!/usr/bin/env python3
"""Writes the EDSR fixtures `tests/edsr.rs` reads, with torch itself.

    python3 -m venv /tmp/tv && /tmp/tv/bin/pip install -r scripts/requirements-torch.txt
    /tmp/tv/bin/python scripts/make_sr_fixtures.py tests/sr

EDSR as BasicSR defines it (basicsr/archs/edsr_arch.py and the ResidualBlockNoBN and
Upsample of arch_util.py), written out here so that basicsr itself is not needed: the
same module names, hence the same `state_dict()` keys, order and shapes; the RGB mean
a plain attribute (no buffer), every convolution at PyTorch's default init (BasicSR
builds the residual blocks with `pytorch_init=True` and re-initializes nothing else).

Outputs:

- edsr_x2.safetensors (num_feat 8, num_block 2, scale 2, LR 8x10),
  edsr_x4.safetensors (num_feat 6, num_block 2, scale 4, LR 6x7),
  edsr_x3.safetensors (num_feat 4, num_block 1, scale 3, res_scale 0.1, LR 5x6):
  the weights under their BasicSR names (f32, seeded default init), `input` (batch 2,
  uniform in [0, 1]), `target` (the high-resolution batch, uniform in [0, 1]), and the
  reference `output`, `loss` (`F.l1_loss(output, target)`, mean), `grad.<name>` for
  every parameter and `grad.input`, computed in float64 from those f32 values and
  rounded to f32. `__metadata__` holds the settings, the parameter names in
  `named_parameters()` order (`params`, comma-separated), and how far torch's own f32
  forward and backward lie from the f64 reference (`torch_f32_*`, the "scaled"
  measure max|a - ref| / max|ref|, worst tensor).
- edsr_basicsr.pth: a BasicSR checkpoint of a tiny EDSR (num_feat 2, num_block 1, scale
  2; seeded default init) as BasicSR's `save_network` writes one trained with an EMA:
  `torch.save({'params': state_dict, 'params_ema': ...})`, the `params_ema` weights
  being the `params` ones plus 1.
- edsr_basicsr_ema.pth: `{'params_ema': state_dict}` of the same network, holding the
  `params` weights above.

It also prints the parameter counts of BasicSR's EDSR baseline (num_feat 64,
num_block 16) at scales 2, 3 and 4, which tests/edsr.rs quotes.
"""

import copy
import json
import math
import os
import struct
import sys

import torch
import torch.nn.functional as F
from torch import nn

import safetensors_raw

RGB_MEAN = (0.4488, 0.4371, 0.4040)
IMG_RANGE = 255.0


class ResidualBlockNoBN(nn.Module):
    """conv1 -> ReLU -> conv2, added to the input after scaling by res_scale."""

    def __init__(self, num_feat, res_scale):
        super().__init__()
        self.res_scale = res_scale
        self.conv1 = nn.Conv2d(num_feat, num_feat, 3, 1, 1, bias=True)
        self.conv2 = nn.Conv2d(num_feat, num_feat, 3, 1, 1, bias=True)

    def forward(self, x):
        return x + self.conv2(F.relu(self.conv1(x))) * self.res_scale


def upsample(scale, num_feat):
    """BasicSR's Upsample: a Sequential of (conv to r*r*F, PixelShuffle(r)) pairs."""
    stages = []
    if scale & (scale - 1) == 0:
        stages = [2] * int(math.log2(scale))
    elif scale == 3:
        stages = [3]
    else:
        raise ValueError(f"scale {scale}")
    mods = []
    for r in stages:
        mods += [nn.Conv2d(num_feat, r * r * num_feat, 3, 1, 1), nn.PixelShuffle(r)]
    return nn.Sequential(*mods)


class EDSR(nn.Module):
    def __init__(self, num_feat=64, num_block=16, upscale=4, res_scale=1.0):
        super().__init__()
        self.img_range = IMG_RANGE
        # A plain attribute, as in BasicSR: not a parameter, not a buffer.
        self.mean = torch.tensor(RGB_MEAN).view(1, 3, 1, 1)
        self.conv_first = nn.Conv2d(3, num_feat, 3, 1, 1)
        self.body = nn.Sequential(
            *[ResidualBlockNoBN(num_feat, res_scale) for _ in range(num_block)]
        )
        self.conv_after_body = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.upsample = upsample(upscale, num_feat)
        self.conv_last = nn.Conv2d(num_feat, 3, 3, 1, 1)

    def forward(self, x):
        mean = self.mean.type_as(x)
        x = (x - mean) * self.img_range
        x = self.conv_first(x)
        res = self.conv_after_body(self.body(x))
        res += x
        x = self.conv_last(self.upsample(res))
        return x / self.img_range + mean


def scaled(a, ref):
    return ((a.double() - ref).abs().max() / ref.abs().max()).item()


def raw(t):
    return t.detach().to(torch.float32).contiguous().numpy().tobytes()


def case(out, name, seed, num_feat, num_block, scale, res_scale, lr_hw):
    torch.manual_seed(seed)
    model = EDSR(num_feat, num_block, scale, res_scale)
    names = [n for n, _ in model.named_parameters()]
    assert list(model.state_dict()) == names, "EDSR has no buffers"
    h, w = lr_hw
    x = torch.rand(2, 3, h, w)
    target = torch.rand(2, 3, h * scale, w * scale)

    def run(m, dtype):
        m = copy.deepcopy(m).to(dtype)
        xin = x.to(dtype).requires_grad_()
        y = m(xin)
        loss = F.l1_loss(y, target.to(dtype))
        loss.backward()
        grads = {n: p.grad for n, p in m.named_parameters()}
        grads["input"] = xin.grad
        return y.detach(), loss.detach(), grads

    y64, loss64, g64 = run(model, torch.float64)
    y32, _, g32 = run(model, torch.float32)
    meta = {
        "scale": str(scale),
        "num_feat": str(num_feat),
        "num_block": str(num_block),
        "res_scale": repr(res_scale),
        "params": ",".join(names),
        "torch_f32_output_scaled": f"{scaled(y32, y64):.3e}",
        "torch_f32_grad_scaled": f"{max(scaled(g32[k], g64[k]) for k in g64):.3e}",
    }
    tensors = [(n, p) for n, p in model.state_dict().items()]
    tensors += [("input", x), ("target", target), ("output", y64), ("loss", loss64.reshape(1))]
    tensors += [(f"grad.{k}", g) for k, g in g64.items()]
    path = os.path.join(out, f"{name}.safetensors")
    safetensors_raw.write_safetensors(
        path, [(k, "F32", list(t.shape), raw(t)) for k, t in tensors], meta
    )
    print(
        f"{path}: {len(names)} parameters ({sum(p.numel() for p in model.parameters())} "
        f"values), output {list(y64.shape)}, loss {loss64.item():.6f}; torch f32 vs f64: "
        f"output {meta['torch_f32_output_scaled']}, worst gradient {meta['torch_f32_grad_scaled']}"
    )
    return model


def main():
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    torch.set_num_threads(1)
    case(out, "edsr_x2", 0, 8, 2, 2, 1.0, (8, 10))
    case(out, "edsr_x4", 1, 6, 2, 4, 1.0, (6, 7))
    case(out, "edsr_x3", 2, 4, 1, 3, 0.1, (5, 6))

    torch.manual_seed(3)
    sd = EDSR(2, 1, 2).state_dict()
    ema = copy.deepcopy(sd)
    for k in ema:
        ema[k] += 1.0
    torch.save({"params": sd, "params_ema": ema}, os.path.join(out, "edsr_basicsr.pth"))
    torch.save({"params_ema": sd}, os.path.join(out, "edsr_basicsr_ema.pth"))

    counts = {
        s: sum(p.numel() for p in EDSR(64, 16, s).parameters()) for s in (2, 3, 4)
    }
    print(f"torch {torch.__version__}: EDSR baseline (num_feat 64, num_block 16) parameters: "
          + ", ".join(f"x{s} {n}" for s, n in counts.items()))


if __name__ == "__main__":
    main()
