#!/usr/bin/env python3
"""ldt's training step beside PyTorch's, side by side in one run (issue #17).

    python3 -m venv /tmp/tv && /tmp/tv/bin/pip install -r scripts/requirements-torch.txt
    cargo build --release
    /tmp/tv/bin/python scripts/torch-compare.py --archs cnn,resnet18 --threads 1,2

For every backbone, method, thread count and precision it runs `ldt bench --step` (a
short training run on random images; its ms per step after the first, `summary.json`'s
`warm_ms_per_step`) and the same step in PyTorch
(same architecture, parameter count checked equal, same batch, the authors' Adam:
lr 1e-4, betas (0, 0.99^0.8), eps 1e-8; bf16 = autocast of the forward with f32
master weights, as `train.precision = "bf16"`), then prints ms/step, the ratio, and each
step's model arithmetic (FLOPs of the forward and backward that step runs, counted by
`torch.utils.flop_counter.FlopCounterMode`; LDT-S: the mean over both phases) per
second as a share of the machine's
matmul peak (a 2048x2048 matmul in the same precision and thread count, measured in
the same run). The methods in PyTorch:

- erm: forward, cross-entropy, backward, Adam step.
- ldt: the dual branch with both networks resident: PM trains the stable set (the set
  `ldt` found, read from its row) with the unstable set frozen, AM the unstable set,
  each a forward/backward/step on the same batch; every `ema_every` steps each
  branch's frozen copy is folded towards the other's trained weights (lerp, 0.99).
- ldt-s: one network; phases of `phase_steps` train the stable set, then the
  unstable set (one Adam each); every `ema_every` steps the trained set's counterpart
  (a host copy) is folded towards the live weights; at a phase switch the sets' live
  weights and counterparts trade places.

Without torch it says SKIPPED and exits 0. Timings of a shared machine move by tens of
percent between runs; the ratio comes from runs made one after the other.
"""

import argparse
import json
import os
import subprocess
import sys
import time

try:
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
except ImportError:
    print("SKIPPED: torch is not installed (pip install -r scripts/requirements-torch.txt)")
    sys.exit(0)

VIT = {"vit": (4, 96, 3, 3), "vit-tiny": (4, 192, 12, 3), "vit-small": (4, 384, 12, 6)}


def default_input(arch):
    return [3, 32, 32] if arch.startswith("vit") else [1, 28, 28]


class Mlp(nn.Module):
    """ldt's `mlp`: flatten, fc1..fcK with ReLU (hidden [128, 64]), the head."""

    def __init__(self, c, h, w, hidden=(128, 64), classes=10):
        super().__init__()
        dims = [c * h * w, *hidden, classes]
        for i in range(len(dims) - 1):
            setattr(self, f"fc{i + 1}", nn.Linear(dims[i], dims[i + 1]))
        self.n = len(dims) - 1

    def forward(self, x):
        x = x.flatten(1)
        for i in range(1, self.n + 1):
            x = getattr(self, f"fc{i}")(x)
            if i < self.n:
                x = F.relu(x)
        return x


