#!/usr/bin/env bash
# Multi-node torchrun (rendezvous by master address/port). Set on every node:
#   NNODES (number of nodes), NODE_RANK (0..NNODES-1), MASTER_ADDR (node 0's address),
#   MASTER_PORT (default 29500), NPROC_PER_NODE (default: GPUs, else 2);
#   on CPU clusters GLOO_SOCKET_IFNAME (the interface the nodes share); NCCL_SOCKET_IFNAME on GPU.
# Usage: launch/torchrun_multinode.sh SCRIPT [ARGS...]   e.g. launch/train.py --ep-size 4
set -euo pipefail
: "${NNODES:?set NNODES}" "${NODE_RANK:?set NODE_RANK}" "${MASTER_ADDR:?set MASTER_ADDR}"
NPROC_PER_NODE="${NPROC_PER_NODE:-$(python -c 'import torch; print(torch.cuda.device_count() or 2)')}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec torchrun --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$NPROC_PER_NODE" \
  --master_addr "$MASTER_ADDR" --master_port "${MASTER_PORT:-29500}" "$@"
