"""`edgeshard launch`: a job that finishes on the devices that survive, without a person.

The launcher is an ordinary process on the submit host, outside MPI. It runs
`mpiexec -f HOSTS -n N python -m edgeshard_mpi run JOB --launch-dir DIR ...` and watches it. When
the run ends because a device was lost, it finds which one, writes a hostfile of the survivors and
runs the job again on them with `--resume`: the committed requests stay, the requests in flight run
again, and the run plans from the saved profile cut to the survivors (profiler.find_profile), so
nothing is measured again. It does so up to `--max-restarts` times. Its exit status tells a batch
system what happened (EXIT_*).

How a lost device is found, surest first (`lost_ranks`):
  - rank 0's step timeout named the ranks that went silent (a stopped process, a hung host): lost.json;
  - rank 0 itself went silent: its heartbeat is older than the step timeout + HEARTBEAT_GRACE, and
    the launcher ends the job (rank 0's device stays: its host holds the prompts and the results);
  - a rank's process ended first: the launcher holds a pidfd of every rank on its own host and sees
    which ended before mpiexec tore the others down. mpiexec's own report names the first process
    it saw end, which under load is one it killed itself;
  - a rank on another host: the error line it printed, else mpiexec's report (pid and host);
  - else every host is probed, and those that do not answer are lost.

The launch folder (default: the results file + ".launch") is how the launcher and rank 0 of each
run talk; only rank 0 writes on its side, and it runs where the results file is:
  ranks.json   rank 0, as the ranks start: each rank's host and pid
  opened       rank 0, once the results file is open: later runs continue it (--resume)
  heartbeat    rank 0 touches it as steps come back and as it computes: its changes are progress
  lost.json    rank 0, when its step timeout names the silent ranks
  epoch.json   the launcher, before each run: why this run started (rank 0 keeps it in the results)
  hosts-N      the hostfile of epoch N, when devices were dropped
  log.jsonl    the launcher's account of every epoch
"""

from __future__ import annotations

import dataclasses
import decimal
import json
import math
import os
import re
import select
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

from .cluster import Device, boot_id, parse_hostfile

__all__ = ["Heartbeat", "LaunchFolder", "LaunchOptions", "Ended", "Loss", "launch", "lost_ranks", "hostfile_text",
           "declaration", "describe_runs", "EXIT_FAILED", "EXIT_GAVE_UP", "EXIT_TOO_FEW", "EXIT_RANK0_LOST",
           "HEARTBEAT_GRACE"]

# exit statuses of `edgeshard launch` (2 is argparse's, a bad command line)
EXIT_FAILED = 1  # the run failed for a reason other than a lost device (its error is printed)
EXIT_GAVE_UP = 3  # devices were lost more often than --max-restarts allows
EXIT_TOO_FEW = 4  # the run refused to start on the devices left (most often: the model does not fit them)
EXIT_RANK0_LOST = 5  # rank 0's host, which holds the prompts and the results, is gone
HEARTBEAT_GRACE = 3.0  # seconds past the step timeout before a silent rank 0 counts as hung (found within +5 s)
_BEAT_EVERY = 0.25  # rank 0 touches the heartbeat at most this often
_POLL = 0.2  # the launcher looks at the job this often
_HERE = ("localhost", "127.0.0.1", "::1", os.uname().nodename)
_BOOT = boot_id()


def _local(row: dict) -> bool:
    """Does a rank of ranks.json run on this machine? By boot id where both know it: host names repeat."""
    if row.get("boot") and _BOOT:
        return row["boot"] == _BOOT
    return row["host"] in _HERE


