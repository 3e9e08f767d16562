"""A bf16 decode step on a CPU without bf16 instructions: weights as the kernel's panels, or as rows.

    python benchmarks/bf16_panels.py [--rows 1,4,16] [--rounds 5] [--threads 2]

Three eager shards holding all of smollm2-135m in this process: bf16 with its matrices held as
`cpu_kernels.to_panels` leaves them (what a widened shard now holds), bf16 with them as plain rows
(the kernel `bf16_mm`, what it held before), and fp32. For each row count, `--rounds` rounds in
which each shard takes 8 greedy decode steps in turn after a 20-token prompt; the table gives each
shard's median ms a step and the ratios. The head, tied to the embedding matrix, is held as panels in
the first (the embedding reading its rows from them) and as rows in the second. Needs the project's
kernels and a CPU without AVX512-BF16 or AMX (elsewhere a bf16 shard is not widened).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="1,4,16")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    import torch

    import edgeshard_mpi.shard as shard_module
    from edgeshard_mpi.models import ModelSpec, prepare
    from edgeshard_mpi.shard import Shard

    torch.set_num_threads(args.threads)
    path = prepare("smollm2-135m")
    bf16 = ModelSpec.load(path, "bfloat16")
    shards = {"panels": Shard(bf16, 0, bf16.num_units - 1)}
    if not shards["panels"].widened:
        sys.exit("bf16 is not widened here (bf16 instructions, or no kernels): nothing to compare")
    swap = shard_module.swap_linears  # the same shard, its widened matrices left as rows

    def as_rows(module, turned, pack=False, widen=False, panel=False):
        return swap(module, turned, False, widen, panel)

    shard_module.swap_linears = as_rows
    shards["rows"] = Shard(bf16, 0, bf16.num_units - 1)
    shard_module.swap_linears = swap
    fp32 = ModelSpec.load(path, "float32")
    shards["fp32"] = Shard(fp32, 0, fp32.num_units - 1)

    def steps(shard, rows: int) -> float:
        ids = torch.arange(1000, 1020).repeat(rows, 1)
        x = shard.forward(0, ids, [0] * rows, ids.shape[1] + args.steps + 2).argmax(-1)[:, None]
        t0 = time.perf_counter()
        for _ in range(args.steps):
            x = shard.forward(0, x).argmax(-1)[:, None]
        return (time.perf_counter() - t0) / args.steps * 1e3

    print(f"smollm2-135m, {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{args.threads} threads, {args.rounds} rounds of {args.steps} steps, medians")
    print("| rows | bf16 panels, ms/step | bf16 rows | fp32 | rows / panels | fp32 / panels | fp32 / rows |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    with torch.no_grad():
        for rows in map(int, args.rows.split(",")):
            for shard in shards.values():
                steps(shard, rows)  # warm-up
            times = {k: [] for k in shards}
            for _ in range(args.rounds):
                for k, shard in shards.items():
                    times[k].append(steps(shard, rows))
            p, r, f = (statistics.median(times[k]) for k in ("panels", "rows", "fp32"))
            print(f"| {rows} | {p:.1f} | {r:.1f} | {f:.1f} | {r / p:.2f} | {f / p:.2f} | {f / r:.2f} |", flush=True)


if __name__ == "__main__":
    main()
