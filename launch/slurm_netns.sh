#!/usr/bin/env bash
# A throw-away two-node SLURM cluster on one machine (root; Debian packages slurm-wlm and munge):
# the network-namespace nodes of launch/multinode_netns.sh (10.77.0.1, 10.77.0.2), one munged
# with a fresh key, slurmctld + slurmd on node A, slurmd on node B, 2 CPUs each. All state (conf,
# key, sockets, spool, logs) lives in DIR; nothing is written elsewhere.
#   bash launch/slurm_netns.sh up DIR           # start it; waits until both nodes are idle
#   bash launch/slurm_netns.sh run DIR CMD...   # a client command (sbatch, squeue, scontrol) on node A
#   bash launch/slurm_netns.sh lose DIR B       # node B lost: SIGKILL every process in its namespace
#   bash launch/slurm_netns.sh node-up DIR B    # node B back: its slurmd restarted
#   bash launch/slurm_netns.sh down DIR         # stop every daemon, delete the namespaces (always safe)
# SlurmdTimeout=6 and cred_expire=10 (the delay before a requeued job starts again) keep a node-loss
# test short; a real cluster's values are minutes.
# DM_NETNS_PREFIX (default dm) names the namespaces and nodes (<prefix>A/B, <prefix>nodeA/B).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PREFIX="${DM_NETNS_PREFIX:-dm}"
NETNS="$ROOT/launch/multinode_netns.sh"
cmd="${1:-}"
DIR="$(realpath -m "${2:?usage: $0 up|run|down DIR ...}")"
shift 2

conf() {
  cat <<CONF
ClusterName=${PREFIX}cluster
SlurmctldHost=$(hostname -s)(10.77.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$DIR/munge.socket,cred_expire=10
CredType=cred/munge
StateSaveLocation=$DIR/ctld
SlurmdSpoolDir=$DIR/slurmd.%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.%n.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
MinJobAge=3600
KillWait=5
SlurmdTimeout=6
JobRequeue=1
NodeName=${PREFIX}nodeA NodeAddr=10.77.0.1 CPUs=2 State=UNKNOWN
NodeName=${PREFIX}nodeB NodeAddr=10.77.0.2 CPUs=2 State=UNKNOWN
PartitionName=debug Nodes=${PREFIX}nodeA,${PREFIX}nodeB Default=YES MaxTime=INFINITE State=UP
CONF
}

in_node() {  # in_node A|B CMD...: CMD inside that node with this cluster's config
  local node="$1"; shift
  ip netns exec "${PREFIX}$node" env SLURM_CONF="$DIR/slurm.conf" "$@"
}

slurmd_in() {  # slurmd needs the cgroup (v1) filesystems mounted to start: `ip netns exec` gives
  # each node its own /sys (a private mount namespace); mounting the controllers there touches
  # nothing outside the node.
  local node="$1"
  ip netns exec "${PREFIX}$node" sh -c "mount -t tmpfs tmpfs /sys/fs/cgroup
    for c in cpuset memory freezer devices cpu cpuacct pids; do
      mkdir -p /sys/fs/cgroup/\$c && mount -t cgroup -o \$c cgroup /sys/fs/cgroup/\$c 2>/dev/null || true
    done
    exec slurmd -f '$DIR/slurm.conf' -N '${PREFIX}node$node'"
}

case "$cmd" in
  up)
    "$0" down "$DIR" >/dev/null 2>&1 || true
    mkdir -p "$DIR/ctld" "$DIR/munge" "$DIR/slurmd.${PREFIX}nodeA" "$DIR/slurmd.${PREFIX}nodeB"
    conf > "$DIR/slurm.conf"
    printf 'CgroupPlugin=cgroup/v1\nCgroupMountpoint=/sys/fs/cgroup\n' > "$DIR/cgroup.conf"
    dd if=/dev/urandom of="$DIR/munge.key" bs=1024 count=1 status=none
    chmod 600 "$DIR/munge.key"
    chmod 700 "$DIR/munge"
    bash "$NETNS" up
    munged --force --key-file="$DIR/munge.key" --socket="$DIR/munge.socket" --pid-file="$DIR/munged.pid" \
      --log-file="$DIR/munged.log" --seed-file="$DIR/munge/seed"
    in_node A slurmctld -f "$DIR/slurm.conf"
    slurmd_in A
    slurmd_in B
    for _ in $(seq 1 60); do
      idle="$(in_node A sinfo -h -N -o '%N %T' 2>/dev/null | grep -c ' idle' || true)"
      [ "$idle" = 2 ] && exit 0
      sleep 1
    done
    echo "[slurm] nodes not idle after 60 s; logs in $DIR" >&2
    in_node A sinfo -N >&2 || true
    exit 1
    ;;
  run)
    in_node A "$@"
    ;;
  lose)
    node="${1:?usage: $0 lose DIR A|B}"
    pids="$(ip netns pids "${PREFIX}$node" || true)"
    [ -n "$pids" ] && kill -9 $pids 2>/dev/null || true
    ;;
  node-up)
    node="${1:?usage: $0 node-up DIR A|B}"
    slurmd_in "$node"
    ;;
  down)
    for f in "$DIR"/slurmd.*.pid "$DIR/slurmctld.pid" "$DIR/munged.pid"; do
      [ -f "$f" ] && kill "$(cat "$f")" 2>/dev/null || true
    done
    sleep 1
    # Jobs' processes (slurmstepd and below) and any daemon that did not stop.
    pkill -9 -f "slurmstepd.*" 2>/dev/null || true
    pkill -9 -f -- "$DIR/slurm.conf" 2>/dev/null || true
    pkill -9 -f -- "--socket=$DIR/munge.socket" 2>/dev/null || true
    bash "$NETNS" down
    ;;
  *)
    echo "usage: $0 up|run|lose|node-up|down DIR [CMD...]" >&2
    exit 2
    ;;
esac
