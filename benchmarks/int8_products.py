"""A decode step's int8 products alone: the project's kernel against aten's, at a few row counts.

    python benchmarks/int8_products.py [--rows 1,2,4,8,16] [--threads 2]

SmolLM2-135M's 211 matrices (30 blocks of q, k, v, o, gate, up, down, and the 49152 x 576 head), random
int8 values with bf16 per-row scales, in one process: the median of 3 rounds, the forms alternating,
each round the median of 8 passes:
  aten     torch.ops.aten._weight_int8pack_mm on bf16 activations (what int8 took before the kernel)
  kernel   torch.ops.edgeshard.int8_mm (cpu_kernels), as eager steps and compiled graphs call it
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from edgeshard_mpi import cpu_kernels  # noqa: E402

SHAPES = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)] * 30 + [(49152, 576)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="1,2,4,8,16")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    why = cpu_kernels.available()
    if why is not None:
        sys.exit(f"int8_products: {why}")
    gen = torch.Generator().manual_seed(0)
    mats = [(torch.randint(-127, 128, s, dtype=torch.int8, generator=gen), torch.rand(s[0], generator=gen).bfloat16())
            for s in SHAPES]
    bytes_ = sum(w.numel() for w, _ in mats)

    def median_ms(fn, passes=8) -> float:
        fn()
        ts = []
        for _ in range(passes):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return sorted(ts)[passes // 2] * 1e3

    print(f"{len(mats)} int8 matrices, {bytes_ / 1e6:.1f} MB, {args.threads} threads; ms for all of them")
    print("| rows | aten | kernel | aten / kernel | weight bytes / kernel time, GB/s |")
    print("|---:|---:|---:|---:|---:|")
    for rows in map(int, args.rows.split(",")):
        x = {k: torch.randn(rows, k, generator=gen) for k in (576, 1536)}
        xb = {k: v.bfloat16() for k, v in x.items()}
        forms = {"aten": lambda: [torch.ops.aten._weight_int8pack_mm(xb[w.shape[1]], w, s) for w, s in mats],
                 "kernel": lambda: [cpu_kernels.int8_mm(x[w.shape[1]], w, s) for w, s in mats]}
        ms = {name: [] for name in forms}
        for _ in range(3):  # alternating, so that a slow minute on the machine falls on every form
            for name, fn in forms.items():
                ms[name].append(median_ms(fn))
        m = {name: sorted(v)[1] for name, v in ms.items()}
        print(f"| {rows} | {m['aten']:.1f} | {m['kernel']:.1f} | {m['aten'] / m['kernel']:.2f} | "
              f"{bytes_ / m['kernel'] / 1e6:.1f} |")


if __name__ == "__main__":
    main()
