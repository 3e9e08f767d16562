#!/usr/bin/env bash
# mpiexec over the namespaced hosts of launch/netns.sh, as if they were machines on a network:
#   launch/netns.sh up
#   launch/netns-mpiexec.sh -f hostfiles/netns3.hosts -n 3 python -m edgeshard_mpi run JOB.toml
#   MPIEXEC=launch/netns-mpiexec.sh HOSTFILE=hostfiles/netns3.hosts launch/run.sh JOB.toml
# mpiexec itself runs in the first host's namespace and reaches the others through
# launch/netns-exec.sh (hydra's "ssh"). Settings (environment, with defaults):
#   NETNS_PREFIX=es-        as for launch/netns.sh; mpiexec runs in ${NETNS_PREFIX}h0
#   NETNS_MPIEXEC=mpiexec   the real mpiexec (MPICH hydra)
#   UCX_TLS=tcp,self        MPI traffic between hosts over TCP: UCX would otherwise see one
#                           machine and use shared memory, and the shaped link would carry nothing
#   UCX_NET_DEVICES=eth0    each namespace's one link (the other is lo)
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ns=${NETNS_PREFIX:-es-}h0
export UCX_TLS=${UCX_TLS:-tcp,self} UCX_NET_DEVICES=${UCX_NET_DEVICES:-eth0}
# -iface eth0: the proxies in the other namespaces call back to mpiexec at eth0's address (the
# machine's host name resolves to an address that no namespace can reach)
exec ip netns exec "$ns" "${NETNS_MPIEXEC:-mpiexec}" -launcher ssh -launcher-exec "$here/netns-exec.sh" \
    -iface eth0 "$@"
