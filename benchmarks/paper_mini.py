"""The paper's four methods, measured on an emulated cluster shaped like its testbed.

    python benchmarks/paper_mini.py [--out results/paper-mini]

On hostfiles/paper-mini.hosts (a weak source board that holds the whole model, two faster edge
boards, a fast "cloud" behind a slow link with room for about half the model), smollm2-135m:
- latency: jobs/paper-mini-latency.toml (4 prompts, micro-batches of 2, 24 new tokens), each
  method's latency plan under the `sequential` schedule; ms/token per request after the first token.
- throughput: jobs/paper-mini.toml (16 prompts), each method's throughput plan under `no-bubbles`.
Methods as in the paper: Edge-Solo, Cloud-Edge-Even, Cloud-Edge-Opt (the best split between source
and cloud for the column's objective), EdgeShard (the latency or throughput DP). Printed as the
paper's table, measured, with the simulator's prediction for the same runs beside each figure.
Targets: EdgeShard latency <= 0.6 x Edge-Solo's; EdgeShard throughput >= 2 x the best baseline's.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _bench import ROOT, run_bench  # noqa: E402

HOSTS = "hostfiles/paper-mini.hosts"
METHODS = [  # name, latency objective, throughput objective
    ("Edge-Solo", "edge-solo", "edge-solo"),
    ("Cloud-Edge-Even", "cloud-edge-even", "cloud-edge-even"),
    ("Cloud-Edge-Opt", "cloud-edge-opt", "cloud-edge-opt-throughput"),
    ("EdgeShard", "latency", "throughput"),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "results" / "paper-mini"))
    args = ap.parse_args()
    out = Path(args.out)
    profiles = Path(tempfile.mkdtemp(prefix="edgeshard-profiles-"))  # measured now, shared by both jobs
    lat = run_bench(HOSTS, "jobs/paper-mini-latency.toml", [f"{m[1]}:sequential" for m in METHODS],
                    out / "latency.json", profiles)
    thr = run_bench(HOSTS, "jobs/paper-mini.toml", [f"{m[2]}:no-bubbles" for m in METHODS], out / "throughput.json",
                    profiles)
    print(f"\n{'method':<16} {'ms/token':>9} {'(sim)':>7}  {'tokens/s':>9} {'(sim)':>7}  plans (rank: units)")
    figures = {}
    for (name, _, _), lr, tr in zip(METHODS, lat, thr):
        cells = []
        for r, key, fmt in ((lr, "ms_per_token", "{:>9.1f} {:>7.1f}"), (tr, "tokens_per_s", "{:>9.2f} {:>7.2f}")):
            if "error" in r:
                cells.append(f"{'n/a':>9} {'':>7}")
                continue
            cells.append(fmt.format(r[key], (r.get("predicted") or {}).get(key, float("nan"))))
            figures[(name, key)] = r[key]
        plans = " | ".join(" ".join(f"{s['rank']}:{s['first']}-{s['last']}" for s in r["plan"]["stages"])
                           if "plan" in r else r["error"][:60] for r in (lr, tr))
        print(f"{name:<16} {cells[0]}  {cells[1]}  {plans}")
    solo = figures[("Edge-Solo", "ms_per_token")]
    ours = figures[("EdgeShard", "ms_per_token")]
    best = max(v for (n, k), v in figures.items() if k == "tokens_per_s" and n != "EdgeShard")
    thr_ratio = figures[("EdgeShard", "tokens_per_s")] / best
    print(f"EdgeShard latency / Edge-Solo's: {ours / solo:.2f} (target <= 0.6); "
          f"EdgeShard throughput / best baseline's: {thr_ratio:.2f} (target >= 2)")


if __name__ == "__main__":
    main()
