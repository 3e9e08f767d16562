"""The LM head's few-row products in its own forms against the probe's (fewrows.head_shape).

    python benchmarks/head_forms.py [--threads 1,2] [--rows 1,2,3,4,8] [--steps 12]

In one process, for each thread count: the row counts the probe matrix turns (the forms the head took
before it was measured on its own), the head's own, and the median decode step of a stage holding
the last two blocks and the head (what the head's stage computes) at each row count, in both forms,
timed in alternation. smollm2-135m, fp32.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgeshard_mpi import fewrows  # noqa: E402
from edgeshard_mpi.models import ModelSpec, prepare  # noqa: E402
from edgeshard_mpi.shard import Shard  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--rows", default="1,2,3,4,8")
    ap.add_argument("--steps", type=int, default=12)
    args = ap.parse_args()
    spec = ModelSpec.load(prepare(args.model), "float32")
    first, last = spec.num_units - 3, spec.num_units - 1
    for threads in map(int, args.threads.split(",")):
        torch.set_num_threads(threads)
        probe = fewrows.transposed_rows(torch.float32)
        own = fewrows.transposed_rows(torch.float32, fewrows.head_shape(spec))
        key = (torch.float32, threads, fewrows.head_shape(spec))
        shards = {}
        for name, head in (("probe's", probe), ("own", own)):
            fewrows._chosen[key] = head
            shards[name] = Shard(spec, first, last, rows=1)
        fewrows._chosen[key] = own
        print(f"{threads} thread(s): probe turns {sorted(probe)}, the head's own {sorted(own)}")
        print(f"{'rows':>4} {'probe forms ms':>15} {'own forms ms':>13} {'probe / own':>11}")
        for rows in map(int, args.rows.split(",")):
            times = {name: [] for name in shards}
            h = torch.randn(rows, 16, spec.config["hidden_size"])
            for s in shards.values():
                s.release(0)
                s.forward(0, h, [0] * rows, capacity=16 + 2 * args.steps)
            for _ in range(args.steps):
                x = torch.randn(rows, 1, spec.config["hidden_size"])
                for name, s in shards.items():
                    t0 = time.perf_counter()
                    s.forward(0, x)
                    times[name].append(time.perf_counter() - t0)
            a, b = (statistics.median(times[n]) * 1e3 for n in ("probe's", "own"))
            print(f"{rows:>4} {a:>15.1f} {b:>13.1f} {a / b:>11.2f}")


if __name__ == "__main__":
    main()
