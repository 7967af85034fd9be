#!/usr/bin/env bash
# Makes link-time stand-ins for the CUDA libraries that ldt's `cuda` / `nccl` builds link
# against (the driver, cuBLAS, cuBLASLt, cuRAND, NVRTC, NCCL), so that a machine without
# a GPU or the CUDA libraries can link binaries for one that has them.
#
#   scripts/cuda-stubs.sh DIR      writes DIR/lib{cuda,cublas,...}.so; link with
#                                  LIBRARY_PATH=DIR
#
# Each stand-in exports every function that cudarc's bindings declare for that library
# (empty bodies, never run) and carries the real library's soname, so the binaries ask
# the dynamic loader for the real libraries where they run: libcuda.so.1 from the driver,
# the others from CUDA 13 (`libcublas.so.13`, ...) and NCCL 2. Like the stubs NVIDIA
# ships in the toolkit's lib64/stubs, but for all six and made from the bindings. The
# CUDA runtime (candle's kernel crate links it) is the real one: the toolkit that
# scripts/cuda-toolkit.sh installs carries libcudart.so.13, and DIR/libcudart.so points
# to it (CUDA_ROOT must be set, as that script's output sets it).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: scripts/cuda-stubs.sh DIR}
mkdir -p "$out"
command -v gcc >/dev/null || {
  echo "cuda-stubs.sh: gcc is needed" >&2
  exit 1
}
manifest=$(cargo metadata --format-version 1 --locked --features nccl 2>/dev/null |
  python3 -c 'import json, sys; print(next(p["manifest_path"] for p in json.load(sys.stdin)["packages"] if p["name"] == "cudarc"))')
src=$(dirname "$manifest")/src
# module of cudarc's bindings : library name : soname where the binaries run
for spec in driver:cuda:libcuda.so.1 cublas:cublas:libcublas.so.13 \
  cublaslt:cublasLt:libcublasLt.so.13 curand:curand:libcurand.so.10 \
  nvrtc:nvrtc:libnvrtc.so.13 nccl:nccl:libnccl.so.2; do
  IFS=: read -r module lib soname <<<"$spec"
  bindings=$src/$module/sys/mod.rs
  [ -f "$bindings" ] || {
    echo "cuda-stubs.sh: no bindings at $bindings" >&2
    exit 1
  }
  grep -o '^pub unsafe fn [A-Za-z_][A-Za-z0-9_]*' "$bindings" | awk '{print "void " $4 "(void) {}"}' |
    sort -u >"$out/$lib.c"
  gcc -shared -fPIC -Wl,-soname,"$soname" -o "$out/lib$lib.so" "$out/$lib.c"
  rm "$out/$lib.c"
done
cudart=${CUDA_ROOT:?set CUDA_ROOT: eval "$(scripts/cuda-toolkit.sh)"}/lib/libcudart.so.13
[ -f "$cudart" ] || {
  echo "cuda-stubs.sh: no $cudart" >&2
  exit 1
}
ln -sfn "$cudart" "$out/libcudart.so"
echo "cuda-stubs.sh: link stand-ins in $out"
