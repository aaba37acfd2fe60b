#!/usr/bin/env bash
# Shared by launch/env.sh and launch/env_mcore019.sh (sourced): a virtual env kept in step with a
# stamp. ensure_venv VENV WANT MESSAGE INSTALL_FN creates VENV if needed and, when its stamp is not
# WANT, prints MESSAGE and runs `INSTALL_FN VENV_PYTHON` with output to VENV/pip-install.log (shown
# only if it fails), then writes the stamp.
ensure_venv() {
  local venv="$1" want="$2" message="$3" install="$4"
  if [ ! -x "$venv/bin/python" ]; then
    echo "[env] creating $venv" >&2
    "${PYTHON:-python3}" -m venv "$venv"
  fi
  local stamp="$venv/.default-moe-stamp" log="$venv/pip-install.log"
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "[env] $message" >&2
    if ! { "$venv/bin/python" -m pip install --upgrade "pip>=23" && "$install" "$venv/bin/python"; } >"$log" 2>&1; then
      tail -n 40 "$log" >&2
      echo "[env] pip install failed; full log: $log" >&2
      exit 1
    fi
    echo "$want" > "$stamp"
  fi
}
