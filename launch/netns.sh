#!/usr/bin/env bash
# Three "hosts" on one machine: network namespaces on a switch, one of them behind a shaped link.
#   launch/netns.sh up      # create h0 h1 h2 (10.77.0.1-3) and the switch; shape h1's link
#   launch/netns.sh down    # delete them all (also after a failed or partial `up`)
#   launch/netns.sh status  # namespaces, addresses and the shaping in place
# Needs root and iproute2 (`ip netns`, `tc`). Settings (environment, with defaults):
#   NETNS_PREFIX=es-       namespace names: ${NETNS_PREFIX}h0.. and the switch ${NETNS_PREFIX}sw
#   NETNS_SUBNET=10.77.0   host k gets ${NETNS_SUBNET}.(k+1)/24
#   NETNS_HOSTS=3          how many hosts
#   SHAPE_HOST=1           which host's link is shaped (empty: none)
#   SHAPE_RATE=5mbit       tc tbf rate, applied in both directions of that host's link
# The switch is a bridge inside its own namespace, so nothing is added to the machine's own
# network and `down` is just deleting namespaces (their interfaces and qdiscs go with them).
# The kernel here has tbf but no netem, so the link is shaped in rate only: its latency stays
# that of a veth pair.
set -euo pipefail
PREFIX=${NETNS_PREFIX:-es-}
SUBNET=${NETNS_SUBNET:-10.77.0}
HOSTS=${NETNS_HOSTS:-3}
SHAPE_HOST=${SHAPE_HOST-1}
SHAPE_RATE=${SHAPE_RATE:-5mbit}
SW=${PREFIX}sw

say() { echo "netns: $*" >&2; }

down() {
    local ns
    for ns in "$SW" $(seq -f "${PREFIX}h%g" 0 $((HOSTS - 1))); do
        if ip netns list | awk '{print $1}' | grep -qx -- "$ns"; then
            ip netns del "$ns" && say "deleted $ns"
        fi
    done
}

shape() {  # shape(namespace, device): token bucket at SHAPE_RATE on the device's egress
    # burst 32kbit: a 4 KB bucket, small against the 64 KiB messages the profiler times;
    # latency 50ms: the most a packet may queue before tbf drops it (TCP then backs off)
    ip -n "$1" link set "$2" txqueuelen 1000
    tc -n "$1" qdisc add dev "$2" root tbf rate "$SHAPE_RATE" burst 32kbit latency 50ms
}

up() {
    ip netns add "$SW"
    ip -n "$SW" link add br0 type bridge
    ip -n "$SW" link set br0 up
    ip -n "$SW" link set lo up
    local k ns
    for k in $(seq 0 $((HOSTS - 1))); do
        ns=${PREFIX}h$k
        ip netns add "$ns"
        ip -n "$ns" link set lo up
        # one veth pair per host: eth0 inside the host, p$k on the switch
        ip -n "$ns" link add eth0 type veth peer name "p$k" netns "$SW"
        ip -n "$ns" addr add "$SUBNET.$((k + 1))/24" dev eth0
        ip -n "$ns" link set eth0 up
        ip -n "$SW" link set "p$k" master br0
        ip -n "$SW" link set "p$k" up
        if [[ "$k" == "$SHAPE_HOST" ]]; then
            shape "$ns" eth0      # host -> switch
            shape "$SW" "p$k"     # switch -> host
        fi
        say "$ns: $SUBNET.$((k + 1))$([[ "$k" == "$SHAPE_HOST" ]] && echo " (link shaped: tbf $SHAPE_RATE)")"
    done
}

status() {
    local ns
    ip netns list
    for ns in $(seq -f "${PREFIX}h%g" 0 $((HOSTS - 1))); do
        ip -n "$ns" -brief addr show dev eth0 2>/dev/null || continue
        tc -n "$ns" qdisc show dev eth0
    done
}

case "${1:-}" in
    up)
        # a failed `up` leaves nothing behind
        trap 'say "setup failed; removing what was made"; down' ERR
        down
        up
        trap - ERR
        ;;
    down) down ;;
    status) status ;;
    *) echo "usage: launch/netns.sh up|down|status" >&2; exit 2 ;;
esac