class LaunchFolder:
    """The files through which the launcher and rank 0 talk (see the module's docstring)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.ranks, self.heartbeat = self.path / "ranks.json", self.path / "heartbeat"
        self.lost, self.epoch, self.log = self.path / "lost.json", self.path / "epoch.json", self.path / "log.jsonl"
        self.opened = self.path / "opened"

    def clear(self) -> None:
        """Before a run: nothing of the previous run's may be taken for this one's."""
        self.path.mkdir(parents=True, exist_ok=True)
        for p in (self.ranks, self.heartbeat, self.lost, self.opened):
            p.unlink(missing_ok=True)

    def write(self, path: Path, obj) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(obj) + "\n")
        os.replace(tmp, path)  # a reader never sees half a file

    def read(self, path: Path):
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None

    def last_beat(self) -> float | None:
        try:
            return self.heartbeat.stat().st_mtime
        except OSError:
            return None

    def note(self, **event) -> None:
        with open(self.log, "a") as f:
            f.write(json.dumps({"at": time.time(), **event}) + "\n")

    def epochs(self) -> int:
        """Runs started in this folder so far (a later launch numbers its runs after them)."""
        try:
            return sum('"event": "start"' in line for line in self.log.read_text().splitlines())
        except OSError:
            return 0


class Heartbeat:
    """Rank 0's side of a run under `edgeshard launch`: who runs where, that steps come back, and
    which ranks its step timeout found silent. `first_progress(t)` is called once, at the first step
    back (wall time t): the end of a restart."""

    def __init__(self, folder: str | Path, first_progress: Callable[[float], None] | None = None):
        self.folder = LaunchFolder(folder)
        self.first_progress = first_progress
        self._last = 0.0

    def ranks(self, table: list[dict]) -> None:
        self.folder.write(self.folder.ranks, table)

    def epoch(self) -> dict:
        return self.folder.read(self.folder.epoch) or {"epoch": 0, "reason": "start"}

    def beat(self) -> None:
        now = time.time()
        if now - self._last < _BEAT_EVERY:
            return
        if not self._last and self.first_progress is not None:
            self.first_progress(now)
        self._last = now
        self.folder.heartbeat.touch()  # its mtime is what the launcher reads

    def rest(self) -> None:
        """No steps for a while, by design (the shards reload for a new plan): the launcher watches
        the heartbeat again from the next beat."""
        self.folder.heartbeat.unlink(missing_ok=True)
        self._last = min(self._last, time.time() - _BEAT_EVERY)  # the next beat is written at once

    def opened(self) -> None:
        """The results file is open: a run after this one continues it, whatever the first was asked."""
        self.folder.opened.touch()

    def lost(self, ranks: list[int], devices: list[str]) -> None:
        self.folder.write(self.folder.lost, {"ranks": ranks, "devices": devices, "at": time.time()})


# -- hostfiles of survivors ---------------------------------------------------------------------------
def declaration(d: Device) -> str:
    """The `# device:` line that parse_hostfile reads back into this Device."""
    fields = [f"name={d.name}"]
    if d.memory is not None:
        fields.append(f"memory={d.memory}B")
    if d.torch != "cpu":
        fields.append(f"torch={d.torch}")
    if d.slowdown != 1.0:
        fields.append(f"slowdown={_plain(d.slowdown)}")
    if d.bandwidth is not None:
        fields.append(f"link={_plain(d.bandwidth)}B/s")
    if d.latency:
        fields.append(f"latency={_plain(d.latency)}s")
    for key in ("threads", "dtype", "quantize"):
        if getattr(d, key) is not None:
            fields.append(f"{key}={getattr(d, key)}")
    if d.clock != "cpu":
        fields.append(f"clock={d.clock}")
    return "# device: " + " ".join(fields)


def _plain(x: float) -> str:
    """A float as the hostfile reads it back exactly: its shortest repr, without an exponent (1e-05 -> 0.00001)."""
    return format(decimal.Decimal(repr(x)), "f")


def hostfile_text(devices: list[Device], why: str = "") -> str:
    """A hostfile of these devices, one slot each, in this order (rank 0 first)."""
    head = f"# {why}\n" if why else ""
    return head + "".join(f"{declaration(d)}\n{d.host}:1\n" for d in devices)


# -- what ended a run -------------------------------------------------------------------------------
@dataclasses.dataclass
class Ended:
    """How one run under the launcher ended."""

    rc: int
    text: str = ""  # the tail of mpiexec's output, both streams
    hung: bool = False  # the launcher ended it: rank 0's heartbeat went stale
    first: list[int] = dataclasses.field(default_factory=list)  # ranks (on this host) whose process ended first
    last_beat: float | None = None  # wall time the launcher saw the run's last progress
    at: float = 0.0  # wall time the launcher saw it end (or, hung, found rank 0 silent)
    local: bool = True  # every rank ran on the launcher's host: `first` then says which ended first of all


_ERROR_ON = re.compile(r"^edgeshard: error on rank (\d+) of \d+: (.*)$", re.M)
_SETUP_ERROR = re.compile(r"^edgeshard: error: (.*)$", re.M)
_HYDRA = re.compile(r"PID (\d+) RUNNING AT (\S+)")


@dataclasses.dataclass(frozen=True)
class Loss:
    """Why a run under the launcher failed: `kind` is "lost" (the devices of `ranks` are gone), "hung"
    (rank 0 went silent: every device runs again), "refused" (the run did not start: a bad job, or a
    model that does not fit the devices), "failed" (it failed on its own account mid-run) or
    "unknown" (nothing names a device: the hosts are asked)."""

    kind: str
    ranks: tuple[int, ...] = ()
    why: str = ""


def lost_ranks(ended: Ended, table: list[dict] | None, reported: dict | None) -> Loss:
    """What ended a failed run, from the evidence the launcher gathered. Pure."""
    if reported and reported.get("ranks"):
        return Loss("lost", tuple(sorted(reported["ranks"])), "silent past the step timeout")
    if ended.hung:
        return Loss("hung", (), "rank 0 silent past the step timeout")
    setup = _SETUP_ERROR.search(ended.text)
    if setup:
        return Loss("refused", (), setup.group(1))
    errors = {int(r): msg for r, msg in _ERROR_ON.findall(ended.text)}
    # a process ended before mpiexec took the others down: proof of which, when every rank is on this
    # host (or when it said why); with ranks elsewhere, a death there shows here as a rank mpiexec ended
    if len(ended.first) == 1 and (ended.local or ended.first[0] in errors):
        r = ended.first[0]
        if r == 0 and 0 in errors:
            return Loss("failed", (), f"rank 0 failed: {errors[0]}")
        return Loss("lost", (r,), f"crashed: {errors[r]}" if r in errors else "its process ended")
    crashed = sorted(r for r in errors if r != 0)
    if crashed:
        return Loss("lost", tuple(crashed), f"crashed: {errors[crashed[0]]}")
    if 0 in errors:
        return Loss("failed", (), f"rank 0 failed: {errors[0]}")
    pids = {int(row["pid"]): row["rank"] for row in table or []}
    named = [pids[int(pid)] for pid, _ in _HYDRA.findall(ended.text) if int(pid) in pids]
    if named:
        return Loss("lost", (named[0],), "its process ended (named by mpiexec)")
    return Loss("unknown", (), f"exit status {ended.rc}")


# -- watching one run --------------------------------------------------------------------------------
class _Tail:
    """The last bytes of one of the job's output streams, copied through as they come."""

    def __init__(self, keep: int = 1 << 16):
        self.keep, self.data, self.lock = keep, bytearray(), threading.Lock()

    def copy(self, src, dst) -> threading.Thread:
        def run():
            for chunk in iter(lambda: os.read(src.fileno(), 1 << 14), b""):
                try:
                    dst.write(chunk)
                    dst.flush()
                except (OSError, ValueError):  # our own output closed: keep draining mpiexec's
                    pass
                with self.lock:
                    self.data += chunk
                    del self.data[:-self.keep]

        t = threading.Thread(target=run, daemon=True)
        t.start()
        return t

    def text(self) -> str:
        with self.lock:
            return self.data.decode(errors="replace")


