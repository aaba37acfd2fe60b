#!/usr/bin/env bash
# Two ssh-reachable "hosts" on one machine (root; Debian packages openssh-server and pdsh): the
# network-namespace nodes of launch/multinode_netns.sh (10.77.0.1, 10.77.0.2), one sshd per node
# with a host key and a client key made for this run, root login by key only. All state lives in
# DIR, including DIR/bin/ssh: an ssh that uses DIR's key and accepts the throw-away host keys, for
# the PATH of the launching command (pdsh and DeepSpeed's runner call `ssh` from the PATH).
#   bash launch/ssh_netns.sh up DIR      # start both sshd; waits until both answer
#   bash launch/ssh_netns.sh down DIR    # stop them, delete the namespaces (always safe)
# DM_NETNS_PREFIX (default dm) names the namespaces.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PREFIX="${DM_NETNS_PREFIX:-dm}"
NETNS="$ROOT/launch/multinode_netns.sh"
cmd="${1:-}"
DIR="$(realpath -m "${2:?usage: $0 up|down DIR}")"

case "$cmd" in
  up)
    "$0" down "$DIR" >/dev/null 2>&1 || true
    mkdir -p "$DIR/bin"
    ssh-keygen -q -t ed25519 -N '' -f "$DIR/host_key"
    ssh-keygen -q -t ed25519 -N '' -f "$DIR/id"
    cp "$DIR/id.pub" "$DIR/authorized_keys"
    cat > "$DIR/sshd_config" <<CONF
HostKey $DIR/host_key
AuthorizedKeysFile $DIR/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
CONF
    cat > "$DIR/ssh_config" <<CONF
Host *
  IdentityFile $DIR/id
  IdentitiesOnly yes
  StrictHostKeyChecking no
  UserKnownHostsFile /dev/null
  LogLevel ERROR
  BatchMode yes
CONF
    printf '#!/bin/sh\nexec /usr/bin/ssh -F %s "$@"\n' "$DIR/ssh_config" > "$DIR/bin/ssh"
    chmod +x "$DIR/bin/ssh"
    mkdir -p /run/sshd  # sshd's privilege-separation directory (empty; Debian creates it at boot)
    bash "$NETNS" up
    for n in A B; do
      addr="10.77.0.$([ "$n" = A ] && echo 1 || echo 2)"
      ip netns exec "${PREFIX}$n" /usr/sbin/sshd -f "$DIR/sshd_config" -o "ListenAddress=$addr" \
        -o "PidFile=$DIR/sshd.$n.pid" -E "$DIR/sshd.$n.log"
    done
    for _ in $(seq 1 30); do
      if ip netns exec "${PREFIX}A" "$DIR/bin/ssh" 10.77.0.2 true 2>/dev/null &&
         ip netns exec "${PREFIX}A" "$DIR/bin/ssh" 10.77.0.1 true 2>/dev/null; then
        exit 0
      fi
      sleep 1
    done
    echo "[ssh] the nodes do not answer after 30 s; logs in $DIR" >&2
    exit 1
    ;;
  down)
    for f in "$DIR"/sshd.*.pid; do
      [ -f "$f" ] && kill "$(cat "$f")" 2>/dev/null || true
    done
    pkill -f -- "-f $DIR/sshd_config" 2>/dev/null || true
    bash "$NETNS" down
    ;;
  *)
    echo "usage: $0 up|down DIR" >&2
    exit 2
    ;;
esac
