"""Where a one-rank decode step's time goes, by kind of work.

    python benchmarks/step_breakdown.py [--model smollm2-135m] [--dtype float32] [--quantize int8] [--batch 1]

The whole model as one Shard in this process (what a one-rank run computes), `--threads` intra-op
threads, a prompt of about 20 tokens, then `--steps` greedy decode steps under torch.profiler. Each aten
op's own (self) CPU time is put in one bucket: matmuls, attention, norms (RMSNorm's pow/mean/rsqrt),
other elementwise ops and copies; the mask helpers, rotary tables, KV cache updates and sampling
(argmax) are timed whole, as ranges. "Python and
dispatch" is the wall time the ops do not account for: module calls, transformers' code, argument
checks. Without the profiler the same steps are timed once more, to give its own overhead.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from edgeshard_mpi import kv_cache
from edgeshard_mpi.models import ModelSpec, prepare
from edgeshard_mpi.shard import Shard

BUCKETS = {  # aten op -> bucket; record_function ranges below claim masks, rotary and sampling whole
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::_weight_int8pack_mm", "edgeshard::int8_mm",
               "edgeshard::bf16_mm", "edgeshard::bf16_panels_mm", "edgeshard::f32_panels_mm"),
    "attention": ("aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_scaled_dot_product_attention_math",
                  "aten::_scaled_dot_product_efficient_attention"),
    "norms": ("aten::pow", "aten::mean", "aten::rsqrt"),
}
RANGES = ("masks", "rotary", "KV cache", "sampling")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--quantize", default=None)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    spec = ModelSpec.load(prepare(args.model), args.dtype, quantize=args.quantize)
    shard = Shard(spec, 0, spec.num_units - 1, rows=args.batch)  # the forms a run of this micro-batch takes
    # label the shard's mask and rotary work, so their ops are counted apart from the layers'
    for t, fn in list(shard.mask_fn.items()):
        shard.mask_fn[t] = lambda *a, _fn=fn, **k: _in_range("masks", _fn, *a, **k)
    rotary = shard.rotary.forward
    shard.rotary.forward = lambda *a, **k: _in_range("rotary", rotary, *a, **k)
    for cls in (kv_cache._FullLayer, kv_cache._WindowLayer):
        cls.update = lambda self, *a, _fn=cls.update, **k: _in_range("KV cache", _fn, self, *a, **k)

    ids = torch.arange(1000, 1020).repeat(args.batch, 1)

    def decode(n):
        x = shard.forward(0, ids, [0] * args.batch, ids.shape[1] + 2 * n + 8).argmax(-1)[:, None]
        t0 = time.perf_counter()
        for _ in range(n):
            logits = shard.forward(0, x)
            with record_function("sampling"):
                x = logits.argmax(-1)[:, None]
        return (time.perf_counter() - t0) / n

    decode(4)  # warm-up
    plain = decode(args.steps)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        profiled = decode(args.steps)
    buckets: dict[str, float] = defaultdict(float)
    for ev in prof.events():
        if ev.name in RANGES:
            buckets[ev.name] += ev.cpu_time_total
    claimed = {ev.id for ev in prof.events() if ev.name in RANGES}
    for ev in prof.events():
        if not ev.name.startswith(("aten::", "edgeshard::")) or _under(ev, claimed):
            continue
        name = next((b for b, ops in BUCKETS.items() if ev.name in ops), "other ops")
        buckets[name] += ev.self_cpu_time_total
    step_us = profiled * 1e6
    print(f"{spec.name} {args.dtype}{' int8' if args.quantize else ''}, batch {args.batch}, {args.threads} threads: "
          f"{plain * 1e3:.2f} ms/step ({profiled * 1e3:.2f} under the profiler)")
    print(f"{'bucket':<22} {'ms/step':>8} {'share':>6}")
    total = 0.0
    for name, us in sorted(buckets.items(), key=lambda kv: -kv[1]):
        total += us / args.steps
        print(f"{name:<22} {us / args.steps / 1e3:>8.2f} {us / args.steps / step_us:>6.1%}")
    rest = step_us - total
    print(f"{'Python and dispatch':<22} {rest / 1e3:>8.2f} {rest / step_us:>6.1%}")


def _in_range(name, fn, *a, **k):
    with record_function(name):
        return fn(*a, **k)


def _under(ev, ids) -> bool:
    p = ev.cpu_parent
    while p is not None:
        if p.id in ids:
            return True
        p = p.cpu_parent
    return False


if __name__ == "__main__":
    main()
