#!/usr/bin/env bash
# The #16 goals at batch 16: erm against ldt-s with the host optimizer, block-wise
# recompute and streamed weights, on resnet50 and ViT-B/16 at 224x224 (AdamW, 2 steps:
# ldt-s one P and one A step). Prints the training stage's measured device peak (heap
# peak above the host baseline), the plan and ms/step of each run.
# Usage: scripts/batch16-memory.sh MANIFEST   (a 3x224x224 benchmark, e.g. the one
#   `ldt bench --memory --input 3x224x224 --out DIR` writes to DIR/synthetic-3x224x224)
set -euo pipefail
cd "$(dirname "$0")/.."
manifest=${1:?usage: scripts/batch16-memory.sh MANIFEST}
out=${OUT:-/tmp/ldt-batch16}
mkdir -p "$out"
common=(--set "data.manifest=\"$manifest\"" --set train.batch_size=16 --set train.steps=2
  --set stage1.warmup_steps=0 --set stage1.stat_batches=2 --set eval.every=0
  --set eval.batch_size=16 --set ldt_s.p_steps=1 --set ldt_s.a_steps=1
  --set 'optim.name="adamw"' --set 'optim.betas=[0.9, 0.999]')
declare -A model=(
  [resnet50]='model.arch="resnet50"'
  [vit-b16]='model.arch="vit" model.patch=16 model.width=768 model.depth=12 model.heads=12'
)
stream=(--set 'train.method="ldt-s"' --set 'offload.optimizer="host"'
  --set 'train.recompute="blocks"' --set 'offload.params="stream"')
for arch in resnet50 vit-b16; do
  sets=()
  for kv in ${model[$arch]}; do sets+=(--set "$kv"); done
  target/release/ldt train configs/quickstart.toml --overwrite "${common[@]}" "${sets[@]}" \
    --set 'train.method="erm"' --out "$out/$arch-erm" >"$out/$arch-erm.log" 2>&1
  target/release/ldt train configs/quickstart.toml --overwrite "${common[@]}" "${sets[@]}" \
    "${stream[@]}" --out "$out/$arch-stream" >"$out/$arch-stream.log" 2>&1
  for k in erm stream; do
    python3 - "$out/$arch-$k/summary.json" "$arch $k" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
m = s["measured_memory"]
train = (m["stages"]["train"] - m["baseline"]) / 2**20
print(f"{sys.argv[2]}: training {train:.1f} MiB, plan {s['memory']['device_peak'] / 2**20:.1f} MiB, {s['ms_per_step']:.0f} ms/step")
PY
  done
done
