#!/usr/bin/env bash
# The main job: sets up .venv, then trains the tiny GPT-MoE (configs/gpt_tiny.json) through
# DeepSpeed with the "default_moe" section on all local ranks (2 CPU processes here, one per GPU
# where GPUs are present). Extra args go to launch/train.py, e.g. --steps 100, --router topk, --resume.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/launch/env.sh"
cd "$ROOT"
exec bash launch/torchrun_local.sh launch/train.py "$@"
