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
source "$ROOT/launch/venv_common.sh"

install_mcore019() {
  local pip=("$1" -m pip install -c "$CONSTRAINTS2")
  # (&&: set -e does not apply inside a function called from a condition)
  "${pip[@]}" torch numpy triton pybind11 setuptools wheel packaging einops psutil tqdm &&
    "${pip[@]}" -e "$ROOT[test,megatron_lm]" &&
    # megatron-core 0.19 declares Python >= 3.12 but runs on 3.11; its sdist builds with the
    # already-installed build tools (no isolation) and without pulling its optional dependencies.
    "${pip[@]}" --no-build-isolation --no-deps --ignore-requires-python "megatron-core==$MCORE019_VERSION"
}

want2="$(cat "$ROOT/setup.cfg" "$ROOT/pyproject.toml" "$CONSTRAINTS2" | sha256sum | cut -c1-16)-mcore$MCORE019_VERSION"
ensure_venv "$VENV2" "$want2" "installing megatron-core $MCORE019_VERSION + default-moe[test] into $VENV2" install_mcore019
MCORE019_PY="$VENV2/bin/python"
export MCORE019_PY
