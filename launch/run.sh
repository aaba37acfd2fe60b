#!/usr/bin/env bash
# The main job: sets up .venv, then runs on all local ranks (2 CPU processes here; one per GPU
# where GPUs are present). Until the DeepSpeed training job lands, this is the EP demo of the layer.
# Extra args go to the Python entry point.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/launch/env.sh"
cd "$ROOT"
NPROC="${NPROC:-$(python -c 'import torch; print(torch.cuda.device_count() or 2)')}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec torchrun --standalone --nproc_per_node "$NPROC" launch/demo_layer.py "$@"
