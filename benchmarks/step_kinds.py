"""Each stage's measured compute against the simulator's line, by kind of step, from a traced run.

    mpiexec -f hostfiles/hetero4.hosts -n 4 python -m edgeshard_mpi run JOB --hostfile hostfiles/hetero4.hosts \\
        --trace run.json
    python benchmarks/step_kinds.py run.json --profile PROFILE.json

A trace's compute events carry their step's forwards (messages.Step.forwards); each is costed by the
stage's line from the profile (simulate.StageLine, as the simulator, the drift watch and work clocks
cost it) and summed by kind: a decode step by its rows, a prefill as one kind. Where the measured /
predicted ratios differ between kinds, the line's shape is what the simulator misses; where they
agree and are off 1, the profile's level.
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgeshard_mpi.planner import Plan  # noqa: E402
from edgeshard_mpi.profiler import Profile  # noqa: E402
from edgeshard_mpi.simulate import StepCosts  # noqa: E402
from edgeshard_mpi.trace import load_trace  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("trace", help="a run's trace JSON, or its results file")
    ap.add_argument("--profile", required=True, help="the profile the run planned with")
    args = ap.parse_args()
    tracks, meta = load_trace(args.trace)
    if "plan" not in meta:
        sys.exit(f"{args.trace}: a simulated trace, or one without its plan: nothing to compare")
    plan = Plan.from_dict(meta["plan"])
    costs = StepCosts.from_profile(Profile.load(args.profile), plan)
    by_rank = {t["rank"]: t for t in tracks}
    print(f"{'stage':>5} {'rank':>4} {'kind':<10} {'steps':>6} {'measured s':>10} {'predicted s':>11} "
          f"{'meas/pred':>9} {'ms/step':>8}")
    for s, st in enumerate(plan.stages):
        line = costs.line(s)
        kinds = collections.defaultdict(lambda: [0, 0.0, 0.0])
        for name, _, dur, _, _, *work in by_rank[st.rank]["events"]:
            if name not in ("prefill", "decode") or not work:
                continue
            kind = f"decode {work[0][0][0]}" if name == "decode" else name
            k = kinds[kind]
            k[0], k[1], k[2] = k[0] + 1, k[1] + dur, k[2] + sum(line.seconds(*f) for f in work[0])
        for kind in sorted(kinds, key=lambda k: (k.split()[0], int(k.split()[1]) if " " in k else 0)):
            n, m, p = kinds[kind]
            print(f"{s:>5} {st.rank:>4} {kind:<10} {n:>6} {m:>10.2f} {p:>11.2f} {m / p if p else float('nan'):>9.2f} "
                  f"{m / n * 1e3:>8.1f}")
        n, m, p = (sum(k[i] for k in kinds.values()) for i in range(3))
        print(f"{s:>5} {st.rank:>4} {'all':<10} {n:>6} {m:>10.2f} {p:>11.2f} {m / p if p else float('nan'):>9.2f}")


if __name__ == "__main__":
    main()
