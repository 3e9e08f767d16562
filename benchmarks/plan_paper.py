"""Plans for the paper's testbed: EdgeShard against the baselines, predicted from the paper profiles.

    python benchmarks/plan_paper.py [--profiles profiles]

Reads profiles/paper-llama2-{7b,13b,70b}.json (written by benchmarks/paper_profiles.py) and prints,
per model, one row per method with the cost model's prediction for a decode step (micro-batch 1):
latency in ms/token = predict(...)["latency_s"] * 1e3, throughput in tokens/s = micro_batch_size /
predict(...)["bottleneck_s"] (the pipeline's steady state), and the devices the plan uses; a method
that raises PlanError shows "OOM: <reason>". Methods:

  Edge-Solo            edge_solo: the whole model on the source
  Cloud-Edge-Even      cloud_edge_even: source and cloud, units split in half
  Cloud-Edge-Opt       cloud_edge_opt: source and cloud, best split; its latency column comes from
                       the plan for objective="latency", its throughput column from the plan for
                       objective="throughput" (two plans, the devices of each are shown)
  even                 even_split: units split evenly over all 15 devices in rank order
  memory-proportional  memory_proportional: units split in proportion to device memory (exo, llama.cpp)
  EdgeShard latency    plan_latency (both columns from the one plan)
  EdgeShard throughput plan_throughput (both columns from the one plan)

Next to the rows the paper reports (Llama2-7B; Llama2-70B EdgeShard) it prints the paper's number
and ours/paper. The paper's throughput comes from batched runs; ours is micro-batch 1 in a pipeline,
so throughput ratios compare the shape of the result more than its size.

Checks (exit status 1 if one fails): on Llama2-70B, the paper's baselines (Edge-Solo,
Cloud-Edge-Even, Cloud-Edge-Opt with either objective) run out of memory and both EdgeShard plans
are feasible, as PAPER reports.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgeshard_mpi.planner import (PlanError, cloud_edge_even, cloud_edge_opt, edge_solo,  # noqa: E402
                                   even_split, memory_proportional, plan_latency, plan_throughput, predict)
from edgeshard_mpi.profiler import Profile  # noqa: E402

MODELS = ["llama2-7b", "llama2-13b", "llama2-70b"]

# method name -> (function for the latency column, function for the throughput column)
METHODS = {
    "Edge-Solo": (edge_solo, edge_solo),
    "Cloud-Edge-Even": (cloud_edge_even, cloud_edge_even),
    "Cloud-Edge-Opt": (lambda c: cloud_edge_opt(c, "latency"), lambda c: cloud_edge_opt(c, "throughput")),
    "even": (even_split, even_split),
    "memory-proportional": (memory_proportional, memory_proportional),
    "EdgeShard latency": (plan_latency, plan_latency),
    "EdgeShard throughput": (plan_throughput, plan_throughput),
}
PAPER_BASELINES = ["Edge-Solo", "Cloud-Edge-Even", "Cloud-Edge-Opt"]
EDGESHARD = ["EdgeShard latency", "EdgeShard throughput"]

# PAPER.md "Testbed and results": (latency ms/token, throughput tokens/s); None where not reported
# or where the row is not the plan the paper's number is for.
PAPER = {
    "llama2-7b": {"Edge-Solo": (140.34, 24.36), "Cloud-Edge-Even": (227.35, 7.56),
                  "Cloud-Edge-Opt": (140.34, 24.36), "EdgeShard latency": (75.88, None),
                  "EdgeShard throughput": (None, 52.45)},
    "llama2-70b": {"EdgeShard latency": (3086.0, None), "EdgeShard throughput": (None, 1.25)},
}


def short(err: Exception) -> str:
    """A PlanError in a few words: which device would hold how much, or how far a split can go."""
    text = str(err)
    full = re.findall(r"'([^']+)' \(device \d+\) would hold units (\d+)\.\.(\d+) = ([\d,]+) bytes .*?"
                      r"offers ([\d,]+) bytes", text)
    if full:
        name, first, last, used, offer = full[0]
        more = f" (+{len(full) - 1} more device)" if len(full) > 1 else ""
        return (f"{name} would hold units {first}..{last} = {int(used.replace(',', '')) / 1e9:.2f} GB "
                f"> {int(offer.replace(',', '')) / 1e9:.2f} GB{more}")
    split = re.search(r"over (\d+) unit\(s\): the source holds at most the first (\d+) unit\(s\), "
                      r"the cloud at most the last (\d+)", text)
    if split:
        n, a, b = split.groups()
        return f"no split fits: source holds <= first {a} units, cloud <= last {b}, of {n}"
    return text if len(text) <= 90 else text[:87] + "..."


def kinds(prof: Profile, ranks: list[int]) -> str:
    """Devices of a plan by kind, e.g. '12 agx-orin + rtx3090'."""
    counts: dict[str, int] = {}
    for r in ranks:
        kind = prof.devices[r]["name"].rsplit("-", 1)[0]
        counts[kind] = counts.get(kind, 0) + 1
    return " + ".join(f"{n} {k}" if n > 1 else k for k, n in counts.items())


def evaluate(prof: Profile, costs, fn):
    """(latency ms, tokens/s, ranks, plan) or the PlanError."""
    try:
        plan = fn(costs)
    except PlanError as e:
        return e
    p = predict(costs, plan)
    return p["latency_s"] * 1e3, prof.shapes["micro_batch_size"] / p["bottleneck_s"], plan.ranks, plan


def ratio(ours: float, paper: float | None) -> str:
    return f"{paper:g} ({ours / paper:.2f}x)" if paper else "-"


def table(model: str, prof: Profile) -> tuple[list[str], dict]:
    costs = prof.costs("decode")
    paper = PAPER.get(model, {})
    head = f"{'method':<21} {'ms/token':>9} {'tokens/s':>9}  {'devices':<36} {'paper ms (ours/paper)':>22} {'paper tok/s (ours/paper)':>25}"
    lines = [f"== {model}: {prof.num_units} units, {len(prof.devices)} devices, "
             f"{sum(u['param_bytes'] for u in prof.units) / 1e9:.2f} GB of weights, decode step, micro-batch "
             f"{prof.shapes['micro_batch_size']}, context {prof.shapes['context']}", head, "-" * len(head)]
    results = {}
    for name, (lat_fn, tput_fn) in METHODS.items():
        lat_res = evaluate(prof, costs, lat_fn)
        tput_res = lat_res if tput_fn is lat_fn else evaluate(prof, costs, tput_fn)
        results[name] = (lat_res, tput_res)
        if isinstance(lat_res, PlanError) and isinstance(tput_res, PlanError):
            lines.append(f"{name:<21} OOM: {short(lat_res)}")
            continue
        lat = lat_res[0] if not isinstance(lat_res, PlanError) else float("nan")
        tput = tput_res[1] if not isinstance(tput_res, PlanError) else float("nan")
        if tput_fn is lat_fn:
            used = f"{len(lat_res[2])}: {kinds(prof, lat_res[2])}"
        else:
            used = f"lat {len(lat_res[2])}, tput {len(tput_res[2])}: {kinds(prof, sorted(set(lat_res[2]) | set(tput_res[2])))}"
        p_lat, p_tput = paper.get(name, (None, None))
        lines.append(f"{name:<21} {lat:9.2f} {tput:9.2f}  {used:<36} {ratio(lat, p_lat):>22} {ratio(tput, p_tput):>25}")
    for name in EDGESHARD:
        res = results[name][0]
        if not isinstance(res, PlanError):
            stages = " ".join(f"{prof.devices[s.rank]['name']}[{s.first}-{s.last}]" for s in res[3].stages)
            lines.append(f"  {name} plan: {stages}")
    return lines, results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profiles", type=Path, default=ROOT / "profiles", help="folder of paper-*.json")
    args = ap.parse_args(argv)
    failures = []
    for model in MODELS:
        prof = Profile.load(args.profiles / f"paper-{model}.json")
        lines, results = table(model, prof)
        print("\n".join(lines) + "\n")
        if model == "llama2-70b":
            for name in PAPER_BASELINES:
                for res in results[name]:
                    if not isinstance(res, PlanError):
                        failures.append(f"{model}: {name} fits ({res[0]:.1f} ms/token), PAPER says it runs out of memory")
            for name in EDGESHARD:
                if isinstance(results[name][0], PlanError):
                    failures.append(f"{model}: {name} is infeasible, PAPER runs it: {results[name][0]}")
    print("Paper throughput is from batched runs; ours is micro-batch 1 in a pipeline (1 / bottleneck).")
    if failures:
        print("FAILED:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    print("OK: on llama2-70b every paper baseline (Edge-Solo, Cloud-Edge-Even, Cloud-Edge-Opt) is out of "
          "memory and both EdgeShard plans fit.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
