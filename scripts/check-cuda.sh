#!/usr/bin/env bash
# Compile-checks the `cuda` and `nccl` features (`cargo check --release --features cuda
# --all-targets`, then the same with `nccl`) on a machine without a GPU: nvcc 13.4 from
# PyPI (scripts/cuda-toolkit.sh) compiles candle's kernels, and the target directory
# lives outside the clone (LDT_CUDA_TARGET_DIR, default
# ${XDG_CACHE_HOME:-$HOME/.cache}/ldt-ci/target-cuda), so only the first run builds
# candle's CUDA kernels (13 minutes on 2 shared cores) and later runs re-check ldt alone.
# Linking needs the CUDA libraries or stand-ins (scripts/cuda-stubs.sh); running needs a
# GPU (scripts/gpu-check.sh builds here and runs there).
set -euo pipefail
cd "$(dirname "$0")/.."
# The check runs candle's kernel build script, but nothing here depends on the GPU
# generation the kernels are compiled for: sm_75, the oldest CUDA 13 supports, builds in
# about a third of the time of sm_90 (measured on 2 shared cores: 681 s against 1892 s).
export CUDA_COMPUTE_CAP=75
eval "$(scripts/cuda-toolkit.sh)"
export CARGO_TARGET_DIR="${LDT_CUDA_TARGET_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/ldt-ci/target-cuda}"
mkdir -p "$CARGO_TARGET_DIR"
nvcc --version | tail -n 2 | head -n 1
for features in cuda nccl; do
  start=$SECONDS
  cargo check --release --features "$features" --all-targets
  echo "$features feature check: $((SECONDS - start)) s (target dir $CARGO_TARGET_DIR)"
done
