"""A device lost mid-run under `edgeshard launch`: from the loss to progress again on the survivors.

    python benchmarks/elastic.py [--device mid] [--signal KILL|STOP] [--at 16] [--repeats 2] [--step-timeout 10]
                                 [--json out.json]

trio3 (hostfiles/trio3.hosts) on the work clock, smollm2-135m, fp32, 48 prompts x 24 new tokens,
micro-batches of 2, the throughput plan. The first run measures the profile; every run after a
loss plans from it, cut to the survivors (nothing is measured again). Once the results hold `--at`
requests, `--device`'s rank gets the signal: KILL (its process ends: the launcher sees it at once)
or STOP (silent: rank 0's step timeout, `--step-timeout` (10 s), names it). For each loss it prints:
- detect: from the signal to the launcher knowing the run has ended (mpiexec gone);
- restart: from then to the first step back on the survivors: a new mpiexec, imports, the job
  read, the profile cut, the plan, the shards loaded (`load`, the slowest rank's), the first step;
- total: from the signal to that first step. Target: at most 15 s + load, with a saved profile.
The work lost is the requests in flight at the loss (at most the micro-batches in flight x their
rows): every finished one is in the journal before its tokens count as done, and the survivors'
run skips it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _bench import chat_job, with_work_clock  # noqa: E402



def _journal(h5: Path) -> list[dict]:
    path = Path(f"{h5}.journal")
    text = path.read_text() if path.exists() else ""
    return [json.loads(line) for line in text.splitlines() if line.endswith("}")]


def _records(h5: Path) -> int:
    return sum("record" in e for e in _journal(h5))


def one(work: Path, job: Path, hosts: Path, device: str, sig: str, at: int, k: int, step_timeout: float) -> dict:
    from edgeshard_mpi.results import read_attrs

    out = work / f"elastic-{k}.h5"
    env = {**os.environ, "EDGESHARD_PROFILES": str(work / "profiles"), "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "edgeshard_mpi", "launch", str(job), "-f", str(hosts), "--output", str(out),
           "--overwrite", "--no-progress", "--step-timeout", f"{step_timeout:g}"]
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    log = open(work / f"launch-{k}.log", "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    folder = Path(f"{out}.launch")
    while True:
        assert proc.poll() is None, (work / f"launch-{k}.log").read_text()
        try:
            table = json.loads((folder / "ranks.json").read_text())
        except (OSError, ValueError):
            table = []
        if table and _records(out) >= at:
            break
        time.sleep(0.05)
    from edgeshard_mpi.cluster import parse_hostfile

    row = table[[d.name for d in parse_hostfile(hosts).devices].index(device)]  # ranks fill the slots in order
    before = _records(out)
    hit = time.time()
    os.kill(row["pid"], getattr(signal, f"SIG{sig}"))
    rc = proc.wait()
    log.close()
    assert rc == 0, (work / f"launch-{k}.log").read_text()
    attrs = read_attrs(out)
    runs, summary = json.loads(attrs["runs"]), json.loads(attrs["summary"])
    ended = next(json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()
                 if '"event": "ended"' in line)
    progress = runs[1]["lost_at"] + runs[1]["resumed_after_s"]
    load = max(r["load_s"] for r in summary["ranks"])
    return {"signal": sig, "device": device, "records_at_loss": before, "detect_s": ended["at"] - hit,
            "restart_s": progress - ended["at"], "load_s": load, "total_s": progress - hit,
            "target_s": 15 + load, "plan_before": runs[0]["stages"], "plan_after": runs[1]["stages"],
            "requests_after": summary["requests"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="mid")
    ap.add_argument("--signal", default="KILL", choices=["KILL", "STOP"])
    ap.add_argument("--at", type=int, default=16, help="requests written before the signal")
    ap.add_argument("--prompts", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--step-timeout", type=float, default=10.0)
    ap.add_argument("--json")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="edgeshard-elastic-"))
    job = chat_job(work, "elastic", args.prompts)
    hosts = work / "trio3.hosts"
    with_work_clock(ROOT / "hostfiles" / "trio3.hosts", hosts)
    rows = [one(work, job, hosts, args.device, args.signal, args.at, k, args.step_timeout) for k in range(args.repeats)]
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    print(f"\n{platform.node()}: trio3, clock=work, smollm2-135m fp32, {args.prompts} prompts x 24 tokens, "
          f"micro-batch 2; {args.device} gets SIG{args.signal} after {args.at} requests; step timeout {args.step_timeout:g} s")
    print(f"{'run':>3} {'detect s':>9} {'restart s':>10} {'load s':>7} {'total s':>8} {'target s':>9}  plan after")
    for k, r in enumerate(rows):
        plan = ", ".join(f"{s['device']} {s['first']}..{s['last']}" for s in r["plan_after"])
        print(f"{k:>3} {r['detect_s']:>9.2f} {r['restart_s']:>10.2f} {r['load_s']:>7.2f} {r['total_s']:>8.2f} "
              f"{r['target_s']:>9.2f}  {plan}")


if __name__ == "__main__":
    main()
