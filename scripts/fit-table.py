#!/usr/bin/env python3
"""Which setting fits which GPU: the largest batch per device size, from measured plans.

For each backbone and memory setting, `ldt train` plans the device memory (weights,
gradients, device optimizer state, staging, and the activations measured by a probe of
one training step on the heap) and stops before stage 1 under a 1-byte budget, printing
the consumers. Two batch sizes give the bytes per example (the probes' difference) and
the fixed bytes; the table then gives the largest batch whose plan fits each device
size with 10% left for the allocator and the CUDA context. Before stage 1 the trained
set is bounded by the whole network, so ldt-s rows are upper bounds.

Usage: scripts/fit-table.py DATA_MANIFEST [LDT_BINARY]
(a 3x224x224 benchmark: `ldt bench --memory --input 3x224x224` writes one.)
"""
import re
import subprocess
import sys

manifest = sys.argv[1]
ldt = sys.argv[2] if len(sys.argv) > 2 else "target/release/ldt"
BACKBONES = {
    "resnet50": ['model.arch="resnet50"'],
    "vit-b16": ['model.arch="vit"', "model.patch=16", "model.width=768",
                "model.depth=12", "model.heads=12"],
}
SETTINGS = [
    ("erm", ['train.method="erm"']),
    ("ldt-s, host", ['train.method="ldt-s"', 'offload.optimizer="host"']),
    ("ldt-s, host, recompute", ['train.method="ldt-s"', 'offload.optimizer="host"',
                                'train.recompute="blocks"']),
    ("ldt-s, host, recompute, stream", ['train.method="ldt-s"', 'offload.optimizer="host"',
                                        'train.recompute="blocks"', 'offload.params="stream"']),
    ("ldt-s, host, bf16, recompute, stream", ['train.method="ldt-s"', 'offload.optimizer="host"',
                                              'train.recompute="blocks"', 'offload.params="stream"',
                                              'train.precision="bf16"']),
]
GB = [4, 8, 12, 24]


def plan(sets, batch):
    args = [ldt, "train", "configs/quickstart.toml", "--out", f"/tmp/fit-{batch}",
            "--set", f"data.manifest={manifest!r}".replace("'", '"'),
            "--set", f"train.batch_size={batch}", "--set", "offload.device_bytes=1",
            "--set", 'optim.name="adamw"', "--set", "optim.betas=[0.9, 0.999]"]
    for s in sets:
        args += ["--set", s]
    err = subprocess.run(args, capture_output=True, text=True).stderr
    m = re.search(r"planned device peak ([\d.]+) MiB", err)
    a = re.search(r"activations: ([\d.]+) MiB", err)
    if not m:
        sys.exit(f"no plan in: {err}")
    return float(m.group(1)), float(a.group(1)) if a else 0.0


print("| backbone | setting | fixed MiB | MiB per example | " +
      " | ".join(f"{g} GB" for g in GB) + " |")
print("|---|---|---|---|" + "---|" * len(GB))
for name, model in BACKBONES.items():
    for label, sets in SETTINGS:
        (p4, a4), (p8, a8) = plan(model + sets, 4), plan(model + sets, 8)
        per = (a8 - a4) / 4
        fixed = p8 - 8 * per
        fits = []
        for g in GB:
            room = g * 1e9 * 0.9 / 2**20 - fixed
            fits.append(str(int(room // per)) if room > per else "-")
        print(f"| {name} | {label} | {fixed:.0f} | {per:.1f} | " + " | ".join(fits) + " |")
