#!/usr/bin/env bash
# Creates or refreshes the second test env, .venv-mcore019: megatron-core 0.19.2 (current release)
# next to the main .venv's 0.16.1, so that every Megatron test runs on both. Prints nothing on
# success; sourced by launch/test.sh, safe to run alone. Re-installs only when setup.cfg or the
# constraints change (stamp file). Sets MCORE019_PY to its python.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV2="${DEFAULT_MOE_VENV_MCORE019:-$ROOT/.venv-mcore019}"
CONSTRAINTS2="$ROOT/configs/constraints-mcore019.txt"
MCORE019_VERSION="0.19.2"
PY="${PYTHON:-python3}"

if [ ! -x "$VENV2/bin/python" ]; then
  echo "[env] creating $VENV2" >&2
  "$PY" -m venv "$VENV2"
fi
stamp2="$VENV2/.default-moe-stamp"
want2="$(cat "$ROOT/setup.cfg" "$ROOT/pyproject.toml" "$CONSTRAINTS2" | sha256sum | cut -c1-16)-mcore$MCORE019_VERSION"
if [ "$(cat "$stamp2" 2>/dev/null)" != "$want2" ]; then
  echo "[env] installing megatron-core $MCORE019_VERSION + default-moe[test] into $VENV2" >&2
  log2="$VENV2/pip-install.log"
  pip2=("$VENV2/bin/python" -m pip install -c "$CONSTRAINTS2")
  # megatron-core 0.19 declares Python >= 3.12 but runs on 3.11; its sdist builds with the
  # already-installed build tools (no isolation) and without pulling its optional dependencies.
  if ! { "$VENV2/bin/python" -m pip install --upgrade "pip>=23" &&
         "${pip2[@]}" torch numpy triton pybind11 setuptools wheel packaging einops psutil tqdm &&
         "${pip2[@]}" -e "$ROOT[test,megatron_lm]" &&
         "${pip2[@]}" --no-build-isolation --no-deps --ignore-requires-python "megatron-core==$MCORE019_VERSION"; } >"$log2" 2>&1; then
    tail -n 40 "$log2" >&2
    echo "[env] pip install failed; full log: $log2" >&2
    exit 1
  fi
  echo "$want2" > "$stamp2"
fi
MCORE019_PY="$VENV2/bin/python"
export MCORE019_PY
