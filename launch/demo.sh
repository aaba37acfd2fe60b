#!/usr/bin/env bash
# A 1-minute expert-parallel demo of the bare layer (no DeepSpeed); extra args go to demo_layer.py.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/launch/env.sh"
cd "$ROOT"
exec bash launch/torchrun_local.sh launch/demo_layer.py "$@"
