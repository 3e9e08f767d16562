#!/usr/bin/env bash
# Run a job on the ranks of a hostfile, under `edgeshard launch`: a device lost mid-run is dropped
# and the job goes on without it (resumed on the survivors), up to MAX_RESTARTS times:
#   launch/run.sh jobs/demo.toml [--overwrite] [other `edgeshard run` options]
#   HOSTFILE=hostfiles/local4.hosts NP=4 launch/run.sh jobs/demo.toml --overwrite
# Every setting is an environment variable with a default; the command is printed before it runs.
#   HOSTFILE=hostfiles/local3.hosts   MPICH hostfile with `# device:` lines
#   NP=<the hostfile's slots>         ranks to start
#   MAX_RESTARTS=3                    runs again on the survivors at most this often (0: never)
#   PYTHON=python                     the interpreter with edgeshard_mpi installed
#   MPIEXEC=mpiexec                   launcher (e.g. launch/netns-mpiexec.sh for namespaced hosts)
#   MPIEXEC_ARGS=                     extra mpiexec options, split on spaces (e.g. "-launcher ssh")
#   MPIR_CVAR_ENABLE_HEAVY_YIELD=1    MPICH: blocking calls yield the core instead of spinning
# The exit status is `edgeshard launch`'s: 0 done, 1 failed, 3 restarts used up, 4 the devices left
# cannot hold the model, 5 rank 0's host lost (see the README).
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
MAX_RESTARTS=${MAX_RESTARTS:-3}
# the launcher starts mpiexec with these (MPIEXEC, MPIEXEC_ARGS) for every run of the job
export MPIEXEC=${MPIEXEC:-mpiexec} MPIEXEC_ARGS=${MPIEXEC_ARGS:-} PYTHON
# MPICH: blocking calls yield the core instead of spinning (our own waits never spin either)
export MPIR_CVAR_ENABLE_HEAVY_YIELD=${MPIR_CVAR_ENABLE_HEAVY_YIELD:-1}
cmd=("$PYTHON" -m edgeshard_mpi launch "$JOB" -f "$HOSTFILE" -n "$NP" --max-restarts "$MAX_RESTARTS" "$@")
# printed as a shell line that can be pasted to rerun it, the settings included
printf -v line '%q ' "${cmd[@]}"
printf -v how 'MPIR_CVAR_ENABLE_HEAVY_YIELD=%q MPIEXEC=%q MPIEXEC_ARGS=%q' \
    "$MPIR_CVAR_ENABLE_HEAVY_YIELD" "$MPIEXEC" "$MPIEXEC_ARGS"
echo "+ $how ${line% }" >&2
exec "${cmd[@]}"
