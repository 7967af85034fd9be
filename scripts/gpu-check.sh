#!/usr/bin/env bash
# The GPU checks of the `cuda` and `nccl` features, for a lent GPU machine (one H200,
# driver for CUDA 13.0, PyTorch's CUDA 13 libraries, no Rust toolchain, no network;
# 15 minutes of device time in all, start-up included). The binaries are built HERE and
# carried; the machine only runs them.
#
#   here:   scripts/gpu-check.sh prepare   builds ldt, the GPU tests (tests/gpu.rs,
#                                          tests/nccl.rs) and the GPU benchmark with
#                                          `--release --features nccl` against CUDA 13.0
#                                          and link stand-ins (scripts/cuda-stubs.sh),
#                                          and packs them into .gpu/bundle.tar.xz
#                                          (.gpu is added to .git/info/exclude)
#   there:  scripts/gpu-check.sh run       ldt info, the GPU tests, the one-rank NCCL
#                                          test, the benchmark; one table last
#
# With the device tool: carry [".gpu"], command `scripts/gpu-check.sh run`. Logs go to
# $OUT (the tool's output folder) or /tmp/ldt-gpu-check.
#
# Why CUDA 13.0: the driver JIT-compiles PTX (ours, ISA 7.0, and candle's) and refuses
# PTX from a newer CUDA than its own; the lent H200's driver is 580 (CUDA 13.0), so
# candle's kernels are compiled by nvcc 13.0 (PyPI). They are compiled as PTX for
# compute_80 (bf16 needs 8.0; 3x faster to build on 2 cores than compute_90) and the
# driver compiles them for the H200 when they are first loaded.
#
# The GPU tests (tests/gpu.rs): every EMA kernel (one tensor, table, mapped destination,
# mapped source) for every dtype pair against the host fold on random data of odd sizes;
# the pinned counterpart buffer round trip and every backend call of every fold
# placement against the CPU backend; erm, ldt (resident, swap) and ldt-s (host, device,
# mapped folds) on the cnn for 20 steps against the same runs on the CPU.
# tests/nccl.rs: erm, ldt and ldt-s through a one-rank NCCL engine against the same runs
# without an engine, bit for bit.
# The benchmark (benches/gpu.rs): EMA kernel GB/s vs a device copy, pinned vs pageable
# copies, step time and peak device memory of erm / ldt resident / ldt swap / ldt-s on
# resnet50 at batch 64, and the share of swap time hidden behind compute. Then
# `ldt bench --memory` on the GPU: erm and ldt-s with the optimizer on the device and on
# the host, and both in bf16 with the host optimizer (bf16 working weights, f32 masters on
# the host), resnet50 at 224x224, the driver's used device memory.
set -euo pipefail
cd "$(dirname "$0")/.."
stage=${1:-run}
out=${OUT:-/tmp/ldt-gpu-check}
mkdir -p "$out"
bundle=.gpu/bundle.tar.xz

die() {
  echo "gpu-check: $*" >&2
  exit 1
}

