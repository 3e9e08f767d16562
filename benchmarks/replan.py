"""A device slowed mid-run: staying on the plan, moving to a new one (`--replan`), and the plan made for it.

    python benchmarks/replan.py [--device server] [--factor 4] [--at 120] [--prompts 48] [--json out.json]

trio3 (hostfiles/trio3.hosts) on the work clock (clock=work), so that a slowdown is exact and the
host's other load does not blur the comparison; smollm2-135m, fp32, micro-batches of 2, 24 new
tokens each, the throughput plan, no-bubbles. One after the other, each from its own fresh profile:
- `slowed`: the hostfile with `--device`'s slowdown already `--factor` times higher: the plan made
  for the slowed cluster from the start. Its tokens/s is the target.
- `stay`: trio3 as declared, the device slowed from its `--at`-th step by `--factor`
  (EDGESHARD_SLOW), no re-planning: the job finishes on a plan made for the device it no longer is.
- `replan`: the same with `--replan`: rank 0 sees the stage drift, plans again on what it measured,
  drains, reloads and goes on. Its part after the move is compared with `slowed`: the target is
  within 15%, and the move's cost (drain and reload) is printed beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _bench import chat_job, slots, with_work_clock  # noqa: E402


def _hostfile(src: Path, dst: Path, device: str | None, factor: float) -> Path:
    """trio3 on the work clock; with `device`, that device's slowdown times `factor`."""
    from edgeshard_mpi.cluster import parse_hostfile

    with_work_clock(src, dst)
    if device is None:
        return dst
    lines = []
    for line in dst.read_text().splitlines():
        words = line.split()
        if line.startswith("#") and f"name={device}" in words:
            old = next(w for w in words if w.startswith("slowdown="))
            line = line.replace(old, f"slowdown={float(old.split('=')[1]) * factor:g}")
        lines.append(line)
    dst.write_text("\n".join(lines) + "\n")
    parse_hostfile(dst)  # still a valid hostfile
    return dst


def _run(name: str, hosts: Path, job: Path, work: Path, env: dict, extra: list[str]) -> dict:
    from edgeshard_mpi.results import read_attrs

    out = work / f"{name}.h5"
    cmd = ["mpiexec", "-f", str(hosts), "-n", str(slots(hosts)), sys.executable, "-m", "edgeshard_mpi", "run",
           str(job), "--hostfile", str(hosts), "--output", str(out), "--overwrite", "--no-progress", *extra]
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **env, "EDGESHARD_PROFILES": str(work / f"profiles-{name}")},
                          capture_output=True, text=True)
    wall = time.perf_counter() - t0
    sys.stderr.write(proc.stderr)
    print(proc.stdout, flush=True)
    proc.check_returncode()
    attrs = read_attrs(out)
    return {"summary": json.loads(attrs["summary"]), "moves": json.loads(attrs.get("moves", "[]")),
            "drift": json.loads(attrs.get("drift", "[]")), "wall_s": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="server")
    ap.add_argument("--factor", type=float, default=4.0)
    ap.add_argument("--at", type=int, default=120, help="the device's step from which it is slowed")
    ap.add_argument("--prompts", type=int, default=48)
    ap.add_argument("--json")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="edgeshard-replan-"))
    job = chat_job(work, "replan", args.prompts)
    trio3 = ROOT / "hostfiles" / "trio3.hosts"
    names = [d.name for d in __import__("edgeshard_mpi.cluster", fromlist=["parse_hostfile"]).parse_hostfile(trio3).devices]
    rank = names.index(args.device)
    slow = {"EDGESHARD_SLOW": f"{rank}:{args.at}:{args.factor:g}", "MPIR_CVAR_ENABLE_HEAVY_YIELD": "1"}
    runs = {
        "slowed": _run("slowed", _hostfile(trio3, work / "slowed.hosts", args.device, args.factor), job, work,
                       {"MPIR_CVAR_ENABLE_HEAVY_YIELD": "1"}, []),
        "stay": _run("stay", _hostfile(trio3, work / "trio3.hosts", None, 1), job, work, slow, []),
        "replan": _run("replan", work / "trio3.hosts", job, work, slow, ["--replan"]),
    }
    target = runs["slowed"]["summary"]
    print(f"\n{platform.node()}: trio3, clock=work, {args.device} slowed {args.factor:g}x from its step {args.at}, "
          f"{args.prompts} prompts x 24 new tokens, micro-batch 2, no-bubbles")
    print(f"{'run':<8} {'part':<22} {'plan (device: units)':<44} {'requests':>8} {'tokens/s':>9} {'vs slowed':>9}")

    def plan_of(stages) -> str:
        return ", ".join(f"{st['device']} {st['first']}..{st['last']}" for st in stages)

    for name, r in runs.items():
        s = r["summary"]
        parts = s.get("segments") or [{"stages": s["stages"], "requests": s["requests"],
                                       "tokens_per_s": s["tokens"] / s["seconds"]}]
        for i, seg in enumerate(parts):
            label = "whole run" if len(parts) == 1 else ("before the move" if i == 0 else "after the move")
            rate = seg["tokens_per_s"]
            print(f"{name:<8} {label:<22} {plan_of(seg['stages']):<44} {seg['requests']:>8} {rate:>9.2f} "
                  f"{rate / (target['tokens'] / target['seconds']):>9.2f}")
        if len(parts) > 1:
            print(f"{'':<8} {'whole run':<22} {'':<44} {s['requests']:>8} {s['tokens'] / s['seconds']:>9.2f}")
        for m in r["moves"]:
            print(f"{'':<8} move at {m['at_s']:.1f} s: ratios {', '.join(f'{k} {v:.2f}' for k, v in m['ratios'].items())}; "
                  f"saves {m['saved_s']:.1f} s of {m['remaining_s']:.1f} s left, against reload {m['reload_s']:.1f} s + "
                  f"drain {m['drain_s']:.1f} s: {'moved' if m['moved'] else 'stayed'}")
    # a stop-and-resume move pays, besides the same drain, a whole launch again: mpiexec, imports, the
    # job, tokenizer and results file read, the saved profile found, the shards loaded, the ranks ended.
    # `--resume` on `stay`'s finished file does all of that with nothing left to run.
    cmd = ["mpiexec", "-f", str(work / "trio3.hosts"), "-n", "3", sys.executable, "-m", "edgeshard_mpi", "run",
           str(job), "--hostfile", str(work / "trio3.hosts"), "--output", str(work / "stay.h5"), "--resume",
           "--no-progress", "--objective", "throughput"]
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True,
                   env={**os.environ, "EDGESHARD_PROFILES": str(work / "profiles-stay"), "MPIR_CVAR_ENABLE_HEAVY_YIELD": "1"})
    relaunch = time.perf_counter() - t0
    parts = runs["replan"]["summary"].get("segments") or []
    if len(parts) > 1:
        print(f"\nmoving in place: the shards reloaded in {parts[1]['load_s']:.2f} s; stopping and resuming: "
              f"{relaunch:.1f} s for a launch with --resume (saved profile, nothing left to run)")
    runs["relaunch_s"] = relaunch
    if args.json:
        Path(args.json).write_text(json.dumps(runs, indent=1))


if __name__ == "__main__":
    main()
