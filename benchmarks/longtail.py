"""Row admission against batch admission and batched `generate`, on a long-tailed job, side by side.

    python benchmarks/longtail.py [--prompts 96] [--mbs 8] [--clusters one,hetero4] [--clock cpu|work]
                                  [--admissions batch,row] [--prefill-chunk N] [--json out.json]
    python benchmarks/longtail.py --replay WORK_DIR     # the last table again, from an earlier run's files

The workload: `--prompts` text-continuation prompts cut from this repository's own documents, their
lengths log-uniform from 10 to 500 tokens, each with its own `max_new_tokens` (the JSONL override)
log-uniform from 8 to 200; smollm2-135m, fp32, greedy, seed 0. A request may stop earlier at EOS.

In one run, one after the other:
- one rank (`mpiexec -n 1 ... run`): `--admission batch` (a micro-batch takes new prompts only when
  all its rows finished) and `--admission row` (a finished row's place takes the next prompt at once),
  at micro-batch `--mbs`;
- transformers' `generate` in this process, 2 threads, the same prompts in the same micro-batches,
  left-padded, each batch generating until its longest request's `max_new_tokens` (as a user of
  `generate` gets it), every row then cut to its own budget and EOS;
- `hostfiles/hetero4.hosts` (`edgeshard bench`, throughput plan, no-bubbles), both admissions, at
  micro-batch `--hetero-mbs`;
- with `--prefill-chunk N`, row admission again on each cluster, with prompts longer than N tokens
  prefilled by chunks of N (`run --prefill-chunk N`; 0: whole). Without it, row admission chunks by the
  default: 64 tokens on hetero4, none on one rank.
Each row prints tokens/s (the requests' own new tokens over the run's wall time), the rows a step
carried on average, the simulator's prediction on the run's profile, and, on hetero4, the plan's
ideal rate (tokens over the busiest stage's compute time). A last table replays each run in the
simulator with every stage's profiled costs scaled by one factor, its measured compute over its
predicted compute: how far the schedule's model is from the run once the profile's costs are right.

96 prompts by default: on hetero4, 8 micro-batches of 4 are in flight, so a job of 48 admits only
16 prompts after the first 32, and the drain at its end, where no prompt is left to join, is most
of the run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _bench import run_bench, with_work_clock  # noqa: E402

SOURCES = ["README.md", "DESIGN.md", "BENCHMARKS.md"]


def log_uniform(rng: random.Random, lo: int, hi: int) -> int:
    return int(round(math.exp(rng.uniform(math.log(lo), math.log(hi)))))


def workload(tok, n: int, seed: int = 0) -> list[dict]:
    """n prompts cut from the repository's documents, of 10-500 tokens, with 8-200 new tokens each."""
    text = "\n\n".join((ROOT / f).read_text() for f in SOURCES)
    ids = tok(text)["input_ids"]
    rng = random.Random(seed)
    out = []
    for i in range(n):
        length = log_uniform(rng, 10, 500)
        at = rng.randrange(0, len(ids) - length)
        out.append({"id": f"r{i:03d}", "prompt": tok.decode(ids[at:at + length]),
                    "max_new_tokens": log_uniform(rng, 8, 200)})
    return out


def write_job(workdir: Path, lines: list[dict], mbs: int, extra: str = "") -> Path:
    (workdir / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    job = workdir / "longtail.toml"
    job.write_text(f'model = "smollm2-135m"\ndtype = "float32"\nprompts = "prompts.jsonl"\noutput = "out.h5"\n'
                   f'micro_batch_size = {mbs}\n{extra}\n[generation]\nmax_new_tokens = 200\n'
                   f'[plan]\nobjective = "throughput"\n')
    return job


def _chunked(admission: str) -> tuple[str, list[str]]:
    """'row' or 'batch', or 'rowN' (row admission, chunks of N): the run's admission and its options."""
    chunk = admission[3:] if admission.startswith("row") else ""
    return admission[:len(admission) - len(chunk)], ["--prefill-chunk", chunk] if chunk else []


def run_one_rank(job: Path, admission: str, env: dict) -> dict:
    from edgeshard_mpi.results import read_attrs

    out = job.parent / f"one-{admission}.h5"
    admission, extra = _chunked(admission)
    cmd = ["mpiexec", "-n", "1", sys.executable, "-m", "edgeshard_mpi", "run", str(job), "--admission", admission,
           "--output", str(out), "--overwrite", "--no-progress", *extra]
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True, env=env, cwd=job.parent)
    s = json.loads(read_attrs(out)["summary"])
    return {"tokens": s["tokens"], "seconds": s["seconds"], "tokens_per_s": s["tokens"] / s["seconds"],
            "rows_per_step": s["rows_per_step"], "threads": s["stages"][0]["threads"],
            "predicted": (s.get("predicted") or {}).get("tokens_per_s")}


