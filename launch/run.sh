#!/usr/bin/env bash
# Run a job on the ranks of a hostfile:
#   launch/run.sh jobs/demo.toml [--overwrite] [other `edgeshard run` options]
#   HOSTFILE=hostfiles/local4.hosts NP=4 launch/run.sh jobs/demo.toml --overwrite
# Every setting is an environment variable with a default; the command is printed before it runs.
set -euo pipefail
JOB=${1:?usage: launch/run.sh JOB.toml [edgeshard run options]}
shift
HOSTFILE=${HOSTFILE:-"hostfiles/local3.hosts"}
# one rank per slot of the hostfile ("host" or "host:slots" lines; comments skipped)
NP=${NP:-$(awk -F: '!/^[[:space:]]*(#|$)/ { n += ($2 == "" ? 1 : $2) } END { print n }' "$HOSTFILE")}
PYTHON=${PYTHON:-python}
MPIEXEC=${MPIEXEC:-mpiexec}
# MPICH: blocking calls yield the core instead of spinning (our own waits never spin either)
export MPIR_CVAR_ENABLE_HEAVY_YIELD=${MPIR_CVAR_ENABLE_HEAVY_YIELD:-1}
cmd=("$MPIEXEC" -f "$HOSTFILE" -n "$NP" "$PYTHON" -m edgeshard_mpi run "$JOB" --hostfile "$HOSTFILE" "$@")
echo "+ ${cmd[*]}" >&2
exec "${cmd[@]}"
