"""Several jobs: one `mpiexec` each, against one `mpiexec ... run A.toml B.toml ...` for all of them.

    python benchmarks/job_queue.py [--jobs 6] [--ranks 3] [--model smollm2-135m] [--repeats 2]

Each job is a small one (4 prompts, 8 new tokens, the even plan), the kind a sweep over prompt sets
or settings queues by the dozen, where a launch's fixed cost (every rank importing torch and
transformers, MPI start-up, reading the model's tokenizer) weighs most. Both ways run the same job
files into their own results files, side by side, best of `--repeats`; the tokens of both are
checked equal, and the ratio of wall times printed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgeshard_mpi.results import read_results  # noqa: E402

WORDS = ["The ocean", "A robot", "Mountains at dawn", "A city at night", "Fresh bread", "A violin", "The moon", "Rain"]


def write_jobs(work: Path, model: str, jobs: int) -> list[Path]:
    out = []
    for j in range(jobs):
        prompts = work / f"p{j}.jsonl"
        prompts.write_text("".join(json.dumps({"id": f"r{i}", "prompt": f"{WORDS[(i + j) % len(WORDS)]} is"}) + "\n"
                                   for i in range(4)))
        job = work / f"job{j}.toml"
        job.write_text(f'model = "{model}"\nprompts = "{prompts.name}"\noutput = "job{j}.h5"\n'
                       "micro_batch_size = 2\n[generation]\nmax_new_tokens = 8\n")
        out.append(job)
    return out


def launch(jobs: list[Path], ranks: int) -> float:
    cmd = ["mpiexec", "-n", str(ranks), sys.executable, "-m", "edgeshard_mpi", "run", *map(str, jobs),
           "--overwrite", "--no-progress"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    took = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr}")
    return took


def tokens(jobs: list[Path]) -> list[dict]:
    return [{r.id: r.token_ids for r in read_results(j.with_suffix(".h5"))} for j in jobs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=6)
    ap.add_argument("--ranks", type=int, default=3)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    os.environ.setdefault("EDGESHARD_MODELS", str(ROOT / "models"))
    work = Path(tempfile.mkdtemp(prefix="job-queue-"))
    jobs = write_jobs(work, args.model, args.jobs)
    launch(jobs[:1], args.ranks)  # the model prepared and the files cached before either is timed
    apart, together = float("inf"), float("inf")
    for _ in range(args.repeats):  # alternated, so that drift falls on both
        apart = min(apart, sum(launch([j], args.ranks) for j in jobs))
        first = tokens(jobs)
        together = min(together, launch(jobs, args.ranks))
        assert tokens(jobs) == first, "one launch gave other tokens than a launch a job"
    print(f"# {os.cpu_count()} cores; {args.jobs} jobs of {args.model} on {args.ranks} ranks, 4 prompts and "
          f"8 new tokens each; best of {args.repeats}")
    print(f"one launch a job: {apart:.1f} s ({apart / args.jobs:.1f} s a job)")
    print(f"one launch for all: {together:.1f} s ({together / args.jobs:.1f} s a job)")
    print(f"speed-up: {apart / together:.2f}x")


if __name__ == "__main__":
    main()
