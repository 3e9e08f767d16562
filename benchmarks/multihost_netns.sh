#!/usr/bin/env bash
# Three hosts on one machine (network namespaces, h1 behind a tc-shaped 5 Mbit/s link), tiny-random:
#   sudo benchmarks/multihost_netns.sh          (about 40 s; needs root and iproute2)
# Prints what the profiler measured of each link, the latency and throughput plans from that
# profile, the latency plan once h1's links are made as fast as h0 <-> h2 in the same profile, and
# whether a run across the three hosts gives the tokens of a one-host run.
# tests/test_multihost_netns.py asserts the same; this shows the numbers. The namespaces are
# removed on exit, whatever happens.
set -euo pipefail
cd "$(dirname "$0")/.."
export NETNS_PREFIX=${NETNS_PREFIX:-esb-}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export EDGESHARD_MODELS=${EDGESHARD_MODELS:-$PWD/models}
PYTHON=${PYTHON:-python}
HOSTFILE=hostfiles/netns3.hosts
work=$(mktemp -d)
trap 'launch/netns.sh down; rm -rf "$work"' EXIT
launch/netns.sh up

cat > "$work/prompts.jsonl" <<'JSONL'
{"id": "0", "prompt": "The quick brown fox"}
{"id": "1", "prompt": "In a distant galaxy, a lone explorer discovered"}
{"id": "2", "prompt": "def fibonacci(n):"}
{"id": "3", "prompt": "Once upon a time"}
JSONL
cat > "$work/job.toml" <<'TOML'
model = "tiny-random"
prompts = "prompts.jsonl"
output = "multi.h5"
micro_batch_size = 16     # 4 KiB of activations a decode step: 6.6 ms over 5 Mbit/s
[generation]
max_new_tokens = 12
TOML

echo "== profile across the three hosts"
launch/netns-mpiexec.sh -f "$HOSTFILE" -n 3 "$PYTHON" -m edgeshard_mpi profile "$work/job.toml" \
    --hostfile "$HOSTFILE" --out "$work/profile.json" --repeats 5
"$PYTHON" - "$work/profile.json" <<'PY'
import json, sys
p = json.load(open(sys.argv[1]))
bw = p["bandwidth"]
for k, j in ((0, 1), (1, 2), (0, 2)):
    print(f"link h{k} <-> h{j}: {bw[k][j] * 8 / 1e6:8.1f} Mbit/s"
          + (f"  ({bw[k][j] * 8 / 5e6:.2f} x the 5 Mbit/s tbf rate)" if 1 in (k, j) else ""))
# the counterfactual: h1's links as fast as h0 <-> h2, all else as measured
for k in (0, 2):
    bw[k][1] = bw[1][k] = bw[0][2]
    p["latency"][k][1] = p["latency"][1][k] = p["latency"][0][2]
json.dump(p, open(sys.argv[1].replace(".json", "-unshaped.json"), "w"))
PY
for objective in latency throughput; do
    echo "== $objective plan from the measured profile"
    "$PYTHON" -m edgeshard_mpi plan --profile "$work/profile.json" --objective "$objective"
done
echo "== latency plan from the same profile with h1's links as fast as h0 <-> h2"
"$PYTHON" -m edgeshard_mpi plan --profile "$work/profile-unshaped.json" --objective latency

echo "== run across the three hosts (units split evenly: h0 -> h1 -> h2) and on one host"
MPIEXEC=launch/netns-mpiexec.sh HOSTFILE=$HOSTFILE PYTHON=$PYTHON launch/run.sh "$work/job.toml" --no-progress
mpiexec -n 1 "$PYTHON" -m edgeshard_mpi run "$work/job.toml" --output "$work/one.h5" --no-progress
"$PYTHON" - "$work/multi.h5" "$work/one.h5" <<'PY'
import sys
from edgeshard_mpi.results import read_results
multi, one = ({r.id: r.token_ids for r in read_results(f)} for f in sys.argv[1:])
print(f"same tokens on three hosts as on one: {multi == one} ({len(one)} requests, "
      f"{sum(map(len, one.values()))} tokens)")
sys.exit(0 if multi == one else 1)
PY
