#!/usr/bin/env bash
# Main-job step times with the "default_moe" flag on and off; extra args go to bench_train.py.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/launch/env.sh"
cd "$ROOT"
exec python launch/bench_train.py "$@"
