"""Decode speed of `edgeshard run` against transformers `generate`, side by side in one run.

    python benchmarks/decode_vs_generate.py [--model smollm2-135m] [--tokens 64] [--ranks 1 2 3]

For each rank count, runs the same prompts (greedy, fp32, micro-batch 1, sequential schedule) under
`mpiexec -n R`, and in this process times `generate` on the same prompts with the same new-token
count. Reports decode ms/token (mean over requests of the time per token after the first), the ratio
to `generate`, the per-step overhead beyond the stages' compute, and each rank's peak RSS against its
shard's bytes + 500 MB. Then the same cuts run back to back in one process, to separate the cost
of splitting from that of processes taking turns on one host's cores. The `generate` timing is taken between the mpiexec runs, so both see the
same machine state.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a steam engine works, step by step.",
    "List ten facts about the planet Jupiter.",
    "Describe a day in the life of a medieval blacksmith.",
]


def _generate_ms_per_token(model_path: Path, tokens: int, repeats: int) -> float:
    """Mean decode ms/token of generate: (time for N tokens - time for 1 token) / (N - 1), per prompt."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    per_prompt = []
    for p in PROMPTS:
        enc = tok(p, return_tensors="pt")

        def timed(n):
            best = float("inf")
            for _ in range(repeats):
                t0 = time.perf_counter()
                model.generate(**enc, max_new_tokens=n, min_new_tokens=n, do_sample=False)
                best = min(best, time.perf_counter() - t0)
            return best

        timed(2)  # warm-up
        per_prompt.append((timed(tokens) - timed(1)) * 1e3 / (tokens - 1))
    return statistics.mean(per_prompt)


def _in_process_split_ms(model: str, tokens: int, parts: int) -> float:
    """Greedy decode ms/step with the model cut into `parts` Shards run back to back in this process."""
    import torch

    from edgeshard_mpi.models import ModelSpec, prepare
    from edgeshard_mpi.planner import even_plan
    from edgeshard_mpi.shard import Shard
    from transformers import AutoTokenizer

    spec = ModelSpec.load(prepare(model))
    tok = AutoTokenizer.from_pretrained(spec.path)
    shards = [Shard(spec, s.first, s.last) for s in even_plan(spec.num_units, parts).stages]
    per_prompt = []
    for p in PROMPTS:
        x, times = torch.tensor([tok(p)["input_ids"]]), []
        for step in range(tokens):
            t0 = time.perf_counter()
            for s in shards:
                x = s.forward(0, x, [0] if step == 0 else None)
            x = x.argmax(-1)[:, None]
            times.append(time.perf_counter() - t0)
        per_prompt.append(statistics.mean(times[1:]) * 1e3)
    return statistics.mean(per_prompt)


def _run_ours(ranks: int, model: str, tokens: int, workdir: Path) -> dict:
    prompts = workdir / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": p}) + "\n" for i, p in enumerate(PROMPTS)))
    job = workdir / f"bench{ranks}.toml"
    # sequential: one request at a time, so ms/token is a single stream's latency, as generate's is
    job.write_text(f'model = "{model}"\nprompts = "prompts.jsonl"\noutput = "bench{ranks}.h5"\n'
                   f'schedule = "sequential"\n[generation]\nmax_new_tokens = {tokens}\n')
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = ["mpiexec", "-n", str(ranks), sys.executable, "-m", "edgeshard_mpi", "run", str(job), "--overwrite",
           "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr}")
    sys.path.insert(0, str(ROOT))
    from edgeshard_mpi.results import read_attrs, read_results

    records = read_results(workdir / f"bench{ranks}.h5")
    summary = json.loads(read_attrs(workdir / f"bench{ranks}.h5")["summary"])
    return {"records": records, "summary": summary}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    os.environ.setdefault("EDGESHARD_MODELS", str(ROOT / "models"))
    sys.path.insert(0, str(ROOT))
    from edgeshard_mpi.models import prepare

    model_path = prepare(args.model)
    import torch

    print(f"# {platform.node()} {platform.machine()} {os.cpu_count()} cores, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), model {args.model} fp32, {args.tokens} new tokens, "
          f"{len(PROMPTS)} prompts, micro-batch 1, sequential")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for ranks in args.ranks:
            ours = _run_ours(ranks, args.model, args.tokens, Path(tmp))
            ref = _generate_ms_per_token(model_path, args.tokens, args.repeats)
            recs = ours["records"]
            ms = statistics.mean(r.ms_per_token for r in recs if r.output_tokens > 1)
            s = ours["summary"]
            stages = s["stages"]
            steps = stages[0]["steps"]
            step_ms = s["seconds"] * 1e3 / steps
            compute_ms = sum(st["compute_s"] * 1e3 / st["steps"] for st in stages)
            rss = [(st["rank"], st["peak_rss"], st["bytes"]) for st in s["ranks"]]
            rows.append((ranks, ms, ref, step_ms, compute_ms, rss, sum(r.output_tokens for r in recs)))
    print(f"{'ranks':>5} {'ours ms/tok':>11} {'generate':>9} {'ratio':>6} {'step ms':>8} {'compute ms':>10} "
          f"{'overhead ms':>11}  peak RSS per rank (MiB) vs shard + 500 MB")
    for ranks, ms, ref, step_ms, compute_ms, rss, ntok in rows:
        rss_text = ", ".join(f"r{r}: {p / 2**20:.0f} <= {(b + 500e6) / 2**20:.0f} {'ok' if p <= b + 500e6 else 'OVER'}"
                             for r, p, b in rss)
        print(f"{ranks:>5} {ms:>11.2f} {ref:>9.2f} {ms / ref:>6.2f} {step_ms:>8.2f} {compute_ms:>10.2f} "
              f"{step_ms - compute_ms:>11.2f}  {rss_text}")
    # The same cuts in one process: what splitting costs without processes taking turns on the cores.
    split = {n: _in_process_split_ms(args.model, args.tokens, n) for n in args.ranks}
    print("in one process, decode ms/step with the model cut into N shards: "
          + ", ".join(f"N={n}: {ms:.2f}" for n, ms in split.items()))


if __name__ == "__main__":
    main()
