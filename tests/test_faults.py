"""Faults under mpiexec: a rank killed mid-run, rank 0 killed, an unwritable or failing output.

A rank hung mid-run (SIGSTOP), named by rank 0's step timeout and resumed without, is in
test_elastic.py, where `edgeshard launch` does the resuming.

Each test keeps the tree of processes under its mpiexec (the ranks and their proxies), so that it
can check that none is left and, whatever happened, kill any that is.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, reference_tokens, run_mpi, write_job
from edgeshard_mpi.results import read_attrs, read_results

WORDS = ["The quick brown fox", "Paris is", "Once upon a time", "Water boils at", "def fibonacci(n):",
         "My favourite colour is", "In a distant galaxy", "The three laws of"]
PROMPTS = [f"{WORDS[i % len(WORDS)]} {i}" for i in range(24)]
MAX_NEW = 8
# slowed-down devices make a run last long enough (several seconds) to be hit in the middle
SLOW3 = "".join(f"# device: name={n} slowdown=20\nlocalhost:1\n" for n in ("alpha", "beta", "gamma"))


@pytest.fixture(scope="module")
def reference(tiny_path):
    return dict(zip((f"p{i}" for i in range(len(PROMPTS))), reference_tokens(tiny_path, PROMPTS, MAX_NEW, 1)))


def _job(tmp_path: Path, hosts: str | None = SLOW3) -> Path:
    if hosts:
        (tmp_path / "job.hosts").write_text(hosts)
    return write_job(tmp_path, "tiny-random", [{"id": f"p{i}", "prompt": p} for i, p in enumerate(PROMPTS)],
                     extra="micro_batch_size = 1", generation=f"max_new_tokens = {MAX_NEW}")


def _tokens(path: Path) -> dict[str, list[int]]:
    records = read_results(path)
    ids = [r.id for r in records]
    assert len(ids) == len(set(ids)), "duplicate records"
    return {r.id: r.token_ids for r in records}


class Job:
    """`mpiexec -n N edgeshard run JOB` in a session of its own, output to files."""

    def __init__(self, job: Path, n: int, *args: str, hosts: Path | None = None):
        self.job, self.dir = job, job.parent
        hosts = hosts or job.parent / "job.hosts"
        cmd = ["mpiexec", "-f", str(hosts), "-n", str(n), sys.executable, "-m", "edgeshard_mpi", "run", str(job),
               "--hostfile", str(hosts), "--no-progress", *args]
        self.out, self.err = open(self.dir / "mpiexec.out", "w+"), open(self.dir / "mpiexec.err", "w+")
        self.proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONPATH": str(ROOT)}, start_new_session=True,
                                     stdout=self.out, stderr=self.err)
        self.seen: set[tuple[int, int]] = set()  # every process of the job seen so far, for the cleanup

    def tree(self) -> set[tuple[int, int]]:
        """mpiexec and every process under it (its proxies start sessions of their own), as (pid, start time)."""
        procs = {}
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()  # state, ppid, ..., start time is field 22 of stat
            if fields[0] != "Z":
                procs[int(pid)] = (int(fields[1]), int(fields[19]))
        found, todo = set(), [self.proc.pid]
        while todo:
            pid = todo.pop()
            if pid in procs:
                found.add((pid, procs[pid][1]))
                todo += [c for c, (ppid, _) in procs.items() if ppid == pid]
        return found

    @staticmethod
    def alive(procs: set[tuple[int, int]]) -> list[int]:
        """Those still running (a pid reused since has another start time)."""
        left = []
        for pid, start in procs:
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()
            if fields[0] != "Z" and int(fields[19]) == start:
                left.append(pid)
        return left

    def by_path(self) -> list[int]:
        """Processes whose command line names this job's file (unique per test: it is under tmp_path)."""
        return [int(p) for p in filter(str.isdigit, os.listdir("/proc")) if _cmdline_has(p, str(self.job))]

    def ranks(self) -> dict[int, int]:
        """rank -> pid, from the PMI_RANK that mpiexec gives each rank."""
        out = {}
        for pid in self.by_path():
            try:
                env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            for e in env:
                if e.startswith(b"PMI_RANK="):
                    out[int(e[len(b"PMI_RANK="):])] = pid
        return out

    def wait_for_records(self, k: int, timeout: float = 120) -> int:
        journal = self.dir / "job.h5.journal"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            done = journal.read_text().count('"record"') if journal.exists() else 0
            self.seen |= self.tree()
            if done >= k and len(self.ranks()) == int(self.proc.args[self.proc.args.index("-n") + 1]):
                return done
            assert self.proc.poll() is None, self.output()
            time.sleep(0.05)
        pytest.fail("the run wrote no records in time")

    def ended_within(self, seconds: float) -> float:
        t0 = time.monotonic()
        try:
            self.proc.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the job did not end within {seconds} s\n{self.output()}")
        return time.monotonic() - t0

    def output(self) -> str:
        self.out.flush(), self.err.flush()
        return (self.dir / "mpiexec.out").read_text() + (self.dir / "mpiexec.err").read_text()

    def stderr(self) -> str:
        return (self.dir / "mpiexec.err").read_text()

    def no_process_left(self, procs: set[tuple[int, int]], grace: float = 10) -> None:
        deadline = time.monotonic() + grace  # the proxy may take a moment to follow mpiexec
        while (self.alive(procs) or self.by_path()) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not self.alive(procs), f"processes of the job left behind: {self.alive(procs)}"
        assert not self.by_path(), f"processes naming the job left behind: {self.by_path()}"

    def cleanup(self) -> None:
        for sig in (signal.SIGCONT, signal.SIGKILL):  # a stopped process dies only once continued or killed
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass
        for pid in self.alive(self.seen):  # the proxies start sessions of their own
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait()
        self.out.close(), self.err.close()


