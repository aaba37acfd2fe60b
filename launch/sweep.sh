#!/usr/bin/env bash
# Router reproduction sweep (see launch/sweep.py): sets up .venv, then trains every router x seed x
# config of the sweep config, skipping finished runs and resuming interrupted ones.
#   bash launch/sweep.sh [--config configs/sweep_quick.json] [--only 8e-top2] [--summarise-only]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/launch/env.sh"
cd "$ROOT"
exec python launch/sweep.py "$@"
