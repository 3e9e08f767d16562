"""Pipeline schedules, continuous admission, resume after a kill, streaming, bench."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import tracemalloc

import pytest

from conftest import ROOT, Launches, reference_tokens, run_mpi, write_job
from edgeshard_mpi.jobs import read_prompts
from edgeshard_mpi.results import read_results

PROMPTS = [
    "The quick brown fox", "In a distant galaxy, a lone explorer discovered", "def fibonacci(n):", "Paris is",
    "Once upon a time", "The three laws of thermodynamics state that energy cannot be created or destroyed, and",
    "My favourite colour is", "Water boils at",
]
MAX_NEW = [12, 5, 9, 3, 12, 7, 1, 10]  # rows finish at different steps and leave their micro-batch


@pytest.fixture(scope="module")
def reference(tiny_path):
    return {p: reference_tokens(tiny_path, [p], n, 1)[0] for p, n in zip(PROMPTS, MAX_NEW)}


def _job(tmp_path, **extra):
    lines = [{"id": f"p{i}", "prompt": p, "max_new_tokens": n} for i, (p, n) in enumerate(zip(PROMPTS, MAX_NEW))]
    return write_job(tmp_path, "tiny-random", lines, extra="\n".join(f"{k} = {v}" for k, v in extra.items()))


def _tokens(path) -> dict[str, list[int]]:
    records = read_results(path)
    ids = [r.id for r in records]
    assert len(ids) == len(set(ids)), "duplicate records"
    return {r.id: r.token_ids for r in records}


CASES = [(3, "no-bubbles", 2, 3), (3, "bubbles", 2, 3), (2, "sequential", 3, None), (4, "no-bubbles", 1, 6),
         (1, "no-bubbles", 2, 2)]


@pytest.fixture(scope="module")
def schedule_runs(tmp_path_factory, tiny_path):
    """case -> the Launch that ran it: the cases of one rank count share a launch."""
    root, jobs = tmp_path_factory.mktemp("schedules"), {}
    for i, (n, schedule, mbs, in_flight) in enumerate(CASES):
        extra = {"schedule": f'"{schedule}"', "micro_batch_size": mbs}
        if in_flight:
            extra["micro_batches"] = in_flight
        (root / str(i)).mkdir()
        jobs[CASES[i]] = _job(root / str(i), **extra)
    return Launches(jobs, lambda case: (case[0], ()), timeout=300)


@pytest.mark.parametrize("n,schedule,mbs,in_flight", CASES, ids=[f"{c[0]}r-{c[1]}-mbs{c[2]}-k{c[3]}" for c in CASES])
def test_every_schedule_gives_generates_tokens(schedule_runs, reference, n, schedule, mbs, in_flight):
    case = (n, schedule, mbs, in_flight)
    launch = schedule_runs(case)
    launch.summary(case)
    got = _tokens(launch.h5(case))
    assert got == {f"p{i}": reference[p] for i, p in enumerate(PROMPTS)}
    assert not launch.h5(case).with_suffix(".h5.journal").exists()  # a run that ends normally drops its journal


def test_resume_after_sigkill_finishes_with_the_same_tokens(tmp_path, reference):
    # slowed-down devices make the run last long enough to be killed in the middle
    hosts = tmp_path / "slow.hosts"
    hosts.write_text("# device: name=a slowdown=40\nlocalhost:1\n# device: name=b slowdown=40\nlocalhost:1\n")
    job = _job(tmp_path, micro_batch_size=1, micro_batches=2)
    cmd = ["mpiexec", "-n", "2", sys.executable, "-m", "edgeshard_mpi", "run", str(job), "--hostfile", str(hosts),
           "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    journal = tmp_path / "job.h5.journal"
    deadline = time.time() + 120
    try:
        while time.time() < deadline:
            done = journal.read_text().count('"record"') if journal.exists() else 0
            if done >= 3:
                break
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        else:
            pytest.fail("the run wrote no records in time")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # mpiexec and every rank, without warning
        proc.wait()
    # hydra's proxy runs in a session of its own: it ends the ranks once it sees mpiexec gone, which
    # takes moments, longer on a busy host (test_faults.py waits as long)
    deadline = time.monotonic() + 10
    while (left := subprocess.run(["pgrep", "-f", str(job)], capture_output=True, text=True).stdout.split()) \
            and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left, f"processes left behind: {left}"
    assert done < len(PROMPTS)
    again = run_mpi(["run", str(job), "--no-progress"], 2)
    assert again.returncode != 0 and "--resume" in again.stderr and "--overwrite" in again.stderr
    resumed = run_mpi(["run", str(job), "--no-progress", "--resume"], 2)
    assert resumed.returncode == 0, resumed.stderr
    got = _tokens(tmp_path / "job.h5")
    assert got == {f"p{i}": reference[p] for i, p in enumerate(PROMPTS)}


def test_resume_and_overwrite_together_is_an_error(tmp_path, tiny_path):
    proc = run_mpi(["run", str(_job(tmp_path)), "--resume", "--overwrite"], 1, timeout=60)
    assert proc.returncode != 0 and "not both" in proc.stderr


def test_prompt_files_are_streamed(tmp_path):
    path = tmp_path / "big.jsonl"
    with open(path, "w") as f:
        for i in range(25_000):
            f.write(json.dumps({"id": f"r{i}", "prompt": f"prompt number {i} " + "x" * 4000}) + "\n")
    size = path.stat().st_size
    tracemalloc.start()
    n = sum(1 for _ in read_prompts(path))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert n == 25_000
    # the file is ~100 MB; reading it holds one line at a time, plus the ids seen (to refuse duplicates):
    # about a thirtieth of the file here (an eighth with 100,000 shorter lines, where the ids weigh more)
    assert peak < size / 8, (peak, size)


def test_bench_runs_each_configuration(tmp_path, reference):
    out = tmp_path / "bench.json"
    proc = run_mpi(["bench", str(_job(tmp_path, micro_batch_size=2)), "--configs",
                    "even:no-bubbles,even:bubbles,even:sequential", "--json", str(out)], 2, timeout=180)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())
    assert [(r["objective"], r["schedule"]) for r in rows] == [("even", s) for s in ("no-bubbles", "bubbles", "sequential")]
    assert all(r["tokens"] == sum(len(t) for t in reference.values()) and r["tokens_per_s"] > 0 for r in rows)
    assert "tokens/s" in proc.stdout