def _cmdline_has(pid: str, needle: str) -> bool:
    try:
        return needle.encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _check_partial(h5: Path, reference: dict, *, killed: bool) -> dict:
    """The results file of a run that ended early: readable, whole records, the right tokens, and
    every request the journal holds; a writer killed without warning may have journaled one more
    batch than the HDF5 file got (the journal goes first; --resume adds it)."""
    got = _tokens(h5)
    assert 0 < len(got) < len(PROMPTS), len(got)
    assert got == {k: reference[k] for k in got}
    journal = [json.loads(line)["record"]["id"] for line in (h5.parent / "job.h5.journal").read_text().splitlines()
               if line.startswith('{"record"')]
    assert list(got) == journal or (killed and list(got) == journal[:-1]), (list(got), journal)
    return got


def test_killed_rank_ends_the_job_and_resume_finishes(tmp_path, reference):
    job = _job(tmp_path)
    run = Job(job, 3)
    try:
        done = run.wait_for_records(3)
        victim, procs = run.ranks()[1], run.tree()
        os.kill(victim, signal.SIGKILL)
        took = run.ended_within(30)
        print(f"job ended {took:.2f} s after rank 1 was killed")
        assert run.proc.returncode != 0
        out = run.output()
        # mpiexec ends the job at once and names by pid and host the first process it saw end (the
        # killed one, or under load one it killed itself); rank 0 is killed with the rest, so the
        # rank table it printed at start maps that pid to rank and device
        named = re.search(r"PID (\d+) RUNNING AT", out)
        assert named, out
        table = next(line for line in run.stderr().splitlines() if line.startswith("edgeshard: ranks:"))
        assert f"1 beta (pid {victim} on " in table, table
        assert f"(pid {named.group(1)} on " in table, (named.group(1), table)
        run.no_process_left(procs)
    finally:
        run.cleanup()
    assert len(_check_partial(tmp_path / "job.h5", reference, killed=True)) >= done - 1
    ranks = json.loads(read_attrs(tmp_path / "job.h5")["ranks"])
    assert {"rank": 1, "device": "beta", "pid": victim} == {k: ranks[1][k] for k in ("rank", "device", "pid")}
    resumed = run_mpi(["run", str(job), "--no-progress", "--resume"], 3, hostfile=tmp_path / "job.hosts")
    assert resumed.returncode == 0, resumed.stderr
    assert _tokens(tmp_path / "job.h5") == reference
    assert not (tmp_path / "job.h5.journal").exists()


def test_rank_0_killed_leaves_no_process(tmp_path, reference):
    job = _job(tmp_path)
    run = Job(job, 3)
    try:
        run.wait_for_records(2)
        procs = run.tree()
        names = {Path(f"/proc/{pid}/comm").read_text().strip() for pid, _ in procs}
        assert len(procs) >= 5 and len(run.ranks()) == 3, (procs, names)  # mpiexec, its proxy, three ranks
        assert any("proxy" in n for n in names), names
        os.kill(run.ranks()[0], signal.SIGKILL)
        run.ended_within(30)
        assert run.proc.returncode != 0
        run.no_process_left(procs)
    finally:
        run.cleanup()
    _check_partial(tmp_path / "job.h5", reference, killed=True)


def _make_unwritable(folder: Path) -> str:
    """chmod where permissions bind; as root, the immutable attribute; else skip."""
    folder.chmod(0o555)
    if not os.access(folder, os.W_OK) and not _can_write(folder):
        return "chmod"
    if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0 and not _can_write(folder):
        return "chattr"
    folder.chmod(0o755)
    pytest.skip("cannot make a folder unwritable here")


def _can_write(folder: Path) -> bool:
    try:
        (folder / ".probe").write_text("x")
    except OSError:
        return False
    (folder / ".probe").unlink()
    return True


def test_unwritable_output_folder_fails_before_compute(tmp_path, tiny_path):
    out = tmp_path / "out"
    out.mkdir()
    job = write_job(tmp_path, "tiny-random", [{"id": "a", "prompt": "Hello"}], extra='output = "out/job.h5"')
    job.write_text(job.read_text().replace('output = "job.h5"\n', ""))
    how = _make_unwritable(out)
    try:
        proc = run_mpi(["run", str(job), "--no-progress"], 2, timeout=90)
    finally:
        if how == "chattr":
            subprocess.run(["chattr", "-i", str(out)], check=True)
        out.chmod(0o755)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("edgeshard: error")]
    assert errors and str(out / "job.h5") in errors[0] and "cannot write results" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
    # found while reading the job on rank 0: no rank table, no plan, no shard, no tokens
    assert "edgeshard: ranks:" not in proc.stderr and "tokens/s" not in proc.stdout
    assert list(out.iterdir()) == []


def test_failed_write_mid_run_keeps_what_was_written(tmp_path, reference):
    job = _job(tmp_path, hosts=None)
    h5 = tmp_path / "job.h5"
    proc = run_mpi(["run", str(job), "--no-progress"], 2, env={"EDGESHARD_FAULT": "write:3"})
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("edgeshard: error")]
    assert errors and errors[0].startswith(f"edgeshard: error on rank 0 of 2: {h5}: writing results failed"), proc.stderr
    assert "ENOSPC" in errors[0] and "--resume" in errors[0]
    # the third batch reached the journal, not the HDF5 file: two whole records there, readable
    assert len(_tokens(h5)) == 2 and _tokens(h5) == {k: reference[k] for k in _tokens(h5)}
    assert (tmp_path / "job.h5.journal").read_text().count('"record"') == 3
    resumed = run_mpi(["run", str(job), "--no-progress", "--resume"], 2)
    assert resumed.returncode == 0, resumed.stderr
    assert _tokens(h5) == reference
