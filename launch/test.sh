#!/usr/bin/env bash
# The test command: sets up .venv (megatron-core 0.16.1, DeepSpeed, transformers) and .venv-mcore019
# (megatron-core 0.19.2), runs the whole suite in the first, then the Megatron tests (marker
# "megatron") again in the second. Lint and format check (ruff, pinned) and the strict docs build
# first: a finding, an unformatted file or a broken link fails the command.
# Extra args go to both pytest runs.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/launch/env.sh"
source "$ROOT/launch/env_mcore019.sh"
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
[ "$rc" != 0 ] && exit "$rc"
exit "$rc2"
