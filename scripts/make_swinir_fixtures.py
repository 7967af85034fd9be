#!/usr/bin/env python3
"""Writes the SwinIR fixtures `tests/swinir.rs` reads, with torch itself.

    python3 -m venv /tmp/tv && /tmp/tv/bin/pip install -r scripts/requirements-torch.txt
    /tmp/tv/bin/python scripts/make_swinir_fixtures.py tests/sr

SwinIR as BasicSR defines it (basicsr/archs/swinir_arch.py) in its lightweight form
(`upsampler='pixelshuffledirect'`, `resi_connection='1conv'`, `img_range=1`, the DIV2K
RGB mean, `patch_norm=True`, `ape=False`, qkv bias, no dropout or drop-path: the
network as it computes in eval mode and, with those rates at 0, in train mode), written
out here so that basicsr itself is not needed: the same module names, hence the same
`state_dict()` keys, order and shapes, buffers included (each block's
`attn.relative_position_index`, int64, and a shifted block's `attn_mask`, f32, both
persistent); BasicSR's init (`trunc_normal_(std=.02)` for Linear weights and the
relative position bias tables, zero Linear biases, LayerNorm ones/zeros, convolutions
at PyTorch's default).

Outputs (`img_size` = the input size, so the stored masks are the ones used):

- swinir_x2.safetensors: embed_dim 12, depths [2, 2], num_heads [2, 3], window 4,
  mlp_ratio 2, scale 2, LR 8x8;
- swinir_x3.safetensors: embed_dim 6, depths [2, 1], num_heads [3, 2], window 4,
  mlp_ratio 1.5, scale 3, LR 8x12 (2x3 windows: a non-square grid).

Each holds the state_dict under its BasicSR names (parameters f32, seeded BasicSR init;
buffers as registered), `input` (batch 2, uniform in [0, 1]), `target` (uniform in
[0, 1]), and the reference `output`, `loss` (`F.l1_loss(output, target)`, mean),
`grad.<name>` for every parameter and `grad.input`, computed in float64 from those f32
values and rounded to f32. `__metadata__` holds the settings, the parameter and buffer
names in `named_parameters()` / `named_buffers()` order (`params`, `buffers`), the
`state_dict()` keys in order (`state_dict`), and how far torch's own f32 forward and
backward lie from the f64 reference (`torch_f32_*`, the "scaled" measure
max|a - ref| / max|ref|, worst tensor).

It also prints the parameter counts of SwinIR-light (embed_dim 60, depths and heads
[6, 6, 6, 6], window 8, mlp_ratio 2; img_size 64) at scales 2, 3 and 4, which
tests/swinir.rs quotes.
"""

import copy
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

import safetensors_raw

RGB_MEAN = (0.4488, 0.4371, 0.4040)


