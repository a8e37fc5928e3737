#!/usr/bin/env bash
# Test hosts for stemstream in network namespaces: detector, worker1, worker2, head, each with one
# veth "eth0" plugged into a Linux bridge. The bridge lives in its own namespace (${P}switch) so
# nothing touches the root namespace's links, routes or firewall (br_netfilter is built in here and
# bridge-nf-call-iptables=1: a bridge in the root namespace would be subject to the host's
# iptables FORWARD policy, e.g. Docker's DROP). BRIDGE_NS=root puts the bridge in the root namespace.
#
#   bash netns.sh up        # create (idempotent: tears down first), bring up, check pings
#   bash netns.sh check     # ping matrix
#   bash netns.sh cut HOST  # take HOST's link down (bridge side)   e.g. cut worker2
#   bash netns.sh heal HOST # bring it back
#   bash netns.sh down      # stop processes inside, delete namespaces (veths go with them), bridge
#   bash netns.sh addr HOST # print HOST's address
#   ip netns exec ss-head python3 ...     # run anything "on" a host
#
# Env: NETNS_PREFIX (ss-), NETNS_SUBNET (10.77.0), BRIDGE_NS (switch|root)
set -euo pipefail
P=${NETNS_PREFIX:-ss-}
NET=${NETNS_SUBNET:-10.77.0}
BRIDGE_NS=${BRIDGE_NS:-switch}
BR=${P}br0
HOSTS=(head detector worker1 worker2)
declare -A IP=([head]=$NET.10 [detector]=$NET.20 [worker1]=$NET.21 [worker2]=$NET.22)

if [ "$BRIDGE_NS" = root ]; then SW=(); else SW=(ip netns exec "${P}switch"); fi
sw() { "${SW[@]}" "$@"; }        # run a command where the bridge is

down() {
    # 'ip netns del' only removes the name: processes still inside keep the namespace (and its
    # veth) alive. Stop them first: SIGTERM, 3 s grace, SIGKILL.
    local pids="" h
    for h in "${HOSTS[@]}" switch; do pids+=" $( { ip netns pids "$P$h" 2>/dev/null || true; } | tr '\n' ' ')"; done
    if [ -n "${pids// /}" ]; then
        kill $pids 2>/dev/null || true
        for _ in $(seq 30); do
            local alive=""; for p in $pids; do [ -d "/proc/$p" ] && ! grep -q ') Z ' "/proc/$p/stat" 2>/dev/null && alive+=" $p"; done
            [ -z "$alive" ] && break; sleep 0.1
        done
        [ -n "$alive" ] && kill -9 $alive 2>/dev/null || true
    fi
    for h in "${HOSTS[@]}"; do ip netns del "$P$h" 2>/dev/null || true; done   # deletes the veth pairs too
    ip link del "$BR" 2>/dev/null || true                                      # root-namespace variant
    for h in "${HOSTS[@]}"; do ip link del "$P$h" 2>/dev/null || true; done
    ip netns del "${P}switch" 2>/dev/null || true
}

up() {
    command -v ping >/dev/null || { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iputils-ping >/dev/null; }
    down
    if [ "$BRIDGE_NS" != root ]; then
        ip netns add "${P}switch"
        sw ip link set lo up
    fi
    sw ip link add "$BR" type bridge
    sw ip link set "$BR" up
    for h in "${HOSTS[@]}"; do
        ns=$P$h
        ip netns add "$ns"
        # veth pair: "$ns" end goes to the bridge, "eth0" end into the host namespace
        ip link add "$ns" type veth peer name "tmp-$h"
        ip link set "tmp-$h" netns "$ns"
        ip -n "$ns" link set "tmp-$h" name eth0
        [ "$BRIDGE_NS" = root ] || ip link set "$ns" netns "${P}switch"
        sw ip link set "$ns" master "$BR"
        sw ip link set "$ns" up
        ip -n "$ns" addr add "${IP[$h]}/24" dev eth0
        ip -n "$ns" link set eth0 up
        ip -n "$ns" link set lo up      # a new namespace's lo is DOWN: 127.0.0.1 unusable until this
    done
    # wait for the bridge ports to leave the 'listening/learning' STP states (STP off: immediate)
    sleep 0.2
    check
}

check() {
    local ok=0 bad=0
    for a in "${HOSTS[@]}"; do for b in "${HOSTS[@]}"; do
        [ "$a" = "$b" ] && continue
        if ip netns exec "$P$a" ping -c 1 -W 1 -q "${IP[$b]}" >/dev/null 2>&1; then ok=$((ok+1)); else bad=$((bad+1)); echo "  no route $a -> $b (${IP[$b]})"; fi
    done; done
    echo "ping matrix: $ok ok, $bad failed"
    [ "$bad" = 0 ]
}

case "${1:-}" in
    up) up ;;
    down) down; echo "netns down" ;;
    check) check ;;
    cut) sw ip link set "$P${2:?host}" down; echo "cut $2" ;;
    heal) sw ip link set "$P${2:?host}" up; echo "healed $2" ;;
    addr) echo "${IP[${2:?host}]}" ;;
    *) sed -n '2,17p' "$0"; exit 2 ;;
esac
