"""An fp32 decode step with its matrices held as the kernel's panels, against torch's forms.

    python benchmarks/f32_panels.py [--rows 1,4,16] [--rounds 5] [--threads 2]

Two parts, each form taking its turn in every round, medians over `--rounds` rounds:
  products  the 210 layer products of a smollm2-135m step (random weights of its shapes, 30 layers of
            q, k, v, o, gate, up and down) at each row count, in each form fewrows.py can take: the
            kernel on fp32 panels (`cpu_kernels.f32_panels_mm`), `linear`, the transposed product,
            and oneDNN on reordered weights where this torch has it;
  steps     whole greedy decode steps of three eager shards of all of smollm2-135m after a 20-token
            prompt: fp32 on panels (what a shard takes where `fewrows.paneled` measures them faster),
            fp32 in the form it took before (panels ruled out: oneDNN's reordered weights where they
            measure faster, else the transposed form's row counts), and bf16 (the widened form on a CPU
            without bf16 instructions); at row counts past one, the only ones that take panels.
Needs the project's kernels (AVX2 and a C compiler).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]  # out x in


def products(rows_list: list[int], rounds: int) -> None:
    import torch
    from torch import nn

    from edgeshard_mpi import cpu_kernels, fewrows

    gen = torch.Generator().manual_seed(0)
    mats = [torch.randn(n, k, generator=gen) for _ in range(30) for n, k in SHAPES]
    panels = [cpu_kernels.to_panels(w) for w in mats]
    packed = [fewrows._pack(w) for w in mats] if fewrows.reorders(torch.float32) else None
    for rows in rows_list:
        xs = {k: torch.randn(rows, k, generator=gen) for k in (576, 1536)}
        forms = {"panels": lambda: [cpu_kernels.f32_panels_mm(xs[w.shape[1]], p, None, w.shape[0])
                                    for w, p in zip(mats, panels)],
                 "linear": lambda: [nn.functional.linear(xs[w.shape[1]], w) for w in mats],
                 "transposed": lambda: [fewrows._transposed(xs[w.shape[1]], w) for w in mats]}
        if packed is not None:
            forms["oneDNN"] = lambda: [fewrows._packed(xs[w.shape[1]], p, None, w.shape[0])
                                       for w, p in zip(mats, packed)]
        times = {k: [] for k in forms}
        for f in forms.values():
            f()  # warm-up
        for _ in range(rounds):
            for k, f in forms.items():
                t0 = time.perf_counter()
                f()
                times[k].append((time.perf_counter() - t0) * 1e3)
        med = {k: statistics.median(v) for k, v in times.items()}
        best = min((v, k) for k, v in med.items() if k != "panels")
        cells = " | ".join(f"{med.get(k, float('nan')):.1f}" for k in ("panels", "linear", "transposed", "oneDNN"))
        print(f"| {rows} | {cells} | {best[1]} | {best[0] / med['panels']:.2f} |", flush=True)


def steps(rows_list: list[int], rounds: int, n_steps: int) -> None:
    import torch

    from edgeshard_mpi import fewrows
    from edgeshard_mpi.models import ModelSpec, prepare
    from edgeshard_mpi.shard import Shard

    path = prepare("smollm2-135m")
    fp32, bf16 = ModelSpec.load(path, "float32"), ModelSpec.load(path, "bfloat16")
    threads = torch.get_num_threads()
    for rows in [r for r in rows_list if r > 1]:  # a shard of one row does not hold panels (fewrows.panels_for)
        shards = {}
        for name, panels in (("panels", True), ("before", False)):
            fewrows._paneling[(torch.float32, threads, rows)] = panels
            shards[name] = Shard(fp32, 0, fp32.num_units - 1, rows=rows)
            assert shards[name].paneled == panels
        fewrows._paneling.pop((torch.float32, threads, rows))
        shards["bf16"] = Shard(bf16, 0, bf16.num_units - 1, rows=rows)
        before = "oneDNN" if shards["before"].packed else f"transposed at {sorted(shards['before'].turned)}"

        def run(shard) -> float:
            ids = torch.arange(1000, 1020).repeat(rows, 1)
            x = shard.forward(0, ids, [0] * rows, ids.shape[1] + n_steps + 2).argmax(-1)[:, None]
            t0 = time.perf_counter()
            for _ in range(n_steps):
                x = shard.forward(0, x).argmax(-1)[:, None]
            return (time.perf_counter() - t0) / n_steps * 1e3

        for shard in shards.values():
            run(shard)  # warm-up
        times = {k: [] for k in shards}
        for _ in range(rounds):
            for k, shard in shards.items():
                times[k].append(run(shard))
        p, b, h = (statistics.median(times[k]) for k in ("panels", "before", "bf16"))
        print(f"| {rows} | {p:.1f} | {b:.1f} ({before}) | {h:.1f} | {b / p:.2f} | {p / h:.2f} | {b / h:.2f} |",
              flush=True)
        del shards


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="1,4,16")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", choices=["products", "steps"])
    args = ap.parse_args()
    import torch

    from edgeshard_mpi import cpu_kernels

    if cpu_kernels.available() is not None:
        sys.exit(f"no kernels here: {cpu_kernels.available()}")
    torch.set_num_threads(args.threads)
    rows = [int(r) for r in args.rows.split(",")]
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} threads, "
          f"{args.rounds} rounds, medians")
    with torch.no_grad():
        if args.only in (None, "products"):
            print("\nsmollm2's 210 layer products, ms")
            print("| rows | panels | linear | transposed | oneDNN | fastest of the others | it / panels |")
            print("|---:|---:|---:|---:|---:|---|---:|")
            products(rows, args.rounds)
        if args.only in (None, "steps"):
            print(f"\nwhole decode steps, {args.steps} a round, ms/step")
            print("| rows | fp32 panels | fp32 before | bf16 | before / panels | panels / bf16 | before / bf16 |")
            print("|---:|---:|---:|---:|---:|---:|---:|")
            steps(rows, args.rounds, args.steps)


if __name__ == "__main__":
    main()
