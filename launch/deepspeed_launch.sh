#!/usr/bin/env bash
# The main job through DeepSpeed's own launcher.
#   single node:  bash launch/deepspeed_launch.sh [train.py args]            (NUM_GPUS ranks, default 2 on CPU)
#   many nodes:   HOSTFILE=hostfile bash launch/deepspeed_launch.sh [args]   (see configs/hostfile.example:
#                 lines "host slots=N"; DeepSpeed reaches the hosts by passwordless ssh through pdsh;
#                 MASTER_ADDR = the first host's address; GLOO/NCCL_SOCKET_IFNAME in .deepspeed_env)
# Tested: single node (tests/test_train.py), and two ssh hosts in network namespaces, EP across
# both, losses equal to the single-node run (tests/test_cluster.py).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/launch/env.sh"
cd "$ROOT"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
if [ -n "${HOSTFILE:-}" ]; then
  exec deepspeed --hostfile "$HOSTFILE" ${MASTER_ADDR:+--master_addr "$MASTER_ADDR"} \
    ${MASTER_PORT:+--master_port "$MASTER_PORT"} launch/train.py "$@"
fi
NUM_GPUS="${NUM_GPUS:-$(python -c 'import torch; print(torch.cuda.device_count() or 2)')}"
exec deepspeed --num_nodes 1 --num_gpus "$NUM_GPUS" launch/train.py "$@"
