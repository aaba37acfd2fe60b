#!/usr/bin/env bash
# torchrun on this machine: one process per GPU, or NPROC (default 2) CPU processes with one
# thread each. Usage: launch/torchrun_local.sh SCRIPT [ARGS...]
set -euo pipefail
NPROC="${NPROC:-$(python -c 'import torch; print(torch.cuda.device_count() or 2)')}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec torchrun --standalone --nproc_per_node "$NPROC" "$@"
