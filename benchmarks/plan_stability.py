"""Is the plan the same from one fresh profile to the next, and does `plan` say when it may not be?

    python benchmarks/plan_stability.py [--cluster trio3] [--profiles 5] [--clock cpu|work]

Profiles the cluster afresh `--profiles` times, one after the other (`edgeshard profile`, the job's
shapes), and prints for each the throughput plan and `edgeshard plan`'s confidence line: `sure`
when the plan stays best with every device within its measured spread, else `not sure` with the
runner-up. Target (CPU-time emulation): the same plan every time, or `not sure` naming the other.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _bench import ROOT, slots, with_work_clock  # noqa: E402

CLUSTERS = {"trio3": ("hostfiles/trio3.hosts", "jobs/trio3.toml"), "hetero4": ("hostfiles/hetero4.hosts", "jobs/bench-hetero4.toml"),
            "paper-mini": ("hostfiles/paper-mini.hosts", "jobs/paper-mini.toml")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cluster", default="trio3", choices=list(CLUSTERS))
    ap.add_argument("--profiles", type=int, default=5)
    ap.add_argument("--clock", choices=("cpu", "work"), default="cpu")
    args = ap.parse_args()
    hostfile, job = CLUSTERS[args.cluster]
    work = Path(tempfile.mkdtemp(prefix="edgeshard-stability-"))
    hosts = Path(with_work_clock(ROOT / hostfile, work / "hosts") if args.clock == "work" else ROOT / hostfile)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MPIR_CVAR_ENABLE_HEAVY_YIELD": "1"}
    rows = []
    for i in range(args.profiles):
        out = work / f"p{i}.json"
        cmd = ["mpiexec", "-f", str(hosts), "-n", str(slots(hosts)), sys.executable, "-m", "edgeshard_mpi", "profile",
               str(ROOT / job), "--hostfile", str(hosts), "--out", str(out)]
        print("+", " ".join(cmd), file=sys.stderr, flush=True)
        subprocess.run(cmd, check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
        plan_cmd = [sys.executable, "-m", "edgeshard_mpi", "plan", "--profile", str(out), "--objective", "throughput"]
        plan = json.loads(subprocess.run(plan_cmd + ["--json"], check=True, env=env, cwd=ROOT, capture_output=True,
                                         text=True).stdout)
        shown = subprocess.run(plan_cmd, check=True, env=env, cwd=ROOT, capture_output=True, text=True).stdout
        sure = next(ln for ln in shown.splitlines() if ln.startswith("confidence:"))
        names = [d["name"] for d in json.loads(out.read_text())["devices"]]
        stages = ", ".join(f"{names[s['rank']]} {s['first']}..{s['last']}" for s in plan["stages"])
        rows.append((stages, sure))
    print(f"\n{args.cluster}, clock={args.clock}: throughput plan from {args.profiles} fresh profiles")
    for i, (stages, sure) in enumerate(rows):
        print(f"{i + 1}. {stages}\n   {sure}")
    plans = {s for s, _ in rows}
    print(f"{len(plans)} distinct plan(s)")


if __name__ == "__main__":
    main()
