#!/usr/bin/env bash
# The prepared GPU check (launch/device_check.py) on a machine with CUDA torch and no internet.
# Wheels for what that machine lacks (DeepSpeed, megatron-core and their pure-Python needs) travel
# in .whl/ (made here by `bash launch/device_wheels.sh`) and install into /tmp/site; the package
# itself runs from plugin/. Args go to device_check.py, e.g. --out "$OUT".
#   device tool:  run(command="bash launch/device_check.sh --out $OUT", carry=[".whl", ".science"], timeout_s=600)
# The science corpus (.science/, from launch/build_science_corpus.py) is read by the science part.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
SITE="${DEVICE_SITE:-/tmp/site}"  # launch/device_preflight.sh rehearses with a private one
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$ROOT/plugin${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# DeepSpeed must not JIT-build ops on the device (no time, and torch_adam is configured).
export DS_BUILD_OPS=0
exec "$PY" launch/device_check.py "$@"
