#!/usr/bin/env bash
# The test command: sets up .venv (megatron-core 0.16.1, DeepSpeed, transformers) and .venv-mcore019
# (megatron-core 0.19.2) and .venv-torch211 (torch 2.11.0, the package's floor), runs the whole
# suite in the first, the Megatron tests (marker "megatron") again in the second, and the layer,
# GPU stand-in and compile tests again in the third. Lint and format check (ruff, pinned) and the strict docs build
# first: a finding, an unformatted file or a broken link fails the command.
# Extra args go to both pytest runs.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/launch/env.sh"
source "$ROOT/launch/env_mcore019.sh"
source "$ROOT/launch/env_torch211.sh"
cd "$ROOT"
echo "[test] ruff check and ruff format --check (pyproject.toml [tool.ruff])"
python -m ruff check plugin launch tests
python -m ruff format --check plugin launch tests
echo "[test] docs site (mkdocs.yml), strict: a broken link or anchor fails"
site="$(mktemp -d)"
NO_MKDOCS_2_WARNING=1 python -m mkdocs build --strict --quiet --site-dir "$site"
rm -rf "$site"
rc=0
python -m pytest "$@" || rc=$?
echo "[test] the Megatron tests again on megatron-core 0.19.2 ($MCORE019_PY)"
rc2=0
"$MCORE019_PY" -m pytest -m megatron "$@" || rc2=$?
[ "$rc2" = 5 ] && rc2=0  # 5: the selection held no Megatron test
echo "[test] the layer, GPU stand-in and compile tests again on torch 2.11.0 ($TORCH211_PY)"
rc3=0
"$TORCH211_PY" -m pytest tests/test_layer.py tests/test_gpu_standins.py tests/test_compile.py "$@" || rc3=$?
[ "$rc3" = 5 ] && rc3=0  # 5: the selection (e.g. -k from the arguments) held none of them
[ "$rc" != 0 ] && exit "$rc"
[ "$rc2" != 0 ] && exit "$rc2"
exit "$rc3"