class _Exits:
    """pidfds of the ranks on this host: which process ended first, to the microsecond it ended."""

    def __init__(self):
        self.poll, self.fds, self.first, self.all_local = select.poll(), {}, [], True

    def watch(self, table: list[dict]) -> None:
        self.all_local = all(_local(row) for row in table)
        for row in table:
            if _local(row) and hasattr(os, "pidfd_open"):
                try:
                    fd = os.pidfd_open(int(row["pid"]))
                except OSError:  # already gone: mpiexec will say so
                    continue
                self.fds[fd] = row["rank"]
                self.poll.register(fd, select.POLLIN)

    def wait(self, seconds: float) -> None:
        if not self.fds or self.first:
            time.sleep(seconds)
            return
        ready = self.poll.poll(seconds * 1000)
        if ready:
            self.first = sorted(self.fds[fd] for fd, _ in ready)

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = {}


def _die_with_parent() -> None:
    """In mpiexec's child process: a launcher killed takes the job with it (mpiexec ends its ranks on
    SIGTERM), so nothing runs on that nobody watches."""
    if sys.platform.startswith("linux"):  # elsewhere a killed launcher leaves its mpiexec running
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _end(proc: subprocess.Popen) -> None:
    """End a job: mpiexec tears down every rank on SIGTERM; one that does not go is killed."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _run(cmd: list[str], env: dict, folder: LaunchFolder, limit: float) -> Ended:
    """Run one mpiexec to its end, or end it when rank 0's heartbeat is older than `limit` seconds."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=_die_with_parent, start_new_session=True)
    out, err, exits = _Tail(), _Tail(), _Exits()  # a tail each, so that no line is spliced with another
    copies = [out.copy(proc.stdout, sys.stdout.buffer), err.copy(proc.stderr, sys.stderr.buffer)]
    hung, watching, seen = False, False, None
    # rank 0's heartbeat is judged on this process's clock: when its mtime last changed, not the mtime
    # itself, which is rank 0's clock (or a file server's)
    mtime, changed, last_beat = None, time.monotonic(), None
    try:
        while proc.poll() is None:
            if not watching:
                table = folder.read(folder.ranks)
                if table:
                    exits.watch(table)
                    watching = True
            exits.wait(_POLL)
            beat = folder.last_beat()
            if beat != mtime:
                mtime, changed = beat, time.monotonic()
                last_beat = time.time() if beat is not None else last_beat
            if beat is not None and proc.poll() is None and time.monotonic() - changed > limit:
                hung, seen = True, time.time()
                _end(proc)
    except BaseException:
        _end(proc)
        raise
    finally:
        exits.close()
    for t in copies:
        t.join(5)
    return Ended(proc.returncode, f"{out.text()}\n{err.text()}", hung, exits.first, last_beat, seen or time.time(),
                 local=exits.all_local)


