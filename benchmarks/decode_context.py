"""What a decode step costs as its rows and their context grow, against what the profile's line says.

    python benchmarks/decode_context.py [--rows 1,8] [--columns 64,256,512,875] [--threads 2] [--profile P]

One eager shard holding all of smollm2-135m, fp32, in this process. For each micro-batch size and
context length (KV columns every row attends over), the median of 12 decode steps. simulate.StageLine
costs a forward by its tokens alone, at the profile's context (`shapes.context`, the mean context of
the job, rounded up to a power of two); a row-admission slot's axis grows to 1.25x its longest
request. The last column is each step against the one at 256 columns, the context a profile of
benchmarks/longtail.py's job is taken at. With `--profile` (a one-device profile of the model), each
step's time as the simulator costs it too (simulate.StageLine: the line through the profile's decode
step and prefill, and each row's KV columns past the profile's context), and measured / predicted.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="1,8")
    ap.add_argument("--columns", default="64,256,512,875")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--profile", help="a one-device profile of smollm2-135m fp32: its line's time for each step")
    args = ap.parse_args()
    import torch

    from edgeshard_mpi.models import ModelSpec, prepare
    from edgeshard_mpi.shard import Shard

    torch.set_num_threads(args.threads)
    spec = ModelSpec.load(prepare("smollm2-135m"), "float32")
    shard = Shard(spec, 0, spec.num_units - 1)
    columns = [int(c) for c in args.columns.split(",")]
    line = None
    if args.profile:
        from edgeshard_mpi.planner import Plan, Stage
        from edgeshard_mpi.profiler import Profile
        from edgeshard_mpi.simulate import StepCosts

        prof = Profile.load(args.profile)
        line = StepCosts.from_profile(prof, Plan((Stage(0, 0, prof.num_units - 1),), prof.num_units)).line(0)
    print(f"{platform.node()}: smollm2-135m fp32, eager, {args.threads} threads, torch {torch.__version__}")
    extra = f" {'line ms':>8} {'meas/line':>9}" if line else ""
    print(f"{'rows':>4} {'columns':>8} {'ms/step':>8} {'vs 256':>7}{extra}")
    for rows in (int(r) for r in args.rows.split(",")):
        at = {}
        for cols in columns:
            gen = torch.Generator().manual_seed(cols)
            shard.forward(0, torch.randint(10, 1000, (rows, cols), generator=gen), [0] * rows, cols + 40)
            x = torch.randint(10, 1000, (rows, 1), generator=gen)
            for _ in range(3):
                shard.forward(0, x)
            times = []
            for _ in range(12):
                t0 = time.perf_counter()
                shard.forward(0, x)
                times.append(time.perf_counter() - t0)
            shard.release(0)
            at[cols] = sorted(times)[len(times) // 2]
            base = f"{at[cols] / at[256]:>7.2f}" if 256 in at else ""
            predicted = ""
            if line is not None:  # the step writes column cols + 16 (3 warm-up steps, 12 timed; the median)
                t = line.seconds(rows, cols + 10)
                predicted = f" {t * 1e3:>8.1f} {at[cols] / t:>9.2f}"
            print(f"{rows:>4} {cols:>8} {at[cols] * 1e3:>8.1f} {base:>7}{predicted}", flush=True)


if __name__ == "__main__":
    main()
