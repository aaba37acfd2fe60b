#!/usr/bin/env bash
# Creates or refreshes the third test env, .venv-torch211: torch 2.11.0 (the GPU machine's torch
# and the package's floor; torch.compile found a graph break there that 2.13 does not show), with
# default-moe[test] only. Prints nothing on success; sourced by launch/test.sh, safe to run alone.
# Re-installs only when setup.cfg or the constraints change (stamp file). Sets TORCH211_PY.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV3="${DEFAULT_MOE_VENV_TORCH211:-$ROOT/.venv-torch211}"
CONSTRAINTS3="$ROOT/configs/constraints-torch211.txt"
source "$ROOT/launch/venv_common.sh"

install_torch211() {
  "$1" -m pip install -c "$CONSTRAINTS3" torch numpy tqdm pytest pytest-timeout &&
    "$1" -m pip install -c "$CONSTRAINTS3" --no-deps -e "$ROOT"
}

want3="$(cat "$ROOT/setup.cfg" "$ROOT/pyproject.toml" "$CONSTRAINTS3" | sha256sum | cut -c1-16)-torch211"
ensure_venv "$VENV3" "$want3" "installing torch 2.11.0 + default-moe into $VENV3" install_torch211
TORCH211_PY="$VENV3/bin/python"
export TORCH211_PY
