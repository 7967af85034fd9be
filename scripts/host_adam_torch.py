#!/usr/bin/env python3
"""PyTorch's CPU optimizers on the tensors of benches/host_optim.rs, for comparison.

64 MiB of f32 weights in the same mix of tensor sizes, updated by torch.optim.Adam
(beta1 = 0 and (0.9, 0.999)), AdamW (weight decay 0.01) and SGD with momentum 0.9, each
with foreach=True and fused=True, at 1 thread and at all threads (torch.set_num_threads).
Prints a markdown table with the bench's columns: bytes moved per step (g read; p and each
state buffer read and written: PyTorch's Adam keeps exp_avg even with beta1 = 0, so it
moves 28 bytes per element where the project's kernel moves 20), ms per step and GB/s,
best of 7 steps after 2 warm-up steps.

Usage: python3 scripts/host_adam_torch.py
Exits 0 with 'SKIPPED: torch not installed' when torch is absent.
"""

import os
import sys
import time

try:
    import torch
except ImportError:
    print("SKIPPED: torch not installed (pip install torch); nothing was measured")
    sys.exit(0)

WEIGHT_BYTES = 64 << 20
RUNS = 7
WARMUP = 2
# The size mix of benches/host_optim.rs (and benches/ema.rs), in elements.
PATTERN = [4096, 65_536, 262_144, 1_048_576, 4_194_304, 589_824, 2_359_296]


def sizes():
    left = WEIGHT_BYTES // 4
    out = []
    i = 0
    while left > 0:
        n = min(PATTERN[i % len(PATTERN)], left)
        out.append(n)
        left -= n
        i += 1
    return out


CASES = [
    ("Adam (beta1 = 0)", torch.optim.Adam, dict(betas=(0.0, 0.99), eps=1e-8), 2),
    ("Adam", torch.optim.Adam, dict(betas=(0.9, 0.999), eps=1e-8), 2),
    ("AdamW", torch.optim.AdamW, dict(betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01), 2),
    ("SGD momentum", torch.optim.SGD, dict(momentum=0.9), 1),
]


def measure(cls, kwargs, impl, threads):
    """Best step time in seconds, or the reason it could not run."""
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(1)
    params = []
    for n in sizes():
        p = torch.nn.Parameter(torch.rand(n, generator=gen) * 2 - 1)
        p.grad = (torch.rand(n, generator=gen) * 2 - 1) * 1e-2
        params.append(p)
    try:
        opt = cls(params, lr=1e-4, **{impl: True}, **kwargs)
        for _ in range(WARMUP):
            opt.step()
    except (RuntimeError, TypeError, ValueError) as e:
        return str(e).splitlines()[0]
    best = float("inf")
    for _ in range(RUNS):
        t = time.perf_counter()
        opt.step()
        best = min(best, time.perf_counter() - t)
    if not all(torch.isfinite(p).all() for p in params):
        return "the weights diverged"
    return best


def main():
    all_threads = os.cpu_count() or 1
    counts = [1] + ([all_threads] if all_threads > 1 else [])
    elems = sum(sizes())
    print(
        f"PyTorch {torch.__version__} CPU optimizers, {WEIGHT_BYTES >> 20} MiB of f32 weights "
        f"in {len(sizes())} tensors, best of {RUNS}\n"
    )
    print("| optimizer | impl | threads | MiB moved/step | ms/step | GB/s |")
    print("|---|---|---:|---:|---:|---:|")
    for name, cls, kwargs, buffers in CASES:
        moved = 4 * elems * (3 + 2 * buffers)
        for impl in ["foreach", "fused"]:
            for threads in counts:
                r = measure(cls, kwargs, impl, threads)
                if isinstance(r, str):
                    print(f"| {name} | {impl} | {threads} | {moved >> 20} | n/a | n/a ({r}) |")
                else:
                    print(
                        f"| {name} | {impl} | {threads} | {moved >> 20} | {r * 1e3:.2f} | "
                        f"{moved / r / 1e9:.2f} |"
                    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
