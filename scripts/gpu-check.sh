#!/usr/bin/env bash
# The GPU checks of the `cuda` feature, for a lent GPU machine (one H200 with nvcc 13.0
# and its driver, no network; 15 minutes of device time in all, start-up included).
#
#   here:   scripts/gpu-check.sh prepare   vendors every crate into .gpu/vendor.tar.xz
#                                          (about 11 MB; Windows-only crates emptied) and
#                                          adds .gpu to .git/info/exclude
#   there:  scripts/gpu-check.sh build     offline `cargo build --release --features cuda`
#                                          of ldt, the GPU tests and the GPU benchmark
#           scripts/gpu-check.sh run       ldt info, the GPU tests, the benchmark; one
#                                          table last
#           scripts/gpu-check.sh all       build, then run
#
# With the device tool: carry [".gpu"]; a machine kept warm keeps target/ between calls,
# so `build` and `run` may be two calls (each call is limited to 10 minutes). Logs go to
# $OUT (the tool's output folder) or /tmp/ldt-gpu-check.
#
# The GPU tests (tests/gpu.rs): every EMA kernel (one tensor, table, mapped destination,
# mapped source) for every dtype pair against the host fold on random data of odd sizes;
# the pinned counterpart buffer round trip and every backend call of every fold
# placement against the CPU backend; erm, ldt (resident, swap) and ldt-s (host, device,
# mapped folds) on the cnn for 20 steps against the same runs on the CPU.
# The benchmark (benches/gpu.rs): EMA kernel GB/s vs a device copy, pinned vs pageable
# copies, step time and peak device memory of erm / ldt resident / ldt swap / ldt-s on
# resnet50 at batch 64, and the share of swap time hidden behind compute.
set -euo pipefail
cd "$(dirname "$0")/.."
stage=${1:-all}
out=${OUT:-/tmp/ldt-gpu-check}
mkdir -p "$out"

die() {
  echo "gpu-check: $*" >&2
  exit 1
}

prepare() {
  command -v cargo >/dev/null || die "cargo is needed to vendor the crates"
  rm -rf .gpu
  mkdir -p .gpu
  cargo vendor --locked --offline .gpu/vendor >/dev/null 2>.gpu/vendor.log ||
    cargo vendor --locked .gpu/vendor >/dev/null 2>.gpu/vendor.log ||
    die "cargo vendor failed: $(tail -n 3 .gpu/vendor.log)"
  # Windows-only crates are never compiled on Linux: keep their manifests (Cargo reads
  # every package of the lock file) and drop their sources and import libraries.
  for d in .gpu/vendor/winapi* .gpu/vendor/windows*; do
    [ -d "$d" ] || continue
    had_build=0
    [ -f "$d/build.rs" ] && had_build=1
    find "$d" -mindepth 1 ! -name Cargo.toml ! -name .cargo-checksum.json -delete
    mkdir -p "$d/src"
    : >"$d/src/lib.rs"
    if [ "$had_build" = 1 ]; then : >"$d/build.rs"; fi
    python3 -c 'import json,sys; p=sys.argv[1]; j=json.load(open(p)); j["files"]={}; json.dump(j,open(p,"w"))' \
      "$d/.cargo-checksum.json"
  done
  tar cJf .gpu/vendor.tar.xz -C .gpu vendor
  rm -rf .gpu/vendor .gpu/vendor.log
  exclude=$(git rev-parse --git-path info/exclude)
  mkdir -p "$(dirname "$exclude")"
  grep -qx '/.gpu/' "$exclude" 2>/dev/null || echo '/.gpu/' >>"$exclude"
  echo "prepared .gpu/vendor.tar.xz ($(du -h .gpu/vendor.tar.xz | cut -f1)); carry .gpu"
}