prepare() {
  command -v cargo >/dev/null || die "cargo is needed to build the bundle"
  export LDT_CUDA_VERSION=13.0 CUDA_COMPUTE_CAP=80
  eval "$(scripts/cuda-toolkit.sh)"
  export CARGO_TARGET_DIR="${LDT_GPU_TARGET_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/ldt-ci/target-gpu}"
  local stubs="$CARGO_TARGET_DIR/cuda-stubs"
  scripts/cuda-stubs.sh "$stubs" >/dev/null
  export LIBRARY_PATH="$stubs${LIBRARY_PATH:+:$LIBRARY_PATH}"
  nvcc --version | tail -n 2 | head -n 1
  rm -rf .gpu/stage
  mkdir -p .gpu/stage/bin
  local t0=$SECONDS
  # name of the carried binary : cargo's kind and name of its target : cargo arguments
  for spec in "ldt:bin ldt:build --release --bin ldt" \
    "gpu-tests:test gpu:test --release --test gpu --no-run" \
    "nccl-tests:test nccl:test --release --test nccl --no-run" \
    "gpu-bench:bench gpu:bench --bench gpu --no-run"; do
    local name target what exe
    IFS=: read -r name target what <<<"$spec"
    # shellcheck disable=SC2086
    exe=$(cargo $what --features nccl --message-format=json 2>"$out/build-$name.log" |
      python3 -c 'import json, sys
kind, name = sys.argv[1].split()
exe = [m["executable"] for m in map(json.loads, sys.stdin)
       if m.get("reason") == "compiler-artifact" and m.get("executable")
       and m["target"]["name"] == name and kind in m["target"]["kind"]]
print(exe[-1] if exe else "")' "$target") || true
    [ -n "$exe" ] && [ -x "$exe" ] || {
      tail -n 30 "$out/build-$name.log" >&2
      die "cargo $what --features nccl failed (log: $out/build-$name.log)"
    }
    objcopy --strip-debug "$exe" ".gpu/stage/bin/$name"
    echo "built $name at $((SECONDS - t0)) s: $(du -h ".gpu/stage/bin/$name" | cut -f1)"
  done
  git rev-parse --short HEAD >.gpu/stage/commit
  # Each binary holds the same 50 MB of candle's PTX: a dictionary larger than all of them
  # lets xz store it once (about 1 GB of memory to pack, 300 MB to unpack).
  tar cf - -C .gpu/stage . | xz -T1 -6 --lzma2=preset=6,dict=256MiB >"$bundle"
  rm -rf .gpu/stage
  local exclude
  exclude=$(git rev-parse --git-path info/exclude)
  mkdir -p "$(dirname "$exclude")"
  grep -qx '/.gpu/' "$exclude" 2>/dev/null || echo '/.gpu/' >>"$exclude"
  echo "prepared $bundle ($(du -h "$bundle" | cut -f1)); carry .gpu, run 'scripts/gpu-check.sh run'"
}

# Directories holding each library the binaries need, from the driver's, the system
# toolkit's and PyTorch's CUDA 13 packages.
library_path() {
  local libs=(libcuda.so.1 libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libnvrtc.so.13
    libnccl.so.2 libcudart.so.13) dirs=() lib found all
  # One walk over the places they may be, then the first hit of each.
  local names=()
  for lib in "${libs[@]}"; do names+=(-o -name "$lib"); done
  all=$(find /usr/local/nvidia /usr/lib/x86_64-linux-gnu /usr/local/cuda/ /opt \
    \( "${names[@]:1}" \) 2>/dev/null) || true
  for lib in "${libs[@]}"; do
    found=$(grep -m 1 "/$lib\$" <<<"$all") || true
    if [ -n "$found" ]; then
      dirs+=("$(dirname "$found")")
    elif ! ldconfig -p 2>/dev/null | grep -q "$lib"; then
      echo "gpu-check: $lib not found on this machine" >&2
    fi
  done
  printf '%s\n' "${dirs[@]}" | awk '!seen[$0]++' | paste -sd:
}

run() {
  [ -f "$bundle" ] || die "no $bundle: run 'scripts/gpu-check.sh prepare' on the build machine and carry .gpu"
  command -v nvidia-smi >/dev/null || die "no nvidia-smi: is this a GPU machine?"
  local dir="$PWD/target/gpu-bundle" status=0
  rm -rf "$dir"
  mkdir -p "$dir"
  tar xJf "$bundle" -C "$dir"
  local lp
  lp=$(library_path)
  export LD_LIBRARY_PATH="$lp${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  # candle's kernels arrive as PTX (about 50 MB): the driver compiles each module on first
  # use and keeps the result in its cache, which must be large enough to hold them all so
  # that the later binaries do not compile them again.
  export CUDA_CACHE_MAXSIZE=$((4 << 30))
  # The test binaries read data/ from this checkout.
  export LDT_REPO_ROOT="$PWD"
  echo "bundle of commit $(cat "$dir/commit"); libraries from $lp"
  nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader
  if ldd "$dir/bin/ldt" | grep 'not found'; then
    die "libraries missing (above); set LD_LIBRARY_PATH to where they are"
  fi
  "$dir/bin/ldt" info | tee "$out/info.log" || status=1
  if command -v ptxas >/dev/null; then
    for arch in sm_75 sm_80 sm_86 sm_89 sm_90; do
      ptxas -arch=$arch kernels/ema.ptx -o /dev/null && echo "ptxas $(ptxas --version | tail -n 1 | cut -c1-40): ok $arch"
    done
  fi
  set +e
  # Time limits (seconds) so that one hung binary leaves time for the others and the
  # table: a device call may run 600 s.
  for t in gpu-tests:200 nccl-tests:90; do
    timeout "${t#*:}" "$dir/bin/${t%:*}" --nocapture --test-threads=1 2>&1 | tee "$out/${t%:*}.log" |
      grep -E '^(test |SKIPPED|    |nccl |[a-z-]+ .*(L2|identical))|panicked|test result'
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
  done
  timeout 240 "$dir/bin/gpu-bench" --bench 2>&1 | tee "$out/gpu-bench.log" >/dev/null
  [ "${PIPESTATUS[0]}" = 0 ] || { status=1; tail -n 20 "$out/gpu-bench.log"; }
  # The memory table on the GPU (#15): erm and ldt-s, optimizer on the device and on the
  # host, resnet50 at 224x224 (random images), the driver's used memory per stage.
  timeout 200 "$dir/bin/ldt" bench --memory --device cuda:0 --archs resnet50 \
    --input 3x224x224 --batch 32 --steps 8 --bf16 --recompute --stream \
    --out "$out/bench-memory" >"$out/bench-memory.log" 2>&1 ||
    { status=1; tail -n 20 "$out/bench-memory.log"; }
  # A device budget below the weights (#16): ldt-s on a ViT-B-sized network (12 blocks
  # of width 768 on the bundled 28x28 data, 340 MB of f32 weights) with
  # offload.device_bytes = 256 MiB picks recompute and streamed weights (planned on the
  # CPU: 108 MiB) and must export the bytes of the same run without a budget.
  budget=(--set 'model.arch="vit"' --set model.patch=7 --set model.width=768
    --set model.depth=12 --set model.heads=12 --set train.batch_size=8
    --set 'device="cuda:0"' --set train.steps=12 --set stage1.warmup_steps=4
    --set stage1.stat_batches=4 --set eval.every=0 --set 'offload.optimizer="host"'
    --set ldt_s.p_steps=3 --set ldt_s.a_steps=3)
  for b in 0 268435456; do
    timeout 100 "$dir/bin/ldt" train configs/quickstart.toml --overwrite "${budget[@]}" \
      --set 'train.recompute="auto"' --set 'offload.params="auto"' \
      --set offload.device_bytes=$b --out "$out/budget-$b" >"$out/budget-$b.log" 2>&1 ||
      { status=1; tail -n 20 "$out/budget-$b.log"; }
  done
  grep -h '^memory:' "$out"/budget-*.log || true
  if cmp "$out/budget-0/composite.safetensors" "$out/budget-268435456/composite.safetensors"; then
    echo "budget below the weights: composite identical to the unbudgeted run"
  else
    status=1; echo "budget below the weights: composite DIFFERS"
  fi
  set -e
  echo
  grep -hE '^test .* (ok|FAILED)$|test result' "$out/gpu-tests.log" "$out/nccl-tests.log" || true
  # The memory table, then the benchmark's table, last.
  sed -n '/^| backbone /,/^$/p' "$out/bench-memory.log"
  sed -n '/^| measure /,$p' "$out/gpu-bench.log"
  [ "$status" = 0 ] || echo "gpu-check: something failed; logs in $out" >&2
  return $status
}

case "$stage" in
prepare) prepare ;;
run) run ;;
*) die "usage: scripts/gpu-check.sh prepare|run" ;;
esac
