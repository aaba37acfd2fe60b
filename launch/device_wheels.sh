#!/usr/bin/env bash
# Builds .whl/: the wheels launch/device_check.sh installs on a GPU machine without internet
# (Python 3.12, CUDA torch, numpy/tqdm/tokenizers/matplotlib/tensorboard/pytest already there).
# DeepSpeed is built here as a pure-Python wheel (DS_BUILD_OPS=0); the rest are downloaded for
# cp312 manylinux: megatron-core 0.19.2 (0.16.1 cannot run its router on CUDA without Transformer
# Engine: NameError te_general_gemm), torchtitan 0.3.0 with what its MoE module imports
# (spmd_types, tyro and tyro's imports), einops and psutil for megatron-core, pydantic and hjson for DeepSpeed.
# .whl/ is git-ignored; the device tool carries it (`carry=[".whl", ".science"]`).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/launch/env.sh"
cd "$ROOT"
rm -rf .whl && mkdir -p .whl
DS_BUILD_OPS=0 python -m pip wheel -q --no-deps --no-build-isolation -w .whl "deepspeed==0.19.8"
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  hjson "pydantic==2.14.3" "$(python -c 'import pydantic_core; print("pydantic-core==" + pydantic_core.__version__)')" \
  annotated-types typing-inspection "megatron-core==0.19.2" "einops==0.8.2" psutil \
  "torchtitan==0.3.0" "spmd_types==0.2.3" tyro docstring-parser colorama shtab typeguard rich markdown-it-py mdurl
ls -la .whl
du -sh .whl
