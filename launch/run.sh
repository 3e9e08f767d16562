#!/usr/bin/env bash
# Run a job on the ranks of a hostfile:
#   launch/run.sh jobs/demo.toml [--overwrite] [other `edgeshard run` options]
#   HOSTFILE=hostfiles/local4.hosts NP=4 launch/run.sh jobs/demo.toml --overwrite
# Every setting is an environment variable with a default; the command is printed before it runs.
#   HOSTFILE=hostfiles/local3.hosts   MPICH hostfile with `# device:` lines
#   NP=<the hostfile's slots>         ranks to start
#   PYTHON=python                     the interpreter with edgeshard_mpi installed
#   MPIEXEC=mpiexec                   launcher (e.g. launch/netns-mpiexec.sh for namespaced hosts)
#   MPIEXEC_ARGS=                     extra mpiexec options, split on spaces (e.g. "-launcher ssh")
#   MPIR_CVAR_ENABLE_HEAVY_YIELD=1    MPICH: blocking calls yield the core instead of spinning
set -euo pipefail
JOB=${1:?usage: launch/run.sh JOB.toml [edgeshard run options]}
shift
HOSTFILE=${HOSTFILE:-"hostfiles/local3.hosts"}
if [[ ! -f "$HOSTFILE" ]]; then
    echo "launch/run.sh: hostfile $HOSTFILE not found (set HOSTFILE)" >&2
    exit 2
fi
# one rank per slot of the hostfile ("host" or "host:slots" lines; comments skipped)
NP=${NP:-$(awk -F: '!/^[[:space:]]*(#|$)/ { n += ($2 == "" ? 1 : $2) } END { print n + 0 }' "$HOSTFILE")}
PYTHON=${PYTHON:-python}
MPIEXEC=${MPIEXEC:-mpiexec}
read -r -a extra <<< "${MPIEXEC_ARGS:-}"
# MPICH: blocking calls yield the core instead of spinning (our own waits never spin either)
export MPIR_CVAR_ENABLE_HEAVY_YIELD=${MPIR_CVAR_ENABLE_HEAVY_YIELD:-1}
cmd=("$MPIEXEC" ${extra[@]+"${extra[@]}"} -f "$HOSTFILE" -n "$NP" "$PYTHON" -m edgeshard_mpi run "$JOB"
     --hostfile "$HOSTFILE" "$@")
# printed as a shell line that can be pasted to rerun it, the MPICH setting included
printf -v line '%q ' "${cmd[@]}"
echo "+ MPIR_CVAR_ENABLE_HEAVY_YIELD=$MPIR_CVAR_ENABLE_HEAVY_YIELD ${line% }" >&2
exec "${cmd[@]}"
