#!/usr/bin/env bash
# Two "nodes" on one machine: Linux network namespaces joined by a veth pair (root needed).
#   bash launch/multinode_netns.sh up        # create dmA (10.77.0.1) and dmB (10.77.0.2)
#   bash launch/multinode_netns.sh run A|B CMD...   # run CMD inside a node, GLOO_SOCKET_IFNAME set
#   bash launch/multinode_netns.sh down      # delete both (also removes the veth pair)
# Both nodes see their end of the link under one name, <prefix>eth, so that one
# GLOO_SOCKET_IFNAME serves a job spread over both (as on a cluster whose nodes share eth0).
# Used by tests/test_multinode.py (torchrun), tests/test_cluster.py (SLURM, DeepSpeed's runner).
set -euo pipefail
PREFIX="${DM_NETNS_PREFIX:-dm}"
case "${1:-}" in
  up)
    "$0" down >/dev/null 2>&1 || true
    ip netns add "${PREFIX}A"
    ip netns add "${PREFIX}B"
    ip link add "${PREFIX}vA" type veth peer name "${PREFIX}vB"
    ip link set "${PREFIX}vA" netns "${PREFIX}A"
    ip link set "${PREFIX}vB" netns "${PREFIX}B"
    ip netns exec "${PREFIX}A" ip link set "${PREFIX}vA" name "${PREFIX}eth"
    ip netns exec "${PREFIX}B" ip link set "${PREFIX}vB" name "${PREFIX}eth"
    ip netns exec "${PREFIX}A" ip addr add 10.77.0.1/24 dev "${PREFIX}eth"
    ip netns exec "${PREFIX}B" ip addr add 10.77.0.2/24 dev "${PREFIX}eth"
    for n in A B; do
      ip netns exec "${PREFIX}$n" ip link set "${PREFIX}eth" up
      ip netns exec "${PREFIX}$n" ip link set lo up
    done
    ;;
  run)
    node="$2"; shift 2
    exec ip netns exec "${PREFIX}${node}" env GLOO_SOCKET_IFNAME="${PREFIX}eth" "$@"
    ;;
  down)
    ip netns del "${PREFIX}A" 2>/dev/null || true
    ip netns del "${PREFIX}B" 2>/dev/null || true
    ;;
  *)
    echo "usage: $0 up | run A|B CMD... | down" >&2
    exit 2
    ;;
esac
