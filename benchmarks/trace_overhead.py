"""What tracing costs: Tracer.add off and on, per call and per pipeline step.

    python benchmarks/trace_overhead.py

A stage makes three calls a step (wait, compute, send), the source the same; a step of the
smallest stage in BENCHMARKS.md's runs takes milliseconds, so the share per step is printed
against a 1 ms step (a stage of tiny-random on one core) as the worst case.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgeshard_mpi.trace import Tracer  # noqa: E402

N = 1_000_000


def per_call(enabled: bool) -> float:
    t = Tracer(enabled)
    best = float("inf")
    for _ in range(3):
        t.events.clear()
        t0 = time.perf_counter()
        for i in range(N):
            t.add("decode", 0.0, 1.0, 1, i)
        best = min(best, (time.perf_counter() - t0) / N)
    return best


def main() -> None:
    off, on = per_call(False), per_call(True)
    print(f"Tracer.add off: {off * 1e9:.0f} ns a call; on: {on * 1e9:.0f} ns a call")
    for name, cost in (("off", off), ("on", on)):
        print(f"tracing {name}: 3 calls a step = {3 * cost * 1e6:.2f} us, {3 * cost / 1e-3:.3%} of a 1 ms step")


if __name__ == "__main__":
    main()
