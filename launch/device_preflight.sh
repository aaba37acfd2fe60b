#!/usr/bin/env bash
# Rehearses the one GPU run here, on CPU, before any device minute is spent: a Python 3.12 +
# torch 2.11 env holding what the GPU machine's image holds (configs/constraints-device.txt and the
# names below, from library/device/KINDS.md), the carried wheels installed the way
# launch/device_check.sh installs them there (into a private --target, shadowing the image), and
# the whole device check as a dry run from a copy of what the device tool sends (the working tree) plus .whl/ and .science/.
# A part that fails here (a wheel that does not import on 3.12, a package the image lacks, a
# pytest option without its plugin) would fail on the GPU too. Args go to device_check.py.
#   bash launch/device_preflight.sh                    # -> runs/device_preflight/out/{summary.json,report.md,...}
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
source "$ROOT/launch/venv_common.sh"
if [ -z "${PY312:-}" ]; then  # the first python3.12 that runs (a pyenv shim may not)
  for candidate in $(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12 2>/dev/null) $(command -v python3.12 || true); do
    if "$candidate" -c "" 2>/dev/null; then PY312="$candidate"; break; fi
  done
fi
if [ -z "${PY312:-}" ]; then
  echo "[preflight] no python3.12 here (the GPU machine runs 3.12.3); set PY312" >&2
  exit 2
fi
VENV="${DEFAULT_MOE_VENV_DEVICE:-$ROOT/.venv-device}"
CONSTRAINTS="$ROOT/configs/constraints-device.txt"
# The image's packages the device check, DeepSpeed and megatron-core reach (not the carried ones).
IMAGE=(torch numpy tqdm tokenizers matplotlib tensorboard pytest pytest-timeout transformers accelerate
  safetensors msgpack ninja py-cpuinfo nvidia-ml-py psutil einops rich pyyaml packaging scipy)
install_device() { "$1" -m pip install -c "$CONSTRAINTS" "${IMAGE[@]}"; }
want="$(cat "$CONSTRAINTS" "$0" | sha256sum | cut -c1-16)-device"
PYTHON="$PY312" ensure_venv "$VENV" "$want" "creating the device rehearsal env $VENV (Python 3.12, torch 2.11)" install_device

[ -d .whl ] || bash launch/device_wheels.sh
[ -f .science/tokens.bin.xz ] || .venv/bin/python launch/build_science_corpus.py

WORK="$ROOT/runs/device_preflight"
rm -rf "$WORK" && mkdir -p "$WORK/tree"
# What the device tool sends: tracked and untracked-not-ignored files, plus the carried folders.
git ls-files -z --cached --others --exclude-standard | tar --null -T - -cf - | tar -x -C "$WORK/tree"
cp -r .whl .science "$WORK/tree/"
cd "$WORK/tree"
DEVICE_SITE="$WORK/site" PYTHON="$VENV/bin/python" bash launch/device_check.sh --dry-run --out "$WORK/out" \
  --runs-root "$WORK/runs" "$@"
