#!/usr/bin/env bash
# Several hosts on one machine, for testing what crosses a real network: N network
# namespaces, each with its own address, joined by a bridge; links can be cut and healed.
#
#   deploy/netns.sh up N                 namespaces ${PREFIX}0..N-1 at ${SUBNET}.1..N on bridge br-${PREFIX}
#   deploy/netns.sh split "0 1" "2 3"    no traffic between the two groups
#   deploy/netns.sh isolate I            namespace I reaches nobody and nobody reaches it
#   deploy/netns.sh heal                 every link back
#   deploy/netns.sh exec I CMD...        run CMD inside namespace I
#   deploy/netns.sh down                 remove namespaces and bridge
#
# Needs root (or CAP_NET_ADMIN) and iproute2. PREFIX (default ehr) and SUBNET (default
# 10.77.0) come from the environment, so several test beds can exist side by side.
set -euo pipefail
PREFIX=${PREFIX:-ehr}
SUBNET=${SUBNET:-10.77.0}
BRIDGE="br-${PREFIX}"

ns() { echo "${PREFIX}$1"; }
addr() { echo "${SUBNET}.$(( $1 + 1 ))"; }
count() { ip netns list | awk '{print $1}' | grep -c "^${PREFIX}[0-9]\+$" || true; }

block() {  # block A B: no packets from namespace A to B's address
  ip -n "$(ns "$1")" route replace blackhole "$(addr "$2")/32"
}

case "${1:-}" in
  up)
    n=${2:?usage: up N}
    ip link add "$BRIDGE" type bridge
    ip link set "$BRIDGE" up
    for ((i = 0; i < n; i++)); do
      ip netns add "$(ns "$i")"
      ip link add "${PREFIX}h$i" type veth peer name eth0 netns "$(ns "$i")"
      ip link set "${PREFIX}h$i" master "$BRIDGE" up
      ip -n "$(ns "$i")" addr add "$(addr "$i")/24" dev eth0
      ip -n "$(ns "$i")" link set eth0 up
      ip -n "$(ns "$i")" link set lo up
    done
    ;;
  split)
    for a in $2; do for b in $3; do block "$a" "$b"; block "$b" "$a"; done; done
    ;;
  isolate)
    i=${2:?usage: isolate I}
    for ((j = 0; j < $(count); j++)); do
      if [ "$j" != "$i" ]; then block "$i" "$j"; block "$j" "$i"; fi
    done
    ;;
  heal)
    for ((i = 0; i < $(count); i++)); do ip -n "$(ns "$i")" route flush type blackhole; done
    ;;
  exec)
    i=${2:?usage: exec I CMD...}; shift 2
    exec ip netns exec "$(ns "$i")" "$@"
    ;;
  down)
    for ((i = 0; i < $(count) + 8; i++)); do ip netns del "$(ns "$i")" 2>/dev/null || true; done
    ip link del "$BRIDGE" 2>/dev/null || true
    ;;
  *)
    sed -n '2,13p' "$0" >&2
    exit 2
    ;;
esac
