"""Shared fixtures: prepared models (once, under the repo's models/), an mpiexec runner, a reference."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("EDGESHARD_MODELS", str(ROOT / "models"))  # prepare each preset once, reuse it
os.environ.setdefault("EDGESHARD_PROFILES", tempfile.mkdtemp(prefix="edgeshard-profiles-"))  # not in the repo


@pytest.fixture(scope="session")
def tiny_path() -> Path:
    from edgeshard_mpi.models import prepare

    return prepare("tiny-random")


@pytest.fixture(scope="session")
def smollm_path() -> Path:
    from edgeshard_mpi.models import prepare

    return prepare("smollm2-135m")


def run_mpi(args: list[str], n: int, *, timeout: float = 180, env: dict | None = None,
            hostfile: str | None = None, cwd: str | Path | None = None) -> subprocess.CompletedProcess:
    """`mpiexec -n N python -m edgeshard_mpi ARGS` in a subprocess; a hang fails the test, never blocks CI."""
    cmd = ["mpiexec"] + (["-f", str(hostfile)] if hostfile else []) + ["-n", str(n), sys.executable, "-m",
                                                                         "edgeshard_mpi", *args]
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=cwd)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"mpiexec did not finish in {timeout} s: {' '.join(cmd)}\n{e.stderr}")


class Launch:
    """Several jobs run by one `mpiexec ... run JOB JOB ...`: the ranks start once (their imports take
    seconds a rank) rather than once a job. Each job reports under its own path, so a test reads only
    its own job's summary line, error and results file."""

    def __init__(self, jobs: dict, n: int, args: list[str] = (), **run_kwargs):
        self.jobs = {k: Path(j) for k, j in jobs.items()}
        self.proc = run_mpi(["run", *map(str, self.jobs.values()), "--no-progress", *args], n, **run_kwargs)

    def _line(self, key, text: str, tag: str) -> str | None:
        if len(self.jobs) > 1:
            head = f"edgeshard run {self.jobs[key]}: {tag}"
        else:  # one job: its lines say no job
            head = "edgeshard: error: " if tag else "edgeshard run: "
        return next((line for line in text.splitlines() if line.startswith(head)), None)

    def summary(self, key) -> str:
        """The job's summary line; fails the test, with the launch's stderr, if the job did not run."""
        line = self._line(key, self.proc.stdout, "")
        assert line is not None and self._line(key, self.proc.stderr, "error") is None, self.proc.stderr
        return line

    def error(self, key) -> str:
        """The job's error line: it could not start, and the launch went on to the next job."""
        line = self._line(key, self.proc.stderr, "error: ")
        assert line is not None, f"{self.jobs[key]} started\n{self.proc.stdout}\n{self.proc.stderr}"
        assert self.proc.returncode == 1, self.proc.stderr
        return line

    def h5(self, key) -> Path:
        """The job's results file (write_job names it after the job file)."""
        return self.jobs[key].with_suffix(".h5")

    def results(self, key) -> list:
        """The job's records in prompt order (ids p0, p1, ...), after checking that it ran."""
        from edgeshard_mpi.results import read_results

        self.summary(key)
        by_id = {r.id: r for r in read_results(self.h5(key))}
        return [by_id[f"p{i}"] for i in range(len(by_id))]


class Launches:
    """A module's jobs by key, each with the rank count and run options it needs: the jobs alike share
    one Launch, started when a test first asks for one of them."""

    def __init__(self, jobs: dict, needs, **run_kwargs):
        self.jobs, self.needs, self.run_kwargs, self.launched = jobs, needs, run_kwargs, {}

    def __call__(self, key) -> Launch:
        """The Launch that ran job `key` (key -> needs(key) = (ranks, options))."""
        n, args = need = self.needs(key)
        if need not in self.launched:
            alike = {k: j for k, j in self.jobs.items() if self.needs(k) == need}
            self.launched[need] = Launch(alike, n, list(args), **self.run_kwargs)
        return self.launched[need]


def write_job(dir: Path, model: str | Path, prompts: list, *, name: str = "job", extra: str = "",
              generation: str = "max_new_tokens = 12", plan: str = "", suffix: str = ".jsonl") -> Path:
    """A job file plus its prompt file in `dir`; prompts are dicts (JSONL) or raw lines (str)."""
    pfile = dir / f"{name}-prompts{suffix}"
    pfile.write_text("".join((p if isinstance(p, str) else json.dumps(p)) + "\n" for p in prompts))
    job = dir / f"{name}.toml"
    job.write_text(f'model = "{model}"\nprompts = "{pfile.name}"\noutput = "{name}.h5"\n{extra}\n'
                   f"[generation]\n{generation}\n{plan}\n")
    return job


def reference_tokens(model_path: Path, prompts: list[str], max_new_tokens: int, batch: int,
                     device: str = "cpu", dtype: str = "float32", **generate_kwargs) -> list[list[int]]:
    """transformers `generate`, greedy fp32, over micro-batches of `batch` left-padded prompts; each row cut after EOS
    (and after the ids of an `eos_token_id` list in `generate_kwargs`, which generate stops at too)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype)).to(device)
    eos = model.generation_config.eos_token_id
    eos = {e for e in (eos if isinstance(eos, list) else [eos]) if e is not None} | set(generate_kwargs.get("eos_token_id", []))
    if "eos_token_id" in generate_kwargs:  # stop ids as well as the model's EOS, as a run has them
        generate_kwargs = {**generate_kwargs, "eos_token_id": sorted(eos)}
    out = []
    for b in range(0, len(prompts), batch):
        enc = tok(prompts[b:b + batch], return_tensors="pt", padding=True).to(device)
        gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, **generate_kwargs)
        for row in gen[:, enc["input_ids"].shape[1]:].tolist():
            cut = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
            out.append(row[:cut])
    return out