setup() {
  [ -f .gpu/vendor.tar.xz ] || die "no .gpu/vendor.tar.xz: run 'scripts/gpu-check.sh prepare' on a machine with cargo and carry .gpu"
  export PATH="$HOME/.cargo/bin:/usr/local/cuda/bin:$PATH"
  command -v cargo >/dev/null || die "no Rust toolchain (cargo) on this machine"
  command -v nvcc >/dev/null || die "no nvcc on this machine"
  command -v nvidia-smi >/dev/null || die "no nvidia-smi: is this a GPU machine?"
  # Crates come from the carried archive, unpacked under the ignored target/ (so it is
  # never carried back), never from the network.
  local vendor="$PWD/target/gpu-vendor"
  if [ ! -f "$vendor/.unpacked" ] || [ .gpu/vendor.tar.xz -nt "$vendor/.unpacked" ]; then
    rm -rf "$vendor"
    mkdir -p "$vendor"
    tar xJf .gpu/vendor.tar.xz -C "$vendor" --strip-components=1
    touch "$vendor/.unpacked"
  fi
  vendored=(--offline --config 'source.crates-io.replace-with="vendored"'
    --config "source.vendored.directory=\"$vendor\"")
  cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -n 1 | tr -d '. ')
  export CUDA_COMPUTE_CAP="$cap"
  export CUDA_ROOT="${CUDA_ROOT:-/usr/local/cuda}"
  export LD_LIBRARY_PATH="$CUDA_ROOT/lib64:${LD_LIBRARY_PATH:-}"
  export CARGO_TARGET_DIR="$PWD/target/gpu"
  export CARGO_BUILD_JOBS="$(nproc)"
}

build() {
  setup
  nvcc --version | tail -n 2 | head -n 1
  cargo --version
  echo "building --release --features cuda for sm_$CUDA_COMPUTE_CAP with $CARGO_BUILD_JOBS jobs (log: $out/build.log)"
  local t0=$SECONDS
  : >"$out/build.log"
  for what in "build --release --features cuda --bin ldt" \
    "test --release --features cuda --test gpu --no-run" \
    "bench --features cuda --bench gpu --no-run"; do
    # $what is split into cargo's arguments on purpose.
    # shellcheck disable=SC2086
    if ! cargo $what "${vendored[@]}" >>"$out/build.log" 2>&1; then
      tail -n 40 "$out/build.log"
      die "cargo $what failed after $((SECONDS - t0)) s (log: $out/build.log)"
    fi
    echo "cargo $what: done at $((SECONDS - t0)) s"
  done
}

run() {
  setup
  local status=0
  nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader
  "$CARGO_TARGET_DIR/release/ldt" info | tee "$out/info.log" || status=1
  if [ -x "$(command -v ptxas)" ]; then
    for arch in sm_75 sm_80 sm_86 sm_89 sm_90; do
      ptxas -arch=$arch kernels/ema.ptx -o /dev/null && echo "ptxas $(ptxas --version | tail -n 1 | cut -c1-40): ok $arch"
    done
  fi
  set +e
  cargo test --release --features cuda --test gpu "${vendored[@]}" -- --nocapture --test-threads=1 2>&1 |
    tee "$out/gpu-tests.log" | grep -E '^(test |SKIPPED|    |[a-z-]+ .*(L2|identical))|panicked|test result'
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
  cargo bench --features cuda --bench gpu "${vendored[@]}" 2>&1 | tee "$out/gpu-bench.log" >/dev/null
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
  set -e
  echo
  grep -E '^test .* (ok|FAILED)$|test result' "$out/gpu-tests.log" || true
  # The benchmark's table, last.
  sed -n '/^| measure /,$p' "$out/gpu-bench.log"
  [ "$status" = 0 ] || echo "gpu-check: something failed; logs in $out" >&2
  return $status
}

case "$stage" in
prepare) prepare ;;
build) build ;;
run) run ;;
all)
  build
  run
  ;;
*) die "usage: scripts/gpu-check.sh prepare|build|run|all" ;;
esac
