#!/usr/bin/env bash
# Creates or refreshes the project's virtual env (.venv) and prints nothing else on success.
# Sourced by launch/run.sh and launch/test.sh; safe to run alone: `bash launch/env.sh`.
# Re-installs only when setup.cfg or the constraints change (a stamp file holds their hash).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${DEFAULT_MOE_VENV:-$ROOT/.venv}"
CONSTRAINTS="${DEFAULT_MOE_CONSTRAINTS:-$ROOT/configs/constraints.txt}"
EXTRAS="${DEFAULT_MOE_EXTRAS:-test,deepspeed,megatron,megatron_lm,train,hf}"
PY="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[env] creating $VENV" >&2
  "$PY" -m venv "$VENV"
fi
stamp="$VENV/.default-moe-stamp"
want="$(cat "$ROOT/setup.cfg" "$ROOT/pyproject.toml" "$CONSTRAINTS" | sha256sum | cut -c1-16)-$EXTRAS"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[env] installing default-moe[$EXTRAS] into $VENV (constraints: $CONSTRAINTS)" >&2
  log="$VENV/pip-install.log"
  # pip's output goes to a log, shown only if the install fails.
  if ! { "$VENV/bin/python" -m pip install --upgrade "pip>=23" &&
         "$VENV/bin/python" -m pip install -c "$CONSTRAINTS" -e "$ROOT[$EXTRAS]"; } >"$log" 2>&1; then
    tail -n 40 "$log" >&2
    echo "[env] pip install failed; full log: $log" >&2
    exit 1
  fi
  echo "$want" > "$stamp"
fi
export PATH="$VENV/bin:$PATH"