def _reachable(host: str, mpiexec: list[str], timeout: float = 10.0) -> bool:
    """Does the host start a process through mpiexec's own launcher (ssh, or what MPIEXEC_ARGS say)?"""
    if host in _HERE:
        return True
    try:
        return subprocess.run([*mpiexec, "-hosts", host, "-n", "1", "true"], capture_output=True,
                              timeout=timeout).returncode == 0
    except (subprocess.TimeoutExpired, OSError):
        return False


# -- the launcher ----------------------------------------------------------------------------------------
@dataclasses.dataclass
class LaunchOptions:
    job: str
    hostfile: str
    ranks: int | None = None  # -n: the hostfile's first N slots (default: all)
    max_restarts: int = 3
    grace: float = 0.0  # seconds to wait, then probe a lost device's host; one that answers stays
    step_timeout: float = 25.0
    output: str | None = None  # the results file (default: the job's)
    folder: str | None = None  # the launch folder (default: results file + ".launch")
    run_args: tuple[str, ...] = ()  # `edgeshard run` options passed on
    mpiexec: tuple[str, ...] = ("mpiexec",)
    python: str = sys.executable  # the interpreter every rank runs (`edgeshard launch` takes $PYTHON)


def _say(text: str) -> None:
    print(f"edgeshard launch: {text}", file=sys.stderr, flush=True)


