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
# PYTHON (default python3), CUDA_COMPUTE_CAP (default 90, used where nvidia-smi is absent),
# LDT_CUDA_VERSION: 13.4 (default; CI's compile check) or 13.0 (the version of the lent
# H200's driver: scripts/gpu-check.sh builds with it, because a driver rejects PTX from a
# newer nvcc than itself).
set -euo pipefail

case "${LDT_CUDA_VERSION:-13.4}" in
13.4) version=13.4.92 cccl=13.3.5.0.6 cudarc=13040 ;;
13.0) version=13.0.88 cccl=13.0.85 cudarc=13000 ;;
*)
  echo "cuda-toolkit.sh: LDT_CUDA_VERSION=${LDT_CUDA_VERSION} is not 13.4 or 13.0" >&2
  exit 1
  ;;
esac
cache=${LDT_CUDA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ldt-ci}
dir=$cache/cuda-$version
# The disassemblers read any CUDA 13 SASS; one version of them serves both toolkits.
sass_version=13.4.92
sass=$cache/cuda-$sass_version-sass
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
  "nvidia-cuda-crt==$version" "nvidia-cuda-runtime==$version" "nvidia-cuda-cccl==$cccl"
pip_install "$sass" "nvidia-cuda-cuobjdump==$sass_version" "nvidia-cuda-nvdisasm==$sass_version"

[ -x "$root/bin/nvcc" ] && [ -x "$root/bin/ptxas" ] && [ -x "$sass/nvidia/cu13/bin/nvdisasm" ] || {
  echo "cuda-toolkit.sh: nvcc, ptxas or nvdisasm missing after the install ($cache)" >&2
  exit 1
}
# nvcc finds cicc through nvvm/bin next to bin/, and the headers through include/.
echo "export CUDA_ROOT='$root'"
echo "export CUDA_HOME='$root'"
echo "export PATH='$root/bin':'$sass/nvidia/cu13/bin':\"\$PATH\""
echo "export CUDARC_CUDA_VERSION=$cudarc"
echo "export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}"
