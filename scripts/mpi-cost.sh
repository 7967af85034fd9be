#!/usr/bin/env bash
# The cost of data parallelism over MPI on this machine: erm at batch 64 for 60 steps,
# one thread per rank, on one process and on RANKS ranks (default 2), for the cnn and a
# 784-4096-2048-10 mlp (46 MB of gradients per step); prints ms/step and the ms/step
# spent in collectives from each run's summary.json. Needs `--features mpi` and mpirun.
#   cargo build --release --features mpi && scripts/mpi-cost.sh [RANKS]
set -euo pipefail
cd "$(dirname "$0")/.."
ranks=${1:-2}
bin=./target/release/ldt
"$bin" info | grep -q 'collective engines:.*mpi' ||
  { echo "mpi-cost.sh: $bin lacks the MPI engine: cargo build --release --features mpi" >&2; exit 1; }
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
common=(--set 'train.method="erm"' --set train.steps=60 --set train.batch_size=64
  --set threads=1 --set eval.every=0)
printf '| model | ranks | ms/step | collectives ms/step |\n|---|---|---|---|\n'
for model in cnn mlp; do
  arch=(--set "model.arch=\"$model\"")
  [ "$model" = mlp ] && arch+=(--set 'model.hidden=[4096,2048]')
  for n in 1 "$ranks"; do
    dir=$out/$model-$n
    if [ "$n" = 1 ]; then
      "$bin" train configs/quickstart.toml --overwrite --out "$dir" "${common[@]}" "${arch[@]}" >/dev/null
    else
      mpirun --allow-run-as-root --oversubscribe -np "$n" \
        "$bin" train configs/quickstart.toml --overwrite --out "$dir" "${common[@]}" "${arch[@]}" >/dev/null
    fi
    python3 -c 'import json, sys
s = json.load(open(sys.argv[1]))
d = s.get("data_parallel", {})
print("| %s | %s | %.1f | %.1f |" % (sys.argv[2], sys.argv[3], s["ms_per_step"], d.get("collective_ms_per_step", 0)))' \
      "$dir/summary.json" "$model" "$n"
  done
done
