"""What emulated ranks on one host do to each other's CPU time while they compute at once.

    MPIR_CVAR_ENABLE_HEAVY_YIELD=1 mpiexec -n 4 python benchmarks/co_run.py [--slowdowns 8,6,16,2] [--seconds 8]
    MPIR_CVAR_ENABLE_HEAVY_YIELD=1 taskset -c 0 mpiexec -n 4 python benchmarks/co_run.py    # all on one core

Each rank holds blocks 1-4 of smollm2-135m (fp32, one thread, a micro-batch of 4 rows cached at 128
columns) and times their decode step's CPU time (time.thread_time, what the CPU clock stretches by a
device's slowdown) four ways, one after the other:
- alone: in turns, each step after a cache-clearing write, no sleep (as the profiler times a unit);
- alone, stretched: in turns, for `--seconds` / 2, each step followed by a sleep of (slowdown - 1) x
  its CPU time, as an emulated device's shard stretches it in a run;
- together, stretched: every rank at once, for `--seconds`, each at its own slowdown (the load of a
  pipelined run);
- together, flat out: every rank at once, no sleep.
The stretched ways alternate, step by step, between one sleep and the same time slept in slices of
at most 1 ms (as comm.py's waits sleep), each kept apart ("... in slices").
Ranks wait for each other as comm.py does (a test, then a sleep of 50 us growing to 1 ms), not in
MPICH's busy-polling barrier. It prints each way's least and median, and the median over the alone
one's.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from mpi4py import MPI

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgeshard_mpi.models import ModelSpec, prepare  # noqa: E402
from edgeshard_mpi.profiler import _Evictor  # noqa: E402
from edgeshard_mpi.shard import Shard  # noqa: E402


def barrier(comm) -> None:
    req, delay = comm.Ibarrier(), 50e-6
    while not req.Test():
        time.sleep(delay)
        delay = min(delay * 1.5, 1e-3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slowdowns", default="8,6,16,2", help="per rank, in rank order (hetero4's)")
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--rows", type=int, default=4)
    args = ap.parse_args()
    comm = MPI.COMM_WORLD
    slowdowns = [float(s) for s in args.slowdowns.split(",")]
    slow = slowdowns[comm.rank % len(slowdowns)]
    torch.set_num_threads(1)
    spec = ModelSpec.load(prepare("smollm2-135m"), "float32")
    hidden = spec.config["hidden_size"]
    shard = Shard(spec, 1, 4, rows=args.rows)
    shard.forward(0, torch.randn(args.rows, 128, hidden), [0] * args.rows, capacity=8192)
    x = torch.randn(args.rows, 1, hidden)
    evict = _Evictor()

    def step(stretch: float, clear: bool, sliced: bool = False) -> float:
        if clear:
            evict()
        wall, cpu = time.perf_counter(), time.thread_time()
        shard.forward(0, x)
        t = time.thread_time() - cpu
        end = wall + stretch * t
        while (left := end - time.perf_counter()) > 0:
            time.sleep(min(left, 1e-3) if sliced else left)
        return t

    def loop(seconds: float, stretch: float, ways: dict, name: str) -> None:
        one, sliced = ways.setdefault(name, []), ways.setdefault(f"{name} in slices", [])
        end = time.perf_counter() + seconds
        while time.perf_counter() < end or len(one) < 5:
            one.append(step(stretch, False))
            if stretch > 1:
                sliced.append(step(stretch, False, True))
        if not sliced:
            del ways[f"{name} in slices"]

    ways: dict[str, list[float]] = {}
    for r in range(comm.size):
        if r == comm.rank:
            ways["alone"] = [step(1.0, True) for _ in range(15)]
        barrier(comm)
    for r in range(comm.size):
        if r == comm.rank:
            loop(args.seconds / 2, slow, ways, "alone, stretched")
        barrier(comm)
    barrier(comm)
    loop(args.seconds, slow, ways, "together, stretched")
    barrier(comm)
    loop(args.seconds / 2, 1.0, ways, "together, flat out")
    barrier(comm)
    gathered = comm.gather((slow, ways))
    if comm.rank == 0:
        print(f"blocks 1-4 of smollm2-135m, {args.rows} rows, 1 thread: CPU ms a decode step, least / median "
              f"(median over alone's), {comm.size} ranks")
        for r, (s, w) in enumerate(gathered):
            base = statistics.median(w["alone"])
            cells = [f"{k} {min(v) * 1e3:.1f} / {statistics.median(v) * 1e3:.1f} ({statistics.median(v) / base:.2f}x)"
                     for k, v in w.items()]
            print(f"rank {r} (slowdown {s:g}): " + "; ".join(cells))


if __name__ == "__main__":
    main()
