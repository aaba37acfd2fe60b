#!/usr/bin/env bash
# Builds .whl/: the wheels launch/device_check.sh installs on a GPU machine without internet
# (Python 3.12, CUDA torch, numpy/tqdm/tokenizers/matplotlib/tensorboard/pytest already there).
# DeepSpeed is built here as a pure-Python wheel (DS_BUILD_OPS=0); the rest are downloaded for
# cp312 manylinux. .whl/ is git-ignored; the device tool carries it (`carry=[".whl"]`).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/launch/env.sh"
cd "$ROOT"
mkdir -p .whl
DS_BUILD_OPS=0 python -m pip wheel -q --no-deps --no-build-isolation -w .whl "deepspeed==0.19.8"
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  hjson "pydantic==2.14.3" "$(python -c 'import pydantic_core; print("pydantic-core==" + pydantic_core.__version__)')" \
  annotated-types typing-inspection "megatron-core==0.16.1"
ls -la .whl
du -sh .whl