def run_generate(model_path: Path, lines: list[dict], mbs: int, threads: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    tok = AutoTokenizer.from_pretrained(model_path, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    pad = tok.pad_token_id if tok.pad_token_id is not None else min(eos)
    tokens, rows, steps = 0, 0, 0
    t0 = time.perf_counter()
    for b in range(0, len(lines), mbs):
        batch = lines[b:b + mbs]
        enc = tok([r["prompt"] for r in batch], return_tensors="pt", padding=True)
        n = max(r["max_new_tokens"] for r in batch)
        with torch.inference_mode():
            gen = model.generate(**enc, max_new_tokens=n, do_sample=False, pad_token_id=pad)
        new = gen[:, enc["input_ids"].shape[1]:].tolist()
        for r, row in zip(batch, new):
            row = row[:r["max_new_tokens"]]
            tokens += next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        steps += len(new[0])
        rows += len(batch) * len(new[0])  # generate runs every row until the batch's longest is done
    seconds = time.perf_counter() - t0
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds, "rows_per_step": rows / steps,
            "threads": torch.get_num_threads(), "predicted": None}


def run_hetero4(job: Path, admission: str, profiles: Path, hosts: str = "hostfiles/hetero4.hosts") -> dict:
    out = job.parent / f"hetero4-{admission}.json"
    admission, chunks = _chunked(admission)
    # a step of a batch's whole prefill (4 prompts of up to 500 tokens) through a third of the model,
    # on a device emulated 6-16x slower, takes 10-30 s on this host's CPU clock: not a lost rank
    (r,) = run_bench(hosts, str(job), ["throughput:no-bubbles"], out, profiles=profiles,
                     extra=["--admission", admission, *chunks, "--step-timeout", "120"])
    if "error" in r:
        return {"error": r["error"]}
    return {"tokens": r["tokens"], "seconds": r["seconds"], "tokens_per_s": r["tokens_per_s"],
            "rows_per_step": r.get("rows_per_step", float("nan")), "threads": 1,
            "predicted": (r.get("predicted") or {}).get("tokens_per_s"), "ideal": r["ideal_tokens_per_s"]}


def replay_on_measured_compute(work: Path) -> dict:
    """Each run of `work` replayed by the simulator with every stage's profiled costs scaled by one
    factor, its compute in the run over its compute in the prediction: what the simulator gets right
    when the profile's absolute costs are right. {run: {factors, replayed, measured}}."""
    import h5py

    from edgeshard_mpi.planner import Plan, Stage
    from edgeshard_mpi.profiler import Profile
    from edgeshard_mpi.results import read_attrs
    from edgeshard_mpi.simulate import Request, StepCosts, simulate

    source = work / "one" / "one-row.h5"
    if not source.is_file():
        return {}
    with h5py.File(source) as h:  # the requests in admission order: the same on any partition (greedy)
        r = h["requests"]
        line = [int(w.decode().rsplit(":", 1)[1]) for w in r["where"][:]]
        requests = [Request(int(p), int(o)) for _, p, o in sorted(zip(line, r["prompt_tokens"][:], r["output_tokens"][:]))]
    runs = {}
    for f in sorted((work / "one").glob("one-*.h5")):
        s = json.loads(read_attrs(f)["summary"])
        runs[f"1 rank, {_label(f.stem[4:])}"] = (s, None, s["tokens"] / s["seconds"])
    for f in sorted((work / "hetero4").glob("hetero4-*.json")):
        (b,) = json.loads(f.read_text())
        runs[f"hetero4, {_label(f.stem[8:])}"] = (b, b["plan"], b["tokens_per_s"])
    out = {}
    for name, (s, plan, measured) in runs.items():
        if not s.get("predicted"):
            continue
        mbs = 8 if plan is None else 4
        prof = Profile.load(next((work / "profiles").glob(f"*-b{mbs}-*.json")))
        plan = (Plan((Stage(0, 0, prof.num_units - 1),), prof.num_units) if plan is None else
                Plan(tuple(Stage(**st) for st in plan["stages"]), plan["num_units"]))
        p = s["predicted"]
        k = [st["compute_s"] / (busy * p["seconds"]) for st, busy in zip(s["stages"], p["busy"])]
        # every figure of each stage's device scaled (its decode, prefill, one-row and KV terms)
        costs = StepCosts.from_profile(prof.scaled({st.rank: f for st, f in zip(plan.stages, k)}), plan)
        sim = simulate(costs, requests, micro_batch_size=mbs, admission=p["admission"],
                       prefill_chunk=s.get("prefill_chunk"))
        out[name] = {"factors": k, "replayed": sim.tokens_per_s, "measured": measured}
    return out


def _label(admission: str) -> str:
    admission, chunks = _chunked(admission)
    if not chunks:
        return f"{admission} admission"
    return f"{admission} admission, " + ("whole prompts" if chunks[1] == "0" else f"chunks {chunks[1]}")


def print_replay(work: Path) -> None:
    rows = replay_on_measured_compute(work)
    if not rows:
        return
    print("\nThe simulator on each stage's measured compute (its profiled costs x one factor per stage):")
    print(f"{'run':<38} {'factors':>18} {'replayed':>9} {'measured':>9} {'meas/replay':>11}")
    for name, r in rows.items():
        print(f"{name:<38} {' '.join(f'{x:.2f}' for x in r['factors']):>18} {r['replayed']:>9.2f} "
              f"{r['measured']:>9.2f} {r['measured'] / r['replayed']:>11.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=96)
    ap.add_argument("--mbs", type=int, default=8, help="micro-batch size at one rank and for generate")
    ap.add_argument("--hetero-mbs", type=int, default=4, help="micro-batch size on hetero4 (its memory is small)")
    ap.add_argument("--clusters", default="one,hetero4")
    ap.add_argument("--clock", choices=("cpu", "work"), default="cpu",
                    help="hetero4's emulated devices: slowdown x CPU time, or the profile's time for their work")
    ap.add_argument("--admissions", default="batch,row", help="the admissions to run on each cluster")
    ap.add_argument("--prefill-chunk", type=int, help="also run row admission with prefill chunks of N tokens")
    ap.add_argument("--json")
    ap.add_argument("--replay", metavar="DIR", help="only replay the runs of an earlier run's work folder")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    if args.replay:
        print_replay(Path(args.replay))
        return
    os.environ["EDGESHARD_MODELS"] = str(Path(os.environ.get("EDGESHARD_MODELS", ROOT / "models")).resolve())
    sys.path.insert(0, str(ROOT))
    from transformers import AutoTokenizer

    from edgeshard_mpi.models import prepare

    model_path = prepare("smollm2-135m")
    lines = workload(AutoTokenizer.from_pretrained(model_path), args.prompts)
    work = Path(tempfile.mkdtemp(prefix="edgeshard-longtail-"))
    profiles = work / "profiles"  # measured now, on the host as it is, and shared by both admissions
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MPIR_CVAR_ENABLE_HEAVY_YIELD": "1",
           "EDGESHARD_PROFILES": str(profiles)}
    rows = {}
    runs = {"one": ("1 rank", args.mbs, lambda job, admission: run_one_rank(job, admission, env)),
            "hetero4": ("hetero4", args.hetero_mbs, lambda job, admission: run_hetero4(job, admission, profiles, hosts))}
    hosts = "hostfiles/hetero4.hosts"
    if args.clock == "work":
        hosts = with_work_clock(ROOT / hosts, work / "hetero4-work.hosts")
    for cluster in args.clusters.split(","):
        label, mbs, run = runs[cluster]
        (work / cluster).mkdir()
        job = write_job(work / cluster, lines, mbs)
        extra = [f"row{args.prefill_chunk}"] if args.prefill_chunk is not None else []
        for admission in args.admissions.split(",") + extra:
            rows[f"{label}, {_label(admission)}"] = run(job, admission)
        if cluster == "one":
            rows["generate, batched"] = run_generate(model_path, lines, args.mbs, threads=2)

    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.machine())
    print(f"\n{args.prompts} prompts (10-500 tokens), max_new_tokens 8-200 log-uniform, smollm2-135m fp32; "
          f"{os.cpu_count()} cores, {cpu}; hetero4 with clock={args.clock}")
    print(f"{'run':<38} {'threads':>7} {'tokens':>7} {'seconds':>8} {'tokens/s':>9} {'rows/step':>9} "
          f"{'predicted':>9} {'meas/pred':>9} {'ideal':>7} {'of ideal':>8}")
    for name, r in rows.items():
        if "error" in r:
            print(f"{name:<38} {r['error']}")
            continue
        p, ideal = r.get("predicted"), r.get("ideal")
        print(f"{name:<38} {r['threads']:>7} {r['tokens']:>7} {r['seconds']:>8.1f} {r['tokens_per_s']:>9.2f} "
              f"{r['rows_per_step']:>9.2f} {p or float('nan'):>9.2f} {r['tokens_per_s'] / p if p else float('nan'):>9.2f} "
              f"{ideal or float('nan'):>7.2f} {r['tokens_per_s'] / ideal if ideal else float('nan'):>8.0%}")

    def ratio(a, b):
        return rows[a]["tokens_per_s"] / rows[b]["tokens_per_s"] if a in rows and b in rows and "error" not in rows[a] \
            and "error" not in rows[b] else float("nan")

    print(f"\nrow / batch admission, 1 rank: {ratio('1 rank, row admission', '1 rank, batch admission'):.2f} "
          f"(target >= 1.5)")
    print(f"row admission / batched generate, 1 rank: {ratio('1 rank, row admission', 'generate, batched'):.2f} "
          f"(target >= 1.8)")
    print(f"row / batch admission, hetero4: {ratio('hetero4, row admission', 'hetero4, batch admission'):.2f} "
          f"(target >= 1.3)")
    if args.prefill_chunk is not None:
        other = _label(f"row{args.prefill_chunk}")
        for label in ("1 rank", "hetero4"):
            print(f"row admission, default chunks / {other}, {label}: "
                  f"{ratio(f'{label}, row admission', f'{label}, {other}'):.2f}")
    print_replay(work)
    print(f"\nthe runs' files: {work} (--replay {work} prints the last table again)")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
