#!/usr/bin/env bash
# Main-job runs over seeds for a comparison (then: python launch/compare_runs.py ...).
#   bash launch/seed_runs.sh OUT_DIR "SEEDS" NAME "ARGS" [NAME "ARGS" ...]
# e.g. bash launch/seed_runs.sh runs/dsv3 "1 2 3" topk "--router topk --deepspeed-config configs/ds_gpt_tiny_dsv3.json"
# Each run goes to OUT_DIR/NAME_s{seed}; a finished run (metrics.json present) is skipped.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="$1"; seeds="$2"; shift 2
while [ "$#" -ge 2 ]; do
  name="$1"; args="$2"; shift 2
  for seed in $seeds; do
    dir="$out/${name}_s${seed}"
    if [ -f "$dir/metrics.json" ]; then echo "[seed_runs] $dir done, skipped"; continue; fi
    echo "[seed_runs] $name seed $seed -> $dir"
    # shellcheck disable=SC2086
    bash "$ROOT/launch/run.sh" --seed "$seed" --run-dir "$dir" $args > "$out/${name}_s${seed}.log" 2>&1
  done
done