class Cnn(nn.Module):
    """ldt's `cnn` / `cnn_bn`: (3x3 conv pad 1 [-> BN] -> ReLU -> max-pool 2) x 2 ->
    fc1 (64) -> ReLU -> fc2."""

    def __init__(self, c, h, w, bn, channels=(16, 32), fc_hidden=64, classes=10):
        super().__init__()
        self.bn = bn
        for i, o in enumerate(channels):
            setattr(self, f"conv{i + 1}", nn.Conv2d(c, o, 3, padding=1, bias=not bn))
            if bn:
                setattr(self, f"bn{i + 1}", nn.BatchNorm2d(o))
            c, h, w = o, h // 2, w // 2
        self.k = len(channels)
        self.fc1 = nn.Linear(c * h * w, fc_hidden)
        self.fc2 = nn.Linear(fc_hidden, classes)

    def forward(self, x):
        for i in range(1, self.k + 1):
            x = getattr(self, f"conv{i}")(x)
            if self.bn:
                x = getattr(self, f"bn{i}")(x)
            x = F.max_pool2d(F.relu(x), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def build(arch, shape):
    c, h, w = shape
    if arch == "mlp":
        return Mlp(c, h, w)
    if arch in ("cnn", "cnn_bn"):
        return Cnn(c, h, w, arch == "cnn_bn")
    if arch.startswith("resnet"):
        import torchvision

        m = getattr(torchvision.models, arch)(num_classes=10)
        m.conv1 = nn.Conv2d(c, 64, 7, 2, 3, bias=False)
        return m
    if arch in VIT:
        import timm

        patch, width, depth, heads = VIT[arch]
        return timm.models.vision_transformer.VisionTransformer(
            img_size=h, patch_size=patch, in_chans=c, num_classes=10, embed_dim=width,
            depth=depth, num_heads=heads, mlp_ratio=4.0, qkv_bias=True)
    raise SystemExit(f"--archs: no PyTorch model for `{arch}`")


def adam(params):
    return torch.optim.Adam(params, lr=1e-4, betas=(0.0, 0.99 ** 0.8), eps=1e-8)


class Steps:
    """One method's training step in PyTorch (the state it keeps between steps)."""

    def __init__(self, arch, shape, method, stable, phase, ema_every, bf16):
        torch.manual_seed(0)
        self.method, self.phase, self.ema_every, self.bf16 = method, phase, ema_every, bf16
        self.k = 0
        net = build(arch, shape)
        self.params = sum(p.numel() for p in net.parameters())
        names = [n for n, _ in net.named_parameters()]
        if method != "erm":
            missing = [s for s in stable if s not in names]
            if missing or not stable:
                raise SystemExit(f"{arch}: ldt's stable set {stable} is not in the PyTorch model ({missing})")
        self.stable = set(stable)
        if method == "erm":
            self.nets = [net]
            self.opts = [adam(net.parameters())]
        elif method == "ldt":
            am = build(arch, shape)
            am.load_state_dict(net.state_dict())
            self.nets = [net, am]
            for m, trains_stable in ((net, True), (am, False)):
                for n, p in m.named_parameters():
                    p.requires_grad_((n in self.stable) == trains_stable)
            self.opts = [adam([p for p in m.parameters() if p.requires_grad]) for m in self.nets]
        else:
            self.nets = [net]
            self.sets = [[p for n, p in net.named_parameters() if (n in self.stable) == s] for s in (True, False)]
            self.opts = [adam(s) for s in self.sets]
            self.counterparts = [[p.detach().clone() for p in s] for s in self.sets]
            self.live = 0
            for i, s in enumerate(self.sets):
                for p in s:
                    p.requires_grad_(i == 0)

    def one(self, net, opt, x, y):
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            loss = F.cross_entropy(net(x), y)
        loss.backward()
        opt.step()

    @torch.no_grad()
    def fold(self, dst, src):
        torch._foreach_lerp_(dst, src, 0.01)

    def __call__(self, x, y):
        self.k += 1
        if self.method == "erm":
            self.one(self.nets[0], self.opts[0], x, y)
        elif self.method == "ldt":
            (pm, am), (opm, oam) = self.nets, self.opts
            self.one(pm, opm, x, y)
            self.one(am, oam, x, y)
            if self.k % self.ema_every == 0:
                frozen = lambda m, s: [p for n, p in m.named_parameters() if (n in self.stable) == s]
                self.fold(frozen(pm, False), frozen(am, False))
                self.fold(frozen(am, True), frozen(pm, True))
        else:
            s = self.live
            self.one(self.nets[0], self.opts[s], x, y)
            if self.k % self.ema_every == 0:
                self.fold(self.counterparts[s], [p.detach() for p in self.sets[s]])
            if self.k % self.phase == 0:
                with torch.no_grad():
                    for i in (0, 1):
                        for p, c in zip(self.sets[i], self.counterparts[i]):
                            t = p.detach().clone()
                            p.copy_(c)
                            c.copy_(t)
                self.live = 1 - s
                for i, st in enumerate(self.sets):
                    for p in st:
                        p.requires_grad_(i == self.live)


def torch_row(row, shape, steps, warm):
    bf16 = row["precision"] == "bf16"
    m = Steps(row["arch"], shape, row["method"], row["stable"], row["phase_steps"], row["ema_every"], bf16)
    if m.params != row["params"]:
        raise SystemExit(f"{row['arch']}: PyTorch model has {m.params} parameters, ldt's {row['params']}: not the same network")
    g = torch.Generator().manual_seed(0)
    pool = torch.randint(0, 256, (64, *shape), generator=g).float() / 255
    labels = torch.arange(64) % 10
    batch = row["batch"]

    def data(k):
        i = (torch.arange(batch) + k * batch) % 64
        return pool[i], labels[i]

    for k in range(warm):
        m(*data(k))
    from torch.utils.flop_counter import FlopCounterMode

    # LDT-S: the mean over a cycle of both phases (each trains another set).
    counted = 2 * row["phase_steps"] if row["method"] == "ldt-s" else 1
    with FlopCounterMode(display=False) as fc:
        for k in range(counted):
            m(*data(warm + k))
    flops = fc.get_total_flops() / counted
    t = time.perf_counter()
    for k in range(steps):
        m(*data(warm + counted + k))
    ms = 1e3 * (time.perf_counter() - t) / steps
    return ms, flops


def peak(threads, bf16):
    torch.set_num_threads(threads)
    dt = torch.bfloat16 if bf16 else torch.float32
    a = torch.randn(2048, 2048).to(dt)
    b = torch.randn(2048, 2048).to(dt)
    a @ b  # starts the thread pool: without it a 2-thread peak reads as 1 thread's
    best = float("inf")
    for _ in range(10):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * 2048 ** 3 / best / 1e9


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ldt", default="target/release/ldt")
    ap.add_argument("--archs", default="mlp,cnn,cnn_bn,resnet18,resnet50,vit-tiny,vit-small")
    ap.add_argument("--methods", default="erm,ldt,ldt-s")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--precisions", default="f32,bf16")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20, help="timed steps per run (ldt: the run's steps)")
    ap.add_argument("--out", default="runs/torch-compare")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    rows = []
    for threads in [int(t) for t in a.threads.split(",")]:
        for precision in a.precisions.split(","):
            bf16 = precision == "bf16"
            pk = peak(threads, bf16)
            for arch in a.archs.split(","):
                shape = default_input(arch)
                out = os.path.join(a.out, f"ldt-{arch}-{precision}-t{threads}")
                cmd = [a.ldt, "bench", "--step", "--archs", arch, "--methods", a.methods,
                       "--input", "x".join(map(str, shape)), "--batch", str(a.batch),
                       "--steps", str(a.steps), "--threads", str(threads), "--out", out]
                if bf16:
                    cmd.append("--bf16")
                done = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                if done.returncode != 0:
                    raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr}")
                for row in json.load(open(os.path.join(out, "steps.json"))):
                    torch.set_num_threads(threads)
                    ms, flops = torch_row(row, shape, a.steps, 3)
                    r = dict(row, torch_ms=ms, flops=flops, peak_gflops=pk)
                    rows.append(r)
                    print(f"{arch} {row['method']} t{threads} {precision}: ldt {row['ms_per_step']:.1f} ms, torch {ms:.1f} ms", file=sys.stderr)
    with open(os.path.join(a.out, "rows.json"), "w") as f:
        json.dump(rows, f, indent=1)
    print(f"torch {torch.__version__}; batch {a.batch}; {a.steps} steps; peak = a 2048x2048 matmul in that precision and thread count")
    table(rows)


def table(rows):
    """The markdown table of `rows` (as `rows.json` holds them)."""
    print("| model | method | threads | precision | ldt ms/step | torch ms/step | ldt / torch | GFLOP/step | ldt GFLOP/s (% peak) | torch GFLOP/s (% peak) | peak GFLOP/s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        g = r["flops"] / 1e9
        lg, tg = g / (r["ms_per_step"] / 1e3), g / (r["torch_ms"] / 1e3)
        pk = r["peak_gflops"]
        print(f"| {r['arch']} | {r['method']} | {r['threads']} | {r['precision']} | {r['ms_per_step']:.1f} | "
              f"{r['torch_ms']:.1f} | {r['ms_per_step'] / r['torch_ms']:.2f} | {g:.3f} | "
              f"{lg:.1f} ({100 * lg / pk:.0f}%) | {tg:.1f} ({100 * tg / pk:.0f}%) | {pk:.0f} |")


if __name__ == "__main__":
    main()
