#!/usr/bin/env bash
# Our MoE layer vs DeepSpeed MoE vs megatron-core MoELayer at EP=1 and EP=2 over several sizes,
# then the communication cost model. Writes results/bench/{results.md,results.json,throughput.png}.
#   bash launch/bench_engines.sh [--sizes T:D:F:E:k,...] [--rounds 9]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/launch/env.sh"
cd "$ROOT"
OUT="${BENCH_OUT:-results/bench}"
SIZES="${BENCH_SIZES:-2048:256:512:8:2,8192:256:512:8:2,4096:1024:2048:8:2,4096:256:128:32:1,16384:256:512:8:1}"
mkdir -p "$OUT"
for n in 1 2; do
  NPROC=$n bash launch/torchrun_local.sh launch/bench_engines.py --sizes "$SIZES" --json "$OUT/ep$n.json" "$@" \
    2> >(grep "^\[bench\]" >&2) | grep -v "^\[20" || true
done
python launch/bench_engines.py --report "$OUT" "$OUT/ep1.json" "$OUT/ep2.json" > /dev/null
echo "[bench] wrote $OUT/results.md, $OUT/results.json, $OUT/throughput.png"
python launch/comm_model.py | tee "$OUT/comm_model.md"
