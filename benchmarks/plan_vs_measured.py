"""The planner's predictions next to what `edgeshard bench` measured, configuration by configuration.

    mpiexec -f hostfiles/hetero4.hosts -n 4 python -m edgeshard_mpi bench jobs/bench-hetero4.toml \\
        --configs latency:sequential,throughput:sequential,throughput:no-bubbles,even:no-bubbles,... --json bench.json
    python benchmarks/plan_vs_measured.py bench.json --profile profiles/measured/<the profile bench used>.json

For each row: the plan's predicted sequential ms/token (every stage's compute plus every hop, the
return to the source included) and pipelined tokens/s (micro-batch size / slowest stage), from the
profile's decode-step costs, beside the measured ms/token (mean time per token after the first, per
request) and tokens/s of that run. Sequential runs compare with the sequential prediction,
pipelined ones with the pipelined prediction.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgeshard_mpi.planner import Plan, predict  # noqa: E402
from edgeshard_mpi.profiler import Profile  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bench_json")
    ap.add_argument("--profile", required=True)
    args = ap.parse_args()
    prof = Profile.load(args.profile)
    costs = prof.costs()
    b = prof.shapes["micro_batch_size"]
    rows = json.loads(Path(args.bench_json).read_text())
    print(f"{'plan':<20} {'schedule':<11} {'pred ms/tok':>11} {'meas ms/tok':>11} {'ratio':>6}   "
          f"{'pred tok/s':>10} {'meas tok/s':>10} {'ratio':>6}")
    for r in rows:
        if "error" in r:
            print(f"{r['objective']:<20} {r['schedule']:<11} not run: {r['error'][:70]}")
            continue
        p = predict(costs, Plan.from_dict(r["plan"], costs.num_units))
        seq = r["schedule"] == "sequential"
        pred_ms = p["latency_s"] * 1e3
        pred_tps = b / p["latency_s"] if seq else b / p["bottleneck_s"]
        print(f"{r['objective']:<20} {r['schedule']:<11} {pred_ms:>11.1f} {r['ms_per_token']:>11.1f} "
              f"{r['ms_per_token'] / pred_ms:>6.2f}   {pred_tps:>10.2f} {r['tokens_per_s']:>10.2f} "
              f"{r['tokens_per_s'] / pred_tps:>6.2f}")


if __name__ == "__main__":
    main()
