"""The simulator's predictions against measured runs: three emulated clusters, each schedule.

    python benchmarks/sim_vs_measured.py [--clusters hetero4,paper-mini,trio3] [--clock cpu|work]
                                         [--profile-load turns|together] [--out results/sim]

For each cluster, `edgeshard bench` runs the job's 16 prompts (smollm2-135m, micro-batches of 2,
24 new tokens) under the throughput plan with the `sequential`, `bubbles` and `no-bubbles`
schedules, one after the other in one launch, from one profile (measured first if none is saved).
Each cluster is profiled afresh first (a saved profile of an hour ago may have been
measured while the host ran faster or slower). At the end of each run the simulator replays the same plan and schedule over the same requests
(their prompt and output lengths, in admission order) on that profile; this prints the measured
figures beside the predicted ones and their ratio. Target: within 15% (ratio 0.85 to 1.15).

`--clock work` runs each hostfile with `clock=work` on every emulated device: a step then takes the
profile's time for its work, whatever the host's load at that moment, so that what is left between
measured and predicted is what the simulator models besides compute (schedules, links, per-step
overheads). Target then: within 10%, run after run. `late` counts the steps whose real compute
outlasted the clock's time (then the clock could not hold).

`--profile-load together` measures each fresh profile with every rank at once (the load a run puts
on ranks that share a host) instead of in turns; compare both on the CPU clock to see which predicts.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _bench import ROOT, run_bench, with_work_clock  # noqa: E402

CLUSTERS = {  # name: (hostfile, job)
    "hetero4": ("hostfiles/hetero4.hosts", "jobs/bench-hetero4.toml"),
    "paper-mini": ("hostfiles/paper-mini.hosts", "jobs/paper-mini.toml"),
    "trio3": ("hostfiles/trio3.hosts", "jobs/trio3.toml"),
}
SCHEDULES = ("sequential", "bubbles", "no-bubbles")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clusters", default=",".join(CLUSTERS))
    ap.add_argument("--clock", choices=("cpu", "work"), default="cpu")
    ap.add_argument("--profile-load", choices=("turns", "together"), default="turns")
    ap.add_argument("--out", default=str(ROOT / "results" / "sim"))
    args = ap.parse_args()
    table = []
    fresh = Path(tempfile.mkdtemp(prefix="edgeshard-profiles-"))  # each cluster profiled now, not reused
    for name in args.clusters.split(","):
        hostfile, job = CLUSTERS[name]
        if args.clock == "work":
            hostfile = with_work_clock(ROOT / hostfile, fresh / Path(hostfile).name)
        rows = run_bench(hostfile, job, [f"throughput:{s}" for s in SCHEDULES], Path(args.out) / f"{name}.json",
                         profiles=fresh / name, extra=["--profile-load", args.profile_load])
        table += [(name, r) for r in rows]
    print(f"\nclock={args.clock}, profiles measured in {args.profile_load}")
    print(f"{'cluster':<11} {'schedule':<11} {'tok/s meas':>10} {'pred':>7} {'ratio':>6}   "
          f"{'ms/tok meas':>11} {'pred':>7} {'ratio':>6}   {'TTFT ms meas':>12} {'pred':>7} {'late':>5}")
    worst = 0.0
    for name, r in table:
        p = r.get("predicted")
        if "error" in r or not p:
            print(f"{name:<11} {r['schedule']:<11} {r.get('error', 'no prediction')}")
            continue
        a, b = r["tokens_per_s"] / p["tokens_per_s"], r["ms_per_token"] / p["ms_per_token"]
        worst = max(worst, abs(a - 1), abs(b - 1))
        print(f"{name:<11} {r['schedule']:<11} {r['tokens_per_s']:>10.2f} {p['tokens_per_s']:>7.2f} {a:>6.2f}   "
              f"{r['ms_per_token']:>11.1f} {p['ms_per_token']:>7.1f} {b:>6.2f}   {r['ttft_ms']:>12.0f} {p['ttft_ms']:>7.0f} "
              f"{sum(st.get('late_steps', 0) for st in r['stages']):>5}")
    print(f"largest error: {worst:.0%} (target: within {'10' if args.clock == 'work' else '15'}%)")


if __name__ == "__main__":
    main()
