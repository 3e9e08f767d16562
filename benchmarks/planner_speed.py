"""How long the exact planners take: the paper's 70B testbed and a synthetic 64-device cluster.

    python benchmarks/planner_speed.py [--profiles profiles] [--repeats 3]

Times plan_latency and plan_throughput (best of --repeats runs, wall clock) on
  (a) profiles/paper-llama2-70b.json: 15 devices, 82 units (target: under 1 s each);
  (b) a synthetic cluster of 64 devices, 16 each of four kinds, running the same 82 units
      (target: under 10 s each). The kinds differ in speed and memory and their links depend only
      on the pair of kinds, so the planner merges each kind into one type (the source, device 0,
      always stays a type of its own): 5 types of sizes 1, 15, 16, 16, 16.
Prints each time, the device types the planner found (planner._device_types) and the plan's
predicted latency or throughput. Exit status 1 if a target is missed.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgeshard_mpi import planner  # noqa: E402
from edgeshard_mpi.planner import Costs, plan_latency, plan_throughput, predict  # noqa: E402
from edgeshard_mpi.profiler import Profile  # noqa: E402

MBIT_S = 1e6 / 8

# Synthetic kinds: (name, compute time relative to an AGX Orin, usable memory in bytes).
KINDS = [("agx", 1.0, 29e9), ("nx", 1.14, 14e9), ("gpu", 0.15, 23e9), ("nano", 2.0, 8e9)]
# bandwidth in Mbit/s between kinds (symmetric), latency 2.1 ms on every link.
LINK_MBIT = {("agx", "agx"): 50, ("agx", "nx"): 40, ("agx", "gpu"): 20, ("agx", "nano"): 30,
             ("nx", "nx"): 50, ("nx", "gpu"): 20, ("nx", "nano"): 30, ("gpu", "gpu"): 1000,
             ("gpu", "nano"): 10, ("nano", "nano"): 25}


def synthetic(base: Profile, per_kind: int = 16) -> Costs:
    """64 devices (16 per kind) running base's units; device 0, the source, is the first agx."""
    agx = base.devices[0]["decode_s"]  # the paper profile's AGX Orin times
    kinds = [k for k in KINDS for _ in range(per_kind)]
    m = len(kinds)

    def mbit(a, b):
        return LINK_MBIT.get((a, b)) or LINK_MBIT[(b, a)]

    costs = base.costs("decode")
    return Costs(compute=[[t * speed for _, speed, _ in kinds] for t in agx],
                 unit_bytes=costs.unit_bytes, device_memory=[mem for _, _, mem in kinds],
                 out_bytes=costs.out_bytes,
                 bandwidth=[[mbit(kinds[k][0], kinds[j][0]) * MBIT_S for j in range(m)] for k in range(m)],
                 latency=[[0.0 if k == j else 2.1e-3 for j in range(m)] for k in range(m)],
                 device_names=[f"{name}-{j}" for j, (name, _, _) in enumerate(kinds)])


def best_of(fn, costs: Costs, repeats: int):
    times, plan = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        plan = fn(costs)
        times.append(time.perf_counter() - t0)
    return min(times), plan


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profiles", type=Path, default=ROOT / "profiles")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    base = Profile.load(args.profiles / "paper-llama2-70b.json")
    cases = [("paper 70B testbed", base.costs("decode"), 1.0), ("synthetic 64 devices", synthetic(base), 10.0)]
    missed = []
    for label, costs, target in cases:
        types = planner._device_types(costs)
        print(f"== {label}: {costs.num_devices} devices, {costs.num_units} units; device types "
              f"(planner._device_types): {len(types)} of sizes {[len(t) for t in types]}")
        for fn in (plan_latency, plan_throughput):
            seconds, plan = best_of(fn, costs, args.repeats)
            p = predict(costs, plan)
            value = (f"latency {p['latency_s'] * 1e3:.2f} ms/token" if fn is plan_latency
                     else f"throughput {1 / p['bottleneck_s']:.2f} tokens/s")
            ok = seconds < target
            print(f"  {fn.__name__:<16} {seconds:8.3f} s (best of {args.repeats}; target < {target:g} s: "
                  f"{'ok' if ok else 'MISSED'})  {len(plan.stages)} stages, {value}")
            if not ok:
                missed.append(f"{label}: {fn.__name__} took {seconds:.3f} s, target {target:g} s")
    if missed:
        print("MISSED:\n  " + "\n  ".join(missed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
