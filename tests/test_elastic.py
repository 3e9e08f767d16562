"""`edgeshard launch` under mpiexec: devices lost mid-run (killed, stopped, rank 0 stopped), too few left,
and the launcher itself killed. Every finished job holds each request once, with `generate`'s tokens.

The devices are emulated slow (slowdown=20) so that a run lasts long enough to be hit in the middle,
and the plan is the even split, so that no run measures a profile.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, reference_tokens, write_job
from edgeshard_mpi.launcher import EXIT_TOO_FEW, HEARTBEAT_GRACE
from edgeshard_mpi.results import read_attrs, read_results

WORDS = ["The quick brown fox", "Paris is", "Once upon a time", "Water boils at", "def fibonacci(n):",
         "My favourite colour is", "In a distant galaxy", "The three laws of"]
PROMPTS = [f"{WORDS[i % len(WORDS)]} {i}" for i in range(32)]
MAX_NEW = 8
STEP_TIMEOUT = 3


@pytest.fixture(scope="module")
def reference(tiny_path):
    return dict(zip((f"p{i}" for i in range(len(PROMPTS))), reference_tokens(tiny_path, PROMPTS, MAX_NEW, 1)))


def _hosts(names, memory: str = "") -> str:
    return "".join(f"# device: name={n} slowdown=20{memory}\nlocalhost:1\n" for n in names)


class Launch:
    """`edgeshard launch` in a session of its own, its output to a file."""

    def __init__(self, tmp_path: Path, hosts: str, *args: str, model: str = "tiny-random", prompts=PROMPTS):
        (tmp_path / "job.hosts").write_text(hosts)
        self.job = write_job(tmp_path, model, [{"id": f"p{i}", "prompt": p} for i, p in enumerate(prompts)],
                             extra="micro_batch_size = 1", generation=f"max_new_tokens = {MAX_NEW}")
        self.dir, self.h5 = tmp_path, tmp_path / "job.h5"
        self.folder = tmp_path / "job.h5.launch"
        self.start(*args)

    def start(self, *args: str) -> None:
        cmd = [sys.executable, "-m", "edgeshard_mpi", "launch", str(self.job), "-f", str(self.dir / "job.hosts"),
               "--step-timeout", str(STEP_TIMEOUT), "--no-progress", *args]
        self.log = open(self.dir / "launch.log", "a+")
        self.proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONPATH": str(ROOT)}, start_new_session=True,
                                     stdout=self.log, stderr=subprocess.STDOUT)

    def ranks(self, n: int, records: int, timeout: float = 120) -> dict[int, int]:
        """rank -> pid of the run now going, once it has n ranks and the results hold `records` requests."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.output()
            try:
                table = json.loads((self.folder / "ranks.json").read_text())
                done = (self.dir / "job.h5.journal").read_text().count('"record"')
            except (OSError, ValueError):
                table, done = [], 0
            if len(table) == n and done >= records:
                return {row["rank"]: row["pid"] for row in table}
            time.sleep(0.05)
        pytest.fail(f"no run of {n} ranks with {records} records in time\n{self.output()}")

    def wait(self, timeout: float = 180) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the launcher did not end within {timeout} s\n{self.output()}")

    def output(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return (self.dir / "launch.log").read_text()

    def events(self) -> list[dict]:
        return [json.loads(line) for line in (self.folder / "log.jsonl").read_text().splitlines()]

    def runs(self) -> list[dict]:
        return json.loads(read_attrs(self.h5)["runs"])

    def left(self) -> list[int]:
        """Processes whose command line names this job (its path is unique to the test)."""
        mine = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                if str(self.job).encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                    mine.append(int(pid))
            except OSError:
                pass
        return mine

    def nothing_left(self, grace: float = 10) -> None:
        deadline = time.monotonic() + grace
        while self.left() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not self.left(), f"processes of the job left behind: {self.left()}"

    def cleanup(self) -> None:
        for pid in self.left():
            for sig in (signal.SIGCONT, signal.SIGKILL):  # a stopped process dies only once continued or killed
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.log.close()


def _tokens(h5: Path) -> dict[str, list[int]]:
    records = read_results(h5)
    ids = [r.id for r in records]
    assert len(ids) == len(set(ids)), "a request was written twice"
    return {r.id: r.token_ids for r in records}


def test_two_devices_lost_one_after_the_other_the_job_finishes_on_the_rest(tmp_path, reference):
    """A device is killed (SIGKILL): the launcher sees its process end first. Then another is stopped
    (SIGSTOP): rank 0's step timeout names it. Two restarts, each planned from the profile the first
    run measured, cut to the survivors; the job finishes on the two devices left."""
    names = ["alpha", "beta", "gamma", "delta"]
    run = Launch(tmp_path, _hosts(names, " clock=work"), "--max-restarts", "2", "--objective", "throughput")
    try:
        rank = _a_stage(run, 4, 3)
        killed = names[rank]
        pid = run.ranks(4, 3)[rank]
        killed_at = time.time()
        os.kill(pid, signal.SIGKILL)
        left = [n for n in names if n != killed]
        rank = _a_stage(run, 3, sum("record" in e for e in _journal(run)) + 3)
        stopped = left[rank]
        os.kill(run.ranks(3, 0)[rank], signal.SIGSTOP)
        assert run.wait() == 0, run.output()
        run.nothing_left()  # the stopped rank went with its run's abort
    finally:
        run.cleanup()
    assert _tokens(run.h5) == reference
    runs = run.runs()
    rest = [n for n in left if n != stopped]
    assert [(r["epoch"], r.get("lost"), r["devices"]) for r in runs] == [
        (0, None, names), (1, [killed], left), (2, [stopped], rest)]
    assert runs[1]["reason"] == "its process ended" and runs[2]["reason"] == "silent past the step timeout"
    # from the loss to a step back on the survivors (a new mpiexec, imports, the shards' load): recorded
    assert killed_at - 5 < runs[1]["lost_at"] <= killed_at + 1 and 0 < runs[1]["resumed_after_s"] < 120
    assert runs[2]["resumed_after_s"] > STEP_TIMEOUT  # a silent rank is found only after the timeout
    # measured once; each restart plans from that profile, cut to its devices
    out = run.output()
    # rank 0 named the stopped rank, and only it, before the abort took it down
    errors = [line for line in out.splitlines() if line.startswith("edgeshard: error")]
    assert errors == [f"edgeshard: error on rank 0 of 3: rank {rank} (device {stopped}) sent nothing for "
                      f"{STEP_TIMEOUT} s: lost (no answer to a check after {STEP_TIMEOUT / 2:g} s; --step-timeout "
                      f"{STEP_TIMEOUT}). The results finished so far are kept: run again with --resume (without the "
                      "lost device if it is gone)"], errors
    assert [r["cluster"]["devices"][0]["name"] for r in json.loads(read_attrs(run.h5)["resumed"])] == ["alpha"] * 2
    assert out.count("edgeshard: profile saved to") <= 1, out
    assert f"(devices {', '.join(left)} of 4)" in out and f"(devices {', '.join(rest)} of 4)" in out, out
    hosts = (run.folder / "hosts-2").read_text()
    assert all(f"name={n} " in hosts for n in rest) and f"name={killed} " not in hosts
    shown = subprocess.run([sys.executable, "-m", "edgeshard_mpi", "show", "--runs", str(run.h5)], capture_output=True,
                           text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert shown.returncode == 0 and len(shown.stdout.splitlines()) == 3, shown.stderr
    assert shown.stdout.splitlines()[2].startswith(f"epoch 2: lost {stopped}: silent past the step timeout; 2 devices")


def _journal(run: Launch) -> list[dict]:
    text = (run.dir / "job.h5.journal").read_text() if (run.dir / "job.h5.journal").exists() else ""
    return [json.loads(line) for line in text.splitlines() if line.endswith("}")]


def _a_stage(run: Launch, n: int, records: int) -> int:
    """A rank other than 0 that holds a stage in the run now going (from its journal's `runs`), once that
    run has n ranks and `records` records: a rank with no units would be missed by no one."""
    run.ranks(n, records)
    runs = [json.loads(e["attrs"]["runs"]) for e in _journal(run) if "runs" in e.get("attrs", {})][-1]
    return next(r for r, d in enumerate(runs[-1]["devices"]) if r and d in {s["device"] for s in runs[-1]["stages"]})


def test_a_stopped_rank_0_is_found_within_the_step_timeout_and_the_job_finishes(tmp_path, reference):
    run = Launch(tmp_path, _hosts(["alpha", "beta", "gamma"]))
    try:
        pid = run.ranks(3, 3)[0]
        stopped = time.time()
        os.kill(pid, signal.SIGSTOP)
        assert run.wait() == 0, run.output()
        run.nothing_left()
    finally:
        run.cleanup()
    ended = next(e for e in run.events() if e["event"] == "ended")
    assert ended["kind"] == "hung" and ended["lost"] == [], ended
    # its heartbeat is allowed the step timeout + HEARTBEAT_GRACE; the bound is the timeout + 5 s
    took = ended["detected"] - stopped
    print(f"rank 0 stopped: found hung after {took:.2f} s (step timeout {STEP_TIMEOUT} s)")
    assert took <= STEP_TIMEOUT + 5 and HEARTBEAT_GRACE < 5, took
    assert _tokens(run.h5) == reference
    runs = run.runs()
    assert [r["devices"] for r in runs] == [["alpha", "beta", "gamma"]] * 2  # rank 0's device runs again
    assert runs[1]["reason"] == "rank 0 silent past the step timeout"


def test_too_few_devices_left_end_the_job_with_a_clear_message_and_the_results_kept(tmp_path, reference):
    # two devices hold the 26 MB model in halves (13 MB each, and their KV caches); one cannot
    run = Launch(tmp_path, _hosts(["alpha", "beta"], " memory=16MB"))
    try:
        os.kill(run.ranks(2, 3)[1], signal.SIGKILL)
        assert run.wait() == EXIT_TOO_FEW, run.output()
        run.nothing_left()
    finally:
        run.cleanup()
    out = run.output()
    assert "edgeshard launch: the devices left (alpha) cannot run the job: " in out, out
    assert "device alpha (rank 0) has 15.26 MiB, but units 0..7 need" in out and f"kept in {run.h5}" in out
    got = _tokens(run.h5)
    assert 3 <= len(got) < len(PROMPTS) and got == {k: reference[k] for k in got}


def test_the_launcher_killed_leaves_nothing_running_and_a_later_launch_resumes(tmp_path, smollm_path):
    """On the embedded model: the launcher is killed mid-run; its mpiexec and every rank go with it, and
    `edgeshard launch` again finishes the job from the results file."""
    prompts = PROMPTS[:10]
    reference = dict(zip((f"p{i}" for i in range(len(prompts))), reference_tokens(smollm_path, prompts, MAX_NEW, 1)))
    run = Launch(tmp_path, "".join(f"# device: name={n} slowdown=4\nlocalhost:1\n" for n in ("alpha", "beta")),
                 model="smollm2-135m", prompts=prompts)
    try:
        run.ranks(2, 2)
        run.proc.kill()
        run.proc.wait()
        run.nothing_left()  # mpiexec got SIGTERM when its parent died, and took the ranks down
        # what a resume starts from: the journal's records (the kill may land between a batch's journal
        # line and its HDF5 write, so the file alone can hold one batch fewer)
        before = sum("record" in e for e in _journal(run))
        run.start()
        assert run.wait() == 0, run.output()
    finally:
        run.cleanup()
    assert 2 <= before < len(prompts)
    assert _tokens(run.h5) == reference
    assert "resuming" in run.output()
    assert [r["reason"] for r in run.runs()] == ["start", "launched again"]