def launch(opts: LaunchOptions) -> int:
    """Run the job, and again on the survivors after each lost device; returns the exit status."""
    from .jobs import Job

    job = Job.load(opts.job)
    output = Path(opts.output or job.output)
    folder = LaunchFolder(opts.folder or f"{output}.launch")
    given = parse_hostfile(opts.hostfile)
    everyone = list(given.for_world(opts.ranks or given.size).devices)
    devices, dropped = list(everyone), []
    mpiexec = list(opts.mpiexec)
    if opts.max_restarts < 0:
        raise ValueError(f"--max-restarts must be 0 or more, got {opts.max_restarts}")
    if "--overwrite" in opts.run_args:
        folder.log.unlink(missing_ok=True)  # a new job: its epochs count from 0
    epoch = folder.epochs()
    start: dict = {"reason": "start" if epoch == 0 else "launched again"}
    hostfile, restarts = Path(opts.hostfile), 0
    begun = False  # a run of this launch opened the results file: later runs continue it
    env = {**os.environ, "MPIR_CVAR_ENABLE_HEAVY_YIELD": os.environ.get("MPIR_CVAR_ENABLE_HEAVY_YIELD", "1")}
    while True:
        folder.clear()
        folder.write(folder.epoch, {"epoch": epoch, **start})
        # once a run of this launch has opened the results file, every later run continues it; before
        # that, --overwrite still means the file found at the start (a run lost while loading opened none)
        run_args = [a for a in opts.run_args if not (begun and a == "--overwrite")]
        resume = "--overwrite" not in run_args and "--resume" not in run_args and (
            begun or output.exists() or Path(f"{output}.journal").exists())
        cmd = [*mpiexec, "-f", str(hostfile), "-n", str(len(devices)), opts.python, "-m", "edgeshard_mpi", "run",
               opts.job, "--hostfile", str(hostfile), "--launch-dir", str(folder.path), "--output", str(output),
               "--step-timeout", f"{opts.step_timeout:g}", *(["--resume"] if resume else []), *run_args]
        _say(f"epoch {epoch}: {len(devices)} device{'s' * (len(devices) != 1)} ({', '.join(d.name for d in devices)})"
             f"{', resuming ' + str(output) if resume else ''}")
        _say(f"+ {shlex.join(cmd)}")
        folder.note(event="start", epoch=epoch, devices=[d.name for d in devices], hostfile=str(hostfile), **start)
        ended = _run(cmd, env, folder, opts.step_timeout + HEARTBEAT_GRACE if opts.step_timeout else math.inf)
        begun = begun or folder.opened.exists()
        if ended.rc == 0 and not ended.hung:
            folder.note(event="done", epoch=epoch)
            _say(f"epoch {epoch}: the job is done ({output})")
            return 0
        loss = lost_ranks(ended, folder.read(folder.ranks), folder.read(folder.lost))
        if loss.kind == "unknown":  # nothing names a device: ask the hosts themselves
            silent = tuple(r for r, d in enumerate(devices) if not _reachable(d.host, mpiexec))
            loss = Loss("lost", silent, "its host does not answer") if silent else Loss("failed", (), loss.why)
        folder.note(event="ended", epoch=epoch, rc=ended.rc, kind=loss.kind, detected=ended.at,
                    lost=[devices[r].name for r in loss.ranks], why=loss.why)
        if loss.kind == "refused" and dropped:
            _say(f"the devices left ({', '.join(d.name for d in devices)}) cannot run the job: {loss.why}. "
                 f"The results so far are kept in {output}")
            return EXIT_TOO_FEW
        if loss.kind in ("refused", "failed"):
            _say(f"epoch {epoch} failed ({loss.why}); no device was lost, so it is not run again. The results "
                 f"so far are kept in {output}")
            return EXIT_FAILED
        if 0 in loss.ranks and not _reachable(devices[0].host, mpiexec):
            _say(f"rank 0's device {devices[0].name} on {devices[0].host} is lost ({loss.why}): its host holds "
                 f"the prompts and the results, so the job ends here. What was written is in {output}; copy it "
                 "with the job's files to another host and run `edgeshard launch` there: it resumes")
            return EXIT_RANK0_LOST
        gone = [devices[r] for r in loss.ranks if r != 0]  # rank 0's host answers: its device runs again
        what = ", ".join(d.name for d in gone) or f"rank 0 ({devices[0].name})"
        if restarts >= opts.max_restarts:
            _say(f"epoch {epoch}: {what} lost ({loss.why}), and --max-restarts {opts.max_restarts} are used up. "
                 f"The results so far are kept in {output}")
            return EXIT_GAVE_UP
        _say(f"epoch {epoch}: {what} lost ({loss.why}); "
             f"{'running again without it' if gone else 'running again on the same devices'}")
        lost_names = [d.name for d in gone] or [devices[0].name]  # what was lost, whether or not it comes back
        if opts.grace > 0:  # a device whose host answers after the grace (it rebooted) runs again
            time.sleep(opts.grace)
            back = [d for d in gone + dropped if _reachable(d.host, mpiexec)]
            if back:
                _say(f"back after {opts.grace:g} s: {', '.join(d.name for d in back)}")
            gone, dropped = [d for d in gone if d not in back], [d for d in dropped if d not in back]
        dropped += gone
        devices = [d for d in everyone if d not in dropped]
        restarts += 1
        epoch += 1
        start = {"reason": loss.why, "lost": lost_names,
                 "lost_at": ended.last_beat or ended.at, "detected_at": ended.at}
        if dropped:
            hostfile = folder.path / f"hosts-{epoch}"
            hostfile.write_text(hostfile_text(devices, f"epoch {epoch} of {opts.job}: without "
                                                       f"{', '.join(d.name for d in dropped)}"))
        else:
            hostfile = Path(opts.hostfile)


def describe_runs(runs: list[dict]) -> list[str]:
    """`edgeshard show --runs`: one line per run of a results file written under `edgeshard launch`."""
    lines = []
    for r in runs:
        stages = ", ".join(f"{s['device']} {s['first']}..{s['last']}" for s in r.get("stages", []))
        after = f", progress again {r['resumed_after_s']:.1f} s after the loss" if "resumed_after_s" in r else ""
        lost = f" lost {', '.join(r['lost'])}:" if r.get("lost") else ""
        names = r.get("devices", [])
        lines.append(f"epoch {r['epoch']}:{lost} {r['reason']}; {len(names)} device{'s' * (len(names) != 1)} "
                     f"({', '.join(names)}); plan {stages or '-'}{after}")
    return lines

