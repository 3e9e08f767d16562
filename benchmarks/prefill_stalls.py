"""How much a long prompt's prefill stalls the pipeline, and what chunked prefill wins back, measured.

    python benchmarks/prefill_stalls.py [--prompts 96] [--long 800] [--every 12] [--new 32 | --new 8,96]
                                        [--chunks 64,128,256] [--clock cpu|work] [--json out.json]

Chunked prefill (Sarathi-Serve) splits a long prompt's prefill into pieces run beside other
micro-batches' decode steps, so that one 2,000-token prompt does not hold every stream up. It moves
work, it does not remove any: on a pipeline its tokens/s gain is bounded by the time the busiest
stage, which sets the rate, sits idle while prompts keep arriving. This measures that time.

Jobs on `hostfiles/hetero4.hosts` (throughput plan, no-bubbles, row admission, micro-batch 4,
smollm2-135m fp32, greedy, `--new` new tokens each, or, given as LO,HI, each request's own
`max_new_tokens` drawn log-uniform from LO to HI: rows then finish apart, and a long prompt joins a
running micro-batch instead of starting a fresh one), one after the other, each with `--trace`:
- `mixed`: `--prompts` prompts, every `--every`-th one `--long` tokens, the others 10-40, every join
  prefilled in one step (`--prefill-chunk 0`);
- `mixed, chunks of N`: the same job, a joining prompt of more than N tokens prefilled N a step
  (`--prefill-chunk N`), for each N of `--chunks`;
- `short`: the same job with every long prompt cut to a short one.
With `--clock work`, every device runs with `clock=work` (a step takes the profile's time for its
work, whatever else the host runs), so that the jobs differ only in their schedules, not in the
host's drift between them.
For each: tokens/s, and, from the trace, the busiest stage's idle share between its first step and
its last joining (prefill) step, while the source still had prompts to admit. Idle there that the
mixed job has and the short one has not is what the long prefills cost the pipeline beyond their
own compute, and the most that chunking them could win back.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _bench import with_work_clock  # noqa: E402

SOURCES = ["README.md", "DESIGN.md"]
HOSTS = ROOT / "hostfiles" / "hetero4.hosts"


def prompts(tok, n: int, long: int, every: int, with_long: bool, new: tuple[int, int], seed: int = 0) -> list[dict]:
    text = "\n\n".join((ROOT / f).read_text() for f in SOURCES)
    ids = tok(text)["input_ids"]
    rng = random.Random(seed)
    out = []
    for i in range(n):
        short = rng.randint(10, 40)
        length = long if with_long and i % every == every - 1 else short
        at = rng.randrange(0, len(ids) - long)
        budget = int(round(math.exp(rng.uniform(math.log(new[0]), math.log(new[1])))))  # drawn even when fixed
        out.append({"id": f"r{i:03d}", "prompt": tok.decode(ids[at:at + length]), "max_new_tokens": budget})
    return out


def run(work: Path, name: str, lines: list[dict], env: dict, hosts: Path, chunk: int = 0) -> dict:
    from edgeshard_mpi.results import read_attrs
    from edgeshard_mpi.trace import load_trace

    d = work / name.replace(" ", "").replace(",", "-")
    d.mkdir()
    (d / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    (d / "job.toml").write_text('model = "smollm2-135m"\ndtype = "float32"\nprompts = "prompts.jsonl"\n'
                                'output = "out.h5"\nmicro_batch_size = 4\n[generation]\n'
                                f'max_new_tokens = {max(r["max_new_tokens"] for r in lines)}\n'
                                '[plan]\nobjective = "throughput"\n')
    cmd = ["mpiexec", "-f", str(hosts), "-n", "4", sys.executable, "-m", "edgeshard_mpi", "run", str(d / "job.toml"),
           "--hostfile", str(hosts), "--admission", "row", "--overwrite", "--no-progress", "--trace", str(d / "trace.json"),
           "--prefill-chunk", str(chunk),
           # a fresh micro-batch of 800-token prompts is one long step on a slowed device: not a lost rank
           "--step-timeout", "300"]
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True, env=env, cwd=d)
    s = json.loads(read_attrs(d / "out.h5")["summary"])
    tracks, _ = load_trace(d / "trace.json")
    busiest = max(tracks, key=lambda t: sum(dur for name, _, dur, *_ in t["events"] if name in ("prefill", "decode")))
    steps = sorted((t0, dur, name) for name, t0, dur, *_ in busiest["events"] if name in ("prefill", "decode"))
    joins = [t0 + dur for t0, dur, name in steps if name == "prefill"]
    lo, hi = steps[0][0] + steps[0][1], joins[-1]  # after its first step, up to its last join
    busy = sum(max(0.0, min(t0 + dur, hi) - max(t0, lo)) for t0, dur, _ in steps)
    return {"tokens": s["tokens"], "seconds": s["seconds"], "tokens_per_s": s["tokens"] / s["seconds"],
            "busiest": busiest["label"], "window_s": hi - lo, "idle_s": (hi - lo) - busy,
            "idle_share": 1 - busy / (hi - lo), "rows_per_step": s["rows_per_step"], "ttft_ms": s["ttft_ms"],
            "chunked": s.get("chunked", 0)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=96, help="more than the 32 rows in flight, so prompts join")
    ap.add_argument("--long", type=int, default=800, help="at 1500, hetero4 cannot hold 8 micro-batches of it")
    ap.add_argument("--every", type=int, default=12)
    ap.add_argument("--new", default="32", help="new tokens per request: N, or LO,HI (log-uniform per request)")
    ap.add_argument("--chunks", default="64,128,256", help="prefill chunks to run the mixed job with, tokens")
    ap.add_argument("--clock", choices=("cpu", "work"), default="cpu")
    ap.add_argument("--json")
    args = ap.parse_args()
    os.environ["EDGESHARD_MODELS"] = str(Path(os.environ.get("EDGESHARD_MODELS", ROOT / "models")).resolve())
    from transformers import AutoTokenizer

    from edgeshard_mpi.models import prepare

    tok = AutoTokenizer.from_pretrained(prepare("smollm2-135m"))
    work = Path(tempfile.mkdtemp(prefix="edgeshard-stalls-"))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MPIR_CVAR_ENABLE_HEAVY_YIELD": "1",
           "EDGESHARD_PROFILES": str(work / "profiles")}  # measured now, shared by both jobs
    jobs = [("mixed", True, 0)] + [(f"mixed, chunks of {c}", True, int(c)) for c in args.chunks.split(",") if c]
    jobs.append(("short", False, 0))
    lo, _, hi = args.new.partition(",")
    new = (int(lo), int(hi or lo))
    hosts = Path(with_work_clock(HOSTS, work / HOSTS.name)) if args.clock == "work" else HOSTS
    rows = {name: run(work, name, prompts(tok, args.prompts, args.long, args.every, with_long, new), env, hosts, chunk)
            for name, with_long, chunk in jobs}
    n_long = sum(1 for i in range(args.prompts) if i % args.every == args.every - 1)
    print(f"\nhetero4 (clock={args.clock}), row admission, micro-batch 4, {args.new} new tokens a request; {args.prompts} prompts of 10-40 tokens, "
          f"{n_long} of them {args.long} tokens in `mixed`")
    print(f"{'job':<22} {'tokens/s':>9} {'vs mixed':>9} {'seconds':>8} {'busiest':>10} {'window s':>9} {'idle s':>7} "
          f"{'idle':>6} {'ttft ms':>8}")
    for name, r in rows.items():
        print(f"{name:<22} {r['tokens_per_s']:>9.2f} {r['tokens_per_s'] / rows['mixed']['tokens_per_s']:>8.3f}x "
              f"{r['seconds']:>8.1f} {r['busiest']:>10} {r['window_s']:>9.1f} {r['idle_s']:>7.1f} {r['idle_share']:>6.1%} "
              f"{r['ttft_ms']:>8.0f}")
    m, s = rows["mixed"], rows["short"]
    extra = max(0.0, m["idle_s"] - s["idle_share"] * m["window_s"])
    print(f"\nidle the long prefills add at the busiest stage: {extra:.1f} s of {m['seconds']:.1f} s; chunking them "
          f"could raise the mixed job's tokens/s by at most {m['seconds'] / (m['seconds'] - extra):.3f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
