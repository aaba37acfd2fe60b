#!/usr/bin/env bash
# Our MoE layer vs DeepSpeed MoE vs megatron-core MoELayer at EP=1 and EP=2; extra args go to
# launch/bench_engines.py (e.g. --tokens 8192 --hidden 512).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/launch/env.sh"
cd "$ROOT"
for n in 1 2; do
  NPROC=$n bash launch/torchrun_local.sh launch/bench_engines.py "$@" 2>/dev/null | grep -v "^\[" || true
done
