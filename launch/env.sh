#!/usr/bin/env bash
# Creates or refreshes the project's virtual env (.venv) and prints nothing else on success.
# Sourced by launch/run.sh and launch/test.sh; safe to run alone: `bash launch/env.sh`.
# Re-installs only when setup.cfg or the constraints change (a stamp file holds their hash).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${DEFAULT_MOE_VENV:-$ROOT/.venv}"
CONSTRAINTS="${DEFAULT_MOE_CONSTRAINTS:-$ROOT/configs/constraints.txt}"
EXTRAS="${DEFAULT_MOE_EXTRAS:-test,docs,deepspeed,megatron,megatron_lm,train,hf,torchtitan}"
source "$ROOT/launch/venv_common.sh"

install_main() {
  "$1" -m pip install -c "$CONSTRAINTS" -e "$ROOT[$EXTRAS]"
}

want="$(cat "$ROOT/setup.cfg" "$ROOT/pyproject.toml" "$CONSTRAINTS" | sha256sum | cut -c1-16)-$EXTRAS"
ensure_venv "$VENV" "$want" "installing default-moe[$EXTRAS] into $VENV (constraints: $CONSTRAINTS)" install_main
export PATH="$VENV/bin:$PATH"