def to_windows(x, ws):
    """[b, h, w, c] -> [b * (h/ws) * (w/ws), ws * ws, c], windows row by row."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // ws, ws, w // ws, ws, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, ws * ws, c)


def from_windows(win, ws, h, w):
    """The inverse of `to_windows`: -> [b, h, w, c]."""
    c = win.shape[-1]
    x = win.reshape(-1, h // ws, w // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, h, w, c)


def shift_mask(h, w, ws, shift):
    """[nW, ws*ws, ws*ws]: -100 between tokens of different regions of the rolled
    image (regions split at -ws and -shift on each axis), 0 within one."""
    regions = torch.zeros(1, h, w, 1)
    cuts = lambda n: [(0, n - ws), (n - ws, n - shift), (n - shift, n)]
    k = 0
    for h0, h1 in cuts(h):
        for w0, w1 in cuts(w):
            regions[:, h0:h1, w0:w1, :] = k
            k += 1
    r = to_windows(regions, ws).squeeze(-1)
    d = r.unsqueeze(1) - r.unsqueeze(2)
    return torch.where(d != 0, torch.tensor(-100.0), torch.tensor(0.0))


class WindowAttention(nn.Module):
    def __init__(self, dim, ws, heads):
        super().__init__()
        self.ws, self.heads = ws, heads
        self.scale = (dim // heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * ws - 1) ** 2, heads))
        ys, xs = torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")
        ys, xs = ys.flatten(), xs.flatten()
        dy = ys[:, None] - ys[None, :] + ws - 1
        dx = xs[:, None] - xs[None, :] + ws - 1
        self.register_buffer("relative_position_index", dy * (2 * ws - 1) + dx)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, x, mask):
        bw, n, c = x.shape
        qkv = self.qkv(x).reshape(bw, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0] * self.scale, qkv[1], qkv[2]
        a = q @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        a = a + bias.view(n, n, -1).permute(2, 0, 1).unsqueeze(0)
        if mask is not None:
            nw = mask.shape[0]
            a = a.view(bw // nw, nw, self.heads, n, n) + mask.unsqueeze(1).unsqueeze(0)
            a = a.view(-1, self.heads, n, n)
        a = a.softmax(dim=-1)
        return self.proj((a @ v).transpose(1, 2).reshape(bw, n, c))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class SwinBlock(nn.Module):
    def __init__(self, dim, res, heads, ws, shift, mlp_ratio):
        super().__init__()
        if min(res) <= ws:
            # BasicSR: a window as large as the image, and no shift.
            ws, shift = min(res), 0
        self.res, self.ws, self.shift = res, ws, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, ws, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        # A persistent buffer; None (not in the state_dict) without a shift.
        self.register_buffer("attn_mask", shift_mask(*res, ws, shift) if shift else None)

    def forward(self, x, size):
        h, w = size
        b, _, c = x.shape
        y = self.norm1(x).view(b, h, w, c)
        s = self.shift
        if s:
            y = torch.roll(y, shifts=(-s, -s), dims=(1, 2))
        mask = self.attn_mask
        if s and tuple(size) != tuple(self.res):
            mask = shift_mask(h, w, self.ws, s).to(x)
        y = from_windows(self.attn(to_windows(y, self.ws), mask), self.ws, h, w)
        if s:
            y = torch.roll(y, shifts=(s, s), dims=(1, 2))
        x = x + y.reshape(b, h * w, c)
        return x + self.mlp(self.norm2(x))


class ResidualGroup(nn.Module):
    def __init__(self, dim, res, depth, heads, ws, mlp_ratio):
        super().__init__()
        self.blocks = nn.ModuleList(
            [SwinBlock(dim, res, heads, ws, 0 if i % 2 == 0 else ws // 2, mlp_ratio) for i in range(depth)]
        )

    def forward(self, x, size):
        for blk in self.blocks:
            x = blk(x, size)
        return x


def tokens(x):
    """[b, c, h, w] -> [b, h*w, c]."""
    return x.flatten(2).transpose(1, 2)


def image(x, size):
    """[b, h*w, c] -> [b, c, h, w]."""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], *size)


class RSTB(nn.Module):
    def __init__(self, dim, res, depth, heads, ws, mlp_ratio):
        super().__init__()
        self.residual_group = ResidualGroup(dim, res, depth, heads, ws, mlp_ratio)
        self.conv = nn.Conv2d(dim, dim, 3, 1, 1)

    def forward(self, x, size):
        return tokens(self.conv(image(self.residual_group(x, size), size))) + x


class PatchEmbed(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.norm = nn.LayerNorm(dim)


class SwinIR(nn.Module):
    def __init__(self, img_size, embed_dim, depths, num_heads, window_size, mlp_ratio, upscale):
        super().__init__()
        self.mean = torch.tensor(RGB_MEAN).view(1, 3, 1, 1)  # a plain attribute
        res = tuple(img_size)
        self.conv_first = nn.Conv2d(3, embed_dim, 3, 1, 1)
        self.patch_embed = PatchEmbed(embed_dim)
        self.layers = nn.ModuleList(
            [RSTB(embed_dim, res, d, h, window_size, mlp_ratio) for d, h in zip(depths, num_heads)]
        )
        self.norm = nn.LayerNorm(embed_dim)
        self.conv_after_body = nn.Conv2d(embed_dim, embed_dim, 3, 1, 1)
        self.upsample = nn.Sequential(
            nn.Conv2d(embed_dim, 3 * upscale * upscale, 3, 1, 1), nn.PixelShuffle(upscale)
        )
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        mean = self.mean.type_as(x)
        x = (x - mean) * 1.0
        x = self.conv_first(x)
        size = x.shape[2:]
        t = self.patch_embed.norm(tokens(x))
        for layer in self.layers:
            t = layer(t, size)
        body = image(self.norm(t), size)
        x = self.conv_after_body(body) + x
        return self.upsample(x) / 1.0 + mean


def scaled(a, ref):
    return ((a.double() - ref).abs().max() / ref.abs().max()).item()


def raw(t):
    t = t.detach().contiguous()
    if t.dtype == torch.int64:
        return "I64", t.numpy().tobytes()
    return "F32", t.to(torch.float32).numpy().tobytes()


def case(out, name, seed, embed_dim, depths, heads, ws, mlp_ratio, scale, lr_hw):
    torch.manual_seed(seed)
    h, w = lr_hw
    model = SwinIR((h, w), embed_dim, depths, heads, ws, mlp_ratio, scale)
    params = [n for n, _ in model.named_parameters()]
    buffers = [n for n, _ in model.named_buffers()]
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
        "embed_dim": str(embed_dim),
        "depths": ",".join(map(str, depths)),
        "num_heads": ",".join(map(str, heads)),
        "window_size": str(ws),
        "mlp_ratio": repr(mlp_ratio),
        "params": ",".join(params),
        "buffers": ",".join(buffers),
        "state_dict": ",".join(model.state_dict()),
        "torch_f32_output_scaled": f"{scaled(y32, y64):.3e}",
        "torch_f32_grad_scaled": f"{max(scaled(g32[k], g64[k]) for k in g64):.3e}",
    }
    tensors = list(model.state_dict().items())
    tensors += [("input", x), ("target", target), ("output", y64), ("loss", loss64.reshape(1))]
    tensors += [(f"grad.{k}", g) for k, g in g64.items()]
    path = os.path.join(out, f"{name}.safetensors")
    safetensors_raw.write_safetensors(
        path, [(k, *raw(t)[:1], list(t.shape), raw(t)[1]) for k, t in tensors], meta
    )
    print(
        f"{path}: {len(params)} parameters ({sum(p.numel() for p in model.parameters())} "
        f"values), {len(buffers)} buffers, output {list(y64.shape)}, loss {loss64.item():.6f}; "
        f"torch f32 vs f64: output {meta['torch_f32_output_scaled']}, worst gradient "
        f"{meta['torch_f32_grad_scaled']}"
    )


def main():
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    torch.set_num_threads(1)
    case(out, "swinir_x2", 0, 12, [2, 2], [2, 3], 4, 2.0, 2, (8, 8))
    case(out, "swinir_x3", 1, 6, [2, 1], [3, 2], 4, 1.5, 3, (8, 12))
    counts = {
        s: sum(p.numel() for p in SwinIR((64, 64), 60, [6] * 4, [6] * 4, 8, 2.0, s).parameters())
        for s in (2, 3, 4)
    }
    print(f"torch {torch.__version__}: SwinIR-light (embed_dim 60, depths/heads [6]*4, window 8, "
          "mlp_ratio 2) parameters: " + ", ".join(f"x{s} {n}" for s, n in counts.items()))


if __name__ == "__main__":
    main()
