"""The EdgeShard paper's testbed as derived Profiles of Llama2-7B, 13B and 70B.

    python benchmarks/paper_profiles.py [--out profiles]

Writes profiles/paper-llama2-7b.json, paper-llama2-13b.json and paper-llama2-70b.json, built with
the `Profile` dataclass and saved with `Profile.save`. Nothing is measured: every number comes from
/work/shared/PAPER.md ("Testbed and results") or from the Llama2 model configs, as follows. The same
text goes into each profile's `notes` field, followed by that model's derived numbers.

Units. 1 GB = 1e9 bytes throughout; 1 Mbit/s = 1e6 bit/s = 125,000 bytes/s.

Devices (PAPER: 12 Jetson AGX Orin, 2 Jetson Orin NX, 1 RTX 3090 cloud server), in rank order:
device 0 = the source, an AGX Orin; devices 1..11 = AGX Orin; devices 12..13 = Orin NX; device 14 =
the cloud server (RTX 3090). Usable memory (PAPER: 29 GB AGX Orin, 14 GB Orin NX, 22-24 GB 3090):
29e9, 14e9 and 23e9 bytes (the middle of 22-24 for the 3090). torch "cuda", slowdown 1.0, no link
emulation (bandwidth None, latency 0.0): the links are in the profile's tables instead.

Units of the model: embed, block.0 .. block.L-1, head (norm + LM head); 7B: 34 units, 13B: 42,
70B: 82. Weight bytes are parameter counts x 4 (float32), RMSNorm weights (hidden floats per norm,
< 0.01%) left out:
  block = 2*h*h (q, o) + 2*h*kv_heads*128 (k, v) + 3*h*ffn (gate, up, down)
    7B:  4*4096^2 + 3*4096*11008 = 202,375,168 params = 809,500,672 bytes
    13B: 4*5120^2 + 3*5120*13824 = 317,194,240 params = 1,268,776,960 bytes
    70B: 2*8192^2 + 2*8192*1024 + 3*8192*28672 = 855,638,016 params = 3,422,552,064 bytes
  embed = head = 32000 * h params (vocabulary 32000 in all three).
PAPER's "0.488 GB embedding, 0.754 GB per block" are these 7B figures in GiB (524,288,000 bytes =
0.488 GiB; 809,500,672 bytes = 0.754 GiB), so the exact byte counts above are used, while device
memory is in GB (1e9) as the brief fixes it. The whole 7B model is 26.95e9 bytes (PAPER: "about
28 GB"), 13B 52.06e9, 70B 275.9e9 (PAPER: "about 280 GB").
KV cache per token per block: 2 (k, v) * kv_heads * 128 * 4 bytes: 7B 32 kv heads = 32,768;
13B 40 = 40,960; 70B (grouped-query attention) 8 = 8,192. The embedding and the head hold none.
Activations sent on: hidden * 4 bytes per token (float32); the head sends a token id, 8 bytes
(Profile.costs() uses 8 bytes per row for the last unit whatever the file says).

Decode times, 7B (PAPER, from an unofficial reimplementation, ms per unit):
  AGX Orin   embed 0.627, block 5.2-5.5,  head 4.48,  all 34 units 174.0
  Orin NX    embed 0.476, block 5.7-6.4,  head 5.48,  all 34 units 198.6
  RTX 3090   embed 0.077, block 0.77-0.83, head 0.648, all 34 units 26.1
Every block gets the same time, (total - embed - head) / 32: AGX 5.27791 ms, NX 6.02013 ms,
3090 0.79297 ms. Each lies inside PAPER's range, and with it the 34 units add up to PAPER's totals
exactly (a linear spread over the range, or its midpoint, would overshoot them: AGX 176.3 ms).
13B and 70B: no times in PAPER. Assumption: decode is memory-bound, so a unit's time scales with
the bytes it reads, that is with its parameter count. Block times are the 7B block time times the
ratio of block parameters (13B: 1.56736, 70B: 4.22798); embed and head times the 7B ones times the
ratio of vocab x hidden (13B: 5120/4096 = 1.25, 70B: 8192/4096 = 2). The same ratios give the bytes.

Prefill times: PAPER gives none. Assumption, used only for time to first token (the plans here are
made for the decode step): prefill of the 32 prompt tokens = 4 x the unit's decode step time on
every device. 32 tokens at the decode cost each (32x) would be far too pessimistic: a decode step
reads all the weights for one token, a prefill reads them once for all 32. Sanity check with
PAPER's peak FP32 rates: a 7B block's 32-token prefill is 2 * 202.4M * 32 = 13 GFLOP, 3.9 ms on an
AGX Orin (3.33 TFLOPS), 6.9 ms on an Orin NX (1.88), 0.36 ms on the 3090 (36); 4 x decode gives
21 ms, 24 ms and 3.2 ms, on the safe side since peak rates are not reached.

Links (PAPER: bandwidth set with tc, swept 1-50 Mbps, "source-to-cloud links are the slow ones";
transfer = bits / bandwidth + 2.1 ms): 50 Mbit/s (6.25e6 bytes/s) between every pair of devices,
except source (device 0) <-> cloud (device 14) both ways at 1 Mbit/s (125,000 bytes/s), the low
end of the sweep. Latency 2.1 ms on every link; the diagonal has bandwidth None and latency 0.

Shapes: 32 prompt tokens and 96 generated (PAPER), micro-batch 1; context = 32 + 96/2 = 80, the
mean context while decoding, kept exact rather than rounded up to a power of two as
profile_shapes() would (it would give 128). The KV cache is planned for these 80 tokens.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgeshard_mpi.profiler import Profile  # noqa: E402

GB = 1e9  # bytes
MBIT_S = 1e6 / 8  # bytes/s of 1 Mbit/s
MS = 1e-3
VOCAB = 32000
HEAD_DIM = 128
FP32 = 4  # bytes per parameter and per activation value

# Llama2 configs: hidden size, FFN size, decoder blocks, key/value heads.
MODELS = {
    "llama2-7b": {"hidden": 4096, "ffn": 11008, "blocks": 32, "kv_heads": 32},
    "llama2-13b": {"hidden": 5120, "ffn": 13824, "blocks": 40, "kv_heads": 40},
    "llama2-70b": {"hidden": 8192, "ffn": 28672, "blocks": 80, "kv_heads": 8},
}

# PAPER: 7B decode times per unit (ms) and the total of all 34 units, per device kind.
PAPER_7B_MS = {
    "agx-orin": {"embed": 0.627, "block_range": (5.2, 5.5), "head": 4.48, "total": 174.0},
    "orin-nx": {"embed": 0.476, "block_range": (5.7, 6.4), "head": 5.48, "total": 198.6},
    "rtx3090": {"embed": 0.077, "block_range": (0.77, 0.83), "head": 0.648, "total": 26.1},
}
MEMORY = {"agx-orin": 29 * GB, "orin-nx": 14 * GB, "rtx3090": 23 * GB}
KINDS = ["agx-orin"] * 12 + ["orin-nx"] * 2 + ["rtx3090"]  # rank order; rank 0 is the source
SOURCE, CLOUD = 0, 14
FAST_LINK, SLOW_LINK = 50 * MBIT_S, 1 * MBIT_S
LINK_LATENCY = 2.1 * MS
PREFILL_FACTOR = 4.0
SHAPES = {"prompt_tokens": 32, "context": 32 + 96 // 2, "micro_batch_size": 1}


def block_params(cfg: dict) -> int:
    h = cfg["hidden"]
    return 2 * h * h + 2 * h * cfg["kv_heads"] * HEAD_DIM + 3 * h * cfg["ffn"]


def embed_params(cfg: dict) -> int:
    return VOCAB * cfg["hidden"]


def block_ms_7b(kind: str) -> float:
    """The one block time that makes the 34 units add up to PAPER's total for this device kind."""
    p = PAPER_7B_MS[kind]
    ms = (p["total"] - p["embed"] - p["head"]) / 32
    lo, hi = p["block_range"]
    assert lo <= ms <= hi, (kind, ms)
    return ms


