#!/usr/bin/env bash
# The throughput figures of BENCHMARKS.md, on the emulated 4-device cluster, smollm2-135m:
#   benchmarks/throughput.sh            (about 8 minutes on a 2-core host)
# 1. no-bubbles against bubbles with as many micro-batches in flight as stages (4);
# 2. the default (twice the stages in flight): throughput plan against the even split, and each against
#    its ideal rate (tokens / the busiest stage's compute time, measured in the same run).
set -euo pipefail
cd "$(dirname "$0")/.."
HOSTFILE=${HOSTFILE:-hostfiles/hetero4.hosts}
JOB=${JOB:-jobs/bench-hetero4.toml}
OUT=${OUT:-results}
mkdir -p "$OUT"
mpiexec -f "$HOSTFILE" -n 4 python -m edgeshard_mpi bench "$JOB" --micro-batches 4 \
    --configs throughput:no-bubbles,throughput:bubbles --json "$OUT/bench-k4.json"
mpiexec -f "$HOSTFILE" -n 4 python -m edgeshard_mpi bench "$JOB" --json "$OUT/bench-default.json"
