#!/usr/bin/env bash
# Layer benchmark (TopK vs Default) on all local ranks; extra args go to launch/bench_layer.py.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/launch/env.sh"
cd "$ROOT"
exec bash launch/torchrun_local.sh launch/bench_layer.py "$@"
