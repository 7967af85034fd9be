#!/usr/bin/env bash
# Assembles every kernels/*.ptx with ptxas for each GPU generation the project supports
# (Turing sm_75, Ampere sm_80/sm_86, Ada sm_89, Hopper sm_90) and checks that
# kernels/ema.ptx is what kernels/gen_ema.py writes. No GPU needed: ptxas comes from
# PyPI through scripts/cuda-toolkit.sh unless one is already on PATH.
# The SASS must contain no fused multiply-add: the fold's two products and its add are
# rounded separately, as on the host (checked with cuobjdump).
# Prints one line per file and architecture with the registers ptxas reports.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v ptxas >/dev/null 2>&1 || ! command -v cuobjdump >/dev/null 2>&1; then
  eval "$(scripts/cuda-toolkit.sh)"
fi
python3 kernels/gen_ema.py --check
ptxas --version | tail -n 2 | head -n 1
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
shopt -s nullglob
files=(kernels/*.ptx)
if [ ${#files[@]} -eq 0 ]; then
  echo "check-ptx: no kernels/*.ptx found" >&2
  exit 1
fi
for f in "${files[@]}"; do
  for arch in sm_75 sm_80 sm_86 sm_89 sm_90; do
    if ! ptxas -arch="$arch" -v "$f" -o "$tmp/out.cubin" >"$tmp/log" 2>&1; then
      cat "$tmp/log" >&2
      echo "check-ptx: ptxas rejected $f for $arch" >&2
      exit 1
    fi
    cuobjdump -sass "$tmp/out.cubin" >"$tmp/sass"
    if grep -qE '\b(FFMA|HFMA2|DFMA)\b' "$tmp/sass"; then
      grep -E '\b(FFMA|HFMA2|DFMA)\b' "$tmp/sass" | head -n 3 >&2
      echo "check-ptx: $f for $arch has fused multiply-adds; the fold must round each product" >&2
      exit 1
    fi
    regs=$(grep -o 'Used [0-9]* registers' "$tmp/log" | awk '{print $2}' | sort -n | tail -n 1)
    spills=$(grep -o '[0-9]* bytes spill stores' "$tmp/log" | awk '{s+=$1} END {print s+0}')
    fmul=$(grep -cw FMUL "$tmp/sass" || true)
    echo "ptxas ok: $f $arch (at most $regs registers per thread, $spills bytes spilled; $fmul FMUL, no FMA)"
  done
done
