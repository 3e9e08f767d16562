#!/usr/bin/env bash
# An "ssh" for MPICH's hydra that enters a network namespace instead of logging in to a host:
#   mpiexec -launcher ssh -launcher-exec launch/netns-exec.sh -f HOSTS ...
# hydra calls it as `netns-exec.sh [-x] HOST ARG...`, with ARG... the proxy's command line quoted
# for a remote shell (as ssh would pass it), so the words are joined and run by `sh -c`, as sshd
# does. HOST is an address that one of launch/netns.sh's hosts holds (${NETNS_PREFIX:-es-}h*, the
# same prefix as that script, read from the environment mpiexec passes on); that namespace runs it.
# Only those namespaces are searched: another set made with another prefix has the same addresses.
set -euo pipefail
while [[ "${1:-}" == -* ]]; do shift; done  # ssh options hydra adds (-x: no X forwarding)
host=${1:?usage: netns-exec.sh [-x] HOST COMMAND...}
shift
ns=""
prefix=${NETNS_PREFIX:-es-}
for candidate in $(ip netns list | awk -v p="${prefix}h" 'index($1, p) == 1 {print $1}'); do
    # no `ip | grep -q` here: grep leaving early would fail the pipe under pipefail
    addrs=$(ip -n "$candidate" -o addr show 2>/dev/null || true)
    if [[ "$addrs" == *"inet $host/"* ]]; then
        ns=$candidate
        break
    fi
done
if [[ -z "$ns" ]]; then
    echo "netns-exec.sh: no namespace ${prefix}h* has the address $host (launch/netns.sh up made them?)" >&2
    exit 255
fi
exec ip netns exec "$ns" sh -c "$*"