def device_name(rank: int) -> str:
    kind = KINDS[rank]
    return "rtx3090-cloud" if kind == "rtx3090" else f"{kind}-{rank}"


def build(model: str) -> Profile:
    cfg, base = MODELS[model], MODELS["llama2-7b"]
    n_blocks = cfg["blocks"]
    block_ratio = block_params(cfg) / block_params(base)
    embed_ratio = embed_params(cfg) / embed_params(base)
    hidden_out = cfg["hidden"] * FP32
    kv = 2 * cfg["kv_heads"] * HEAD_DIM * FP32

    units = [{"name": "embed", "param_bytes": embed_params(cfg) * FP32, "kv_bytes_per_token": 0,
              "out_bytes_per_token": hidden_out}]
    units += [{"name": f"block.{b}", "param_bytes": block_params(cfg) * FP32, "kv_bytes_per_token": kv,
               "out_bytes_per_token": hidden_out} for b in range(n_blocks)]
    units.append({"name": "head", "param_bytes": embed_params(cfg) * FP32, "kv_bytes_per_token": 0,
                  "out_bytes_per_token": 8})

    devices = []
    for rank, kind in enumerate(KINDS):
        p = PAPER_7B_MS[kind]
        decode = ([p["embed"] * embed_ratio * MS] + [block_ms_7b(kind) * block_ratio * MS] * n_blocks
                  + [p["head"] * embed_ratio * MS])
        name = device_name(rank)
        devices.append({"name": name, "host": name, "memory": int(MEMORY[kind]), "torch": "cuda",
                        "slowdown": 1.0, "bandwidth": None, "latency": 0.0,
                        "prefill_s": [t * PREFILL_FACTOR for t in decode], "decode_s": decode})

    m = len(KINDS)
    bandwidth = [[None if k == j else (SLOW_LINK if {k, j} == {SOURCE, CLOUD} else FAST_LINK) for j in range(m)]
                 for k in range(m)]
    latency = [[0.0 if k == j else LINK_LATENCY for j in range(m)] for k in range(m)]

    total = sum(u["param_bytes"] for u in units)
    summary = (f"\n\nThis profile: {model}, {len(units)} units (embed, {n_blocks} blocks, head). "
               f"Block: {block_params(cfg):,} params = {block_params(cfg) * FP32:,} bytes "
               f"(x{block_ratio:.5f} the 7B block), KV {kv:,} bytes/token; embed and head: "
               f"{embed_params(cfg):,} params = {embed_params(cfg) * FP32:,} bytes each "
               f"(x{embed_ratio:.5f} 7B). Whole model {total / GB:.2f} GB of weights. Decode ms per unit "
               + "; ".join(f"{kind}: embed {PAPER_7B_MS[kind]['embed'] * embed_ratio:.4f}, block "
                           f"{block_ms_7b(kind) * block_ratio:.4f}, head {PAPER_7B_MS[kind]['head'] * embed_ratio:.4f}"
                           for kind in PAPER_7B_MS) + ".")
    return Profile(
        model={"name": model, "fingerprint": f"paper-{model}", "dtype": "float32", "num_units": len(units)},
        units=units, devices=devices, bandwidth=bandwidth, latency=latency, shapes=dict(SHAPES),
        cluster="paper-testbed-15", versions={}, created=datetime.date.today().isoformat(),
        notes=__doc__.strip() + summary)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "profiles", help="folder for the JSON files")
    args = ap.parse_args(argv)
    for model in MODELS:
        prof = build(model)
        path = prof.save(args.out / f"paper-{model}.json")
        total = sum(u["param_bytes"] for u in prof.units)
        print(f"{path}: {prof.num_units} units, {len(prof.devices)} devices, {total / GB:.2f} GB of weights")
    return 0


if __name__ == "__main__":
    sys.exit(main())
