#!/usr/bin/env bash
# Installs the CUDA compiler tools from PyPI (no GPU, no system toolkit needed) into a
# cache directory outside the clone, once per version, and prints the environment that
# makes them the build's CUDA toolkit. Use as:   eval "$(scripts/cuda-toolkit.sh)"
#
# What it installs (pinned: cudarc 0.19.10 knows CUDA up to 13.4): nvcc, ptxas, NVVM,
# the CRT and runtime headers and CCCL, unpacked by pip into a toolkit-shaped tree
# `nvidia/cu13/{bin,include,lib,nvvm}`. Enough to compile candle's kernels and to check
# `--features cuda`; linking a binary also needs the driver library, i.e. a GPU machine.
# cuobjdump and nvdisasm (to read the SASS ptxas makes) go to a directory of their own.
#
# Environment: LDT_CUDA_CACHE (default ${XDG_CACHE_HOME:-$HOME/.cache}/ldt-ci),
# PYTHON (default python3), CUDA_COMPUTE_CAP (default 90, used where nvidia-smi is absent).
set -euo pipefail

version=13.4.92
cache=${LDT_CUDA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ldt-ci}
dir=$cache/cuda-$version
sass=$cache/cuda-$version-sass
python=${PYTHON:-python3}
root=$dir/nvidia/cu13

# Installs the pip packages "$@" into "$1" (first argument), once: pip writes into a
# temporary directory first, so an interrupted install never looks done.
pip_install() {
  local into=$1
  shift
  [ -f "$into/.complete" ] && return 0
  command -v "$python" >/dev/null 2>&1 || {
    echo "cuda-toolkit.sh: $python is missing (needed to install nvcc from PyPI)" >&2
    exit 1
  }
  rm -rf "$into"
  mkdir -p "$cache"
  local tmp
  tmp=$(mktemp -d "$cache/.install.XXXXXX")
  if ! "$python" -m pip install --quiet --disable-pip-version-check --no-cache-dir \
    --no-deps --target "$tmp" "$@" >&2; then
    rm -rf "$tmp"
    echo "cuda-toolkit.sh: pip could not install $*" >&2
    exit 1
  fi
  mv "$tmp" "$into"
  touch "$into/.complete"
}

pip_install "$dir" "nvidia-cuda-nvcc==$version" "nvidia-nvvm==$version" \
  "nvidia-cuda-crt==$version" "nvidia-cuda-runtime==$version" "nvidia-cuda-cccl==13.3.5.0.6"
pip_install "$sass" "nvidia-cuda-cuobjdump==$version" "nvidia-cuda-nvdisasm==$version"

[ -x "$root/bin/nvcc" ] && [ -x "$root/bin/ptxas" ] && [ -x "$sass/nvidia/cu13/bin/nvdisasm" ] || {
  echo "cuda-toolkit.sh: nvcc, ptxas or nvdisasm missing after the install ($cache)" >&2
  exit 1
}
# nvcc finds cicc through nvvm/bin next to bin/, and the headers through include/.
echo "export CUDA_ROOT='$root'"
echo "export CUDA_HOME='$root'"
echo "export PATH='$root/bin':'$sass/nvidia/cu13/bin':\"\$PATH\""
echo "export CUDARC_CUDA_VERSION=13040"
echo "export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}"
