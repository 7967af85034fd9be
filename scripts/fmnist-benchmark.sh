#!/usr/bin/env bash
# Pretrained-backbone benchmark (README, "Pretrained-backbone benchmark"):
#   1. pretrain the small CNN on Fashion-MNIST with ERM (configs/fmnist-pretrain.toml);
#   2. fine-tune it with a new head on the bundled RotatedMNIST-5k with erm, lp-ft, deft,
#      ldt, ldt with a DPU warm-up (ldt+ratio) and ldt-s, 3 seeds, and print the tables
#      of `ldt compare` (configs/fmnist-transfer.toml).
# Needs Debian's `dataset-fashion-mnist` (IDX files in /usr/share/datasets/fashion-mnist;
# nothing is downloaded). Environment: THREADS (compute threads, default 1), OUT (output
# directory, default runs), LDT (an ldt binary to use instead of building one).
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS="${THREADS:-1}"
OUT="${OUT:-runs}"
if [ ! -r /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  echo "Fashion-MNIST is missing: apt-get install dataset-fashion-mnist" >&2
  exit 1
fi
if [ -z "${LDT:-}" ]; then
  cargo build --release
  LDT="${CARGO_TARGET_DIR:-target}/release/ldt"
fi
export RAYON_NUM_THREADS="$THREADS"
set -x
"$LDT" train configs/fmnist-pretrain.toml --overwrite --set threads="$THREADS" --out "$OUT/fmnist-pretrain"
"$LDT" compare configs/fmnist-transfer.toml --overwrite \
  --methods erm,lp-ft,deft,ldt,ldt+ratio,ldt-s --seeds 0,1,2 --at 500,1000,3000 \
  --set threads="$THREADS" --set "model.init=\"$OUT/fmnist-pretrain/model.safetensors\"" \
  --out "$OUT/fmnist-compare"
