"""The launcher's pure parts, in-process: survivors' hostfiles, what ended a run, profiles cut to survivors."""

from __future__ import annotations

import json

import pytest

from edgeshard_mpi.cluster import Device, parse_hostfile
from edgeshard_mpi.launcher import (EXIT_RANK0_LOST, EXIT_TOO_FEW, Ended, Heartbeat, LaunchFolder, describe_runs,
                                    hostfile_text, lost_ranks)
from edgeshard_mpi.profiler import Profile, cluster_fingerprint, find_profile

TABLE = [{"rank": r, "device": n, "host": "localhost", "pid": 100 + r} for r, n in enumerate("abc")]


def test_a_survivors_hostfile_reads_back_as_the_same_devices(tmp_path):
    devices = [Device("board", host="10.0.0.5", memory=8 * 2**30, slowdown=3.5, bandwidth=6.25e6, latency=0.002,
                      clock="work"),
               Device("gpu", host="10.0.0.9", memory=24 * 2**30, torch="cuda:0", dtype="float16", quantize="none"),
               Device("cpu", host="10.0.0.7", threads=8, dtype="bfloat16", quantize="int8"),
               Device("lan", host="10.0.0.8", slowdown=1.25, bandwidth=1.25e9 / 3, latency=1e-05)]
    path = tmp_path / "hosts"
    path.write_text(hostfile_text(devices, "without lost-one"))
    assert parse_hostfile(path).devices == tuple(devices)
    assert "10.0.0.9:1" in path.read_text() and "#" not in "".join(
        line for line in path.read_text().splitlines() if not line.startswith("#"))


@pytest.mark.parametrize("ended, reported, expected", [
    # rank 0's step timeout named the silent ranks: surest of all
    (Ended(1, first=[2]), {"ranks": [1]}, ("lost", (1,), "silent past the step timeout")),
    # the launcher ended a job whose rank 0 went silent: every device runs again
    (Ended(-15, hung=True), None, ("hung", (), "rank 0 silent past the step timeout")),
    # the run refused to start (a plan that does not fit): not a lost device
    (Ended(1, "edgeshard: error: hosts: device b has 12 MiB, but units 0..3 need 13 MiB\n", first=[0]), None,
     ("refused", (), "hosts: device b has 12 MiB, but units 0..3 need 13 MiB")),
    # killed: its process ended first, with nothing said; mpiexec named another one it killed itself
    (Ended(9, "=   PID 100 RUNNING AT localhost\n", first=[1]), None, ("lost", (1,), "its process ended")),
    # a rank that failed says so before the abort
    (Ended(1, "edgeshard: error on rank 2 of 3: RuntimeError: CUDA out of memory\n", first=[2]), None,
     ("lost", (2,), "crashed: RuntimeError: CUDA out of memory")),
    # rank 0 failing on its own account (a full disk) loses no device
    (Ended(1, "edgeshard: error on rank 0 of 3: job.h5: writing results failed\n", first=[0]), None,
     ("failed", (), "rank 0 failed: job.h5: writing results failed")),
    # two processes ended before the launcher looked: a rank on another host's line, else mpiexec's report
    (Ended(9, "edgeshard: error on rank 1 of 3: MPI error\n", first=[0, 1]), None,
     ("lost", (1,), "crashed: MPI error")),
    (Ended(9, "=   PID 102 RUNNING AT localhost\n", first=[]), None,
     ("lost", (2,), "its process ended (named by mpiexec)")),
    (Ended(255, "ssh: connect to host x: No route to host\n"), None, ("unknown", (), "exit status 255")),
    # ranks on other hosts: a rank here that mpiexec ended first says nothing of a death there
    (Ended(9, "edgeshard: error on rank 2 of 3: RuntimeError: out of memory\n", first=[0], local=False), None,
     ("lost", (2,), "crashed: RuntimeError: out of memory")),
    (Ended(9, "=   PID 101 RUNNING AT board7\n", first=[0], local=False), None,
     ("lost", (1,), "its process ended (named by mpiexec)")),
])
def test_what_ended_a_run(ended, reported, expected):
    loss = lost_ranks(ended, TABLE, reported)
    assert (loss.kind, loss.ranks, loss.why) == expected


def test_heartbeat_reports_ranks_progress_and_silent_ranks(tmp_path):
    folder = LaunchFolder(tmp_path / "launch")
    folder.clear()
    seen = []
    hb = Heartbeat(folder.path, seen.append)
    assert hb.epoch() == {"epoch": 0, "reason": "start"} and folder.last_beat() is None
    hb.ranks(TABLE)
    hb.beat()
    hb.beat()  # within the rate limit: the first progress is reported once
    assert folder.read(folder.ranks) == TABLE and len(seen) == 1 and folder.last_beat() >= seen[0] - 1
    hb.rest()  # a reload for a new plan: not watched until the next beat, which is not a first progress
    assert folder.last_beat() is None
    hb.beat()
    assert folder.last_beat() is not None and len(seen) == 1
    hb.lost([2], ["c"])
    assert folder.read(folder.lost)["devices"] == ["c"]
    folder.clear()  # the next run's folder holds nothing of this one's
    assert folder.read(folder.ranks) is None and folder.read(folder.lost) is None and folder.last_beat() is None


def test_show_runs_lines():
    lines = describe_runs([
        {"epoch": 0, "reason": "start", "devices": ["a", "b", "c"],
         "stages": [{"device": "a", "first": 0, "last": 3}, {"device": "b", "first": 4, "last": 7}]},
        {"epoch": 1, "reason": "its process ended", "lost": ["b"], "devices": ["a", "c"], "resumed_after_s": 6.25,
         "stages": [{"device": "a", "first": 0, "last": 7}]}])
    assert lines == ["epoch 0: start; 3 devices (a, b, c); plan a 0..3, b 4..7",
                     "epoch 1: lost b: its process ended; 2 devices (a, c); plan a 0..7, progress again 6.2 s after "
                     "the loss"]


def _profile(names: list[str]) -> Profile:
    m = len(names)
    devices = [{**Device(n, slowdown=2.0 + j).to_dict(), "decode_s": [0.1 * (j + 1)] * 2,
                "prefill_s": [1.0 * (j + 1)] * 2} for j, n in enumerate(names)]
    return Profile(model={"name": "m", "fingerprint": "f" * 16, "num_units": 2},
                   units=[{"name": "u", "param_bytes": 1, "kv_bytes_per_token": 0, "out_bytes_per_token": 1}] * 2,
                   devices=devices,
                   bandwidth=[[None if k == j else 1e6 * (k + 1) + j for j in range(m)] for k in range(m)],
                   latency=[[0.0 if k == j else 0.001 * (k + 1) + j for j in range(m)] for k in range(m)],
                   shapes={"prompt_tokens": 8, "context": 16, "micro_batch_size": 1},
                   cluster=cluster_fingerprint([Device(n, slowdown=2.0 + j).to_dict() for j, n in enumerate(names)]))


def test_a_profile_cut_to_the_survivors_is_found_without_measuring(tmp_path):
    full = _profile(["a", "b", "c"])
    full.save(tmp_path / full.file_name)
    survivors = [Device("a", slowdown=2.0).to_dict(), Device("c", slowdown=4.0).to_dict()]
    fp = cluster_fingerprint(survivors)
    got = find_profile("f" * 16, fp, full.shapes, tmp_path, devices=survivors)
    assert got is not None and got.device_names == ["a", "c"] and got.cluster == fp
    assert got.devices == [full.devices[0], full.devices[2]]
    assert got.bandwidth == [[None, full.bandwidth[0][2]], [full.bandwidth[2][0], None]]
    assert got.latency[1][0] == full.latency[2][0] and "devices a, c of 3" in got.source
    assert find_profile("f" * 16, fp, full.shapes, tmp_path) is None  # only when asked with the devices
    # a survivor declared otherwise than it was measured (another slowdown) is not that device
    other = [survivors[0], Device("c", slowdown=5.0).to_dict()]
    assert find_profile("f" * 16, cluster_fingerprint(other), full.shapes, tmp_path, devices=other) is None
    # nor at other shapes, nor for another model
    assert find_profile("f" * 16, fp, {**full.shapes, "micro_batch_size": 2}, tmp_path, devices=survivors) is None
    assert find_profile("e" * 16, fp, full.shapes, tmp_path, devices=survivors) is None
    (tmp_path / "ffffffff-broken-b1-p8-c16.json").write_text(json.dumps({"format": 1}))  # skipped, not fatal
    assert find_profile("f" * 16, fp, full.shapes, tmp_path, devices=survivors) is not None


# -- the launcher's loop, with an mpiexec that plays a script of runs ------------------------------------
FAKE_MPIEXEC = r'''#!/usr/bin/env python3
"""Plays the next line of SCRIPT as a run: `lost R` (rank 0 opened the results, then reports rank R
silent), `early R` (the same before the results were opened), `refuse` (the run does not start), `ok`.
Records each run's hostfile and options. `-hosts H ... true` (the launcher's probe): a host ending in
.invalid does not answer."""
import json, os, sys
from pathlib import Path
argv = sys.argv[1:]
if argv[0] == "-hosts":
    sys.exit(1 if argv[1].endswith(".invalid") else 0)
folder = Path(argv[argv.index("--launch-dir") + 1])
calls = Path(os.environ["SCRIPT"] + ".calls")
n = len(calls.read_text().splitlines()) if calls.exists() else 0
hosts = Path(argv[argv.index("-f") + 1]).read_text()
with open(calls, "a") as f:
    f.write(json.dumps({"hosts": hosts, "resume": "--resume" in argv, "overwrite": "--overwrite" in argv}) + "\n")
action = Path(os.environ["SCRIPT"]).read_text().splitlines()[n].split()
names = [line.split("name=")[1].split()[0] for line in hosts.splitlines() if "name=" in line]
(folder / "ranks.json").write_text(json.dumps([{"rank": r, "device": d, "host": "elsewhere", "pid": 1}
                                               for r, d in enumerate(names)]))
if action[0] == "lost":
    (folder / "opened").touch()
if action[0] in ("lost", "early"):
    (folder / "lost.json").write_text(json.dumps({"ranks": [int(action[1])], "devices": []}))
    sys.exit(1)
if action[0] == "refuse":
    print("edgeshard: error: hosts: device a has 1 MiB, but units 0..3 need 2 MiB", file=sys.stderr)
    sys.exit(1)
sys.exit(0)
'''


@pytest.fixture
def play(tmp_path, monkeypatch):
    """launch() with the fake mpiexec over three devices: returns (exit status, runs' hostfiles' device names,
    the runs as the fake saw them, the launcher's log)."""
    from edgeshard_mpi.launcher import LaunchOptions, launch

    fake = tmp_path / "mpiexec"
    fake.write_text(FAKE_MPIEXEC)
    fake.chmod(0o755)
    (tmp_path / "p.jsonl").write_text('{"prompt": "Hi"}\n')
    job = tmp_path / "job.toml"
    job.write_text('model = "tiny-random"\nprompts = "p.jsonl"\noutput = "job.h5"\n')

    def go(script: list[str], hosts=("localhost",) * 3, **kw):
        (tmp_path / "hosts").write_text("".join(f"# device: name={n}\n{h}:1\n" for n, h in zip("abc", hosts)))
        (tmp_path / "script").write_text("\n".join(script) + "\n")
        (tmp_path / "script.calls").unlink(missing_ok=True)
        monkeypatch.setenv("SCRIPT", str(tmp_path / "script"))
        rc = launch(LaunchOptions(str(job), str(tmp_path / "hosts"), mpiexec=(str(fake),), **kw))
        calls = [json.loads(line) for line in (tmp_path / "script.calls").read_text().splitlines()]
        devices = [[line.split("name=")[1].split()[0] for line in c["hosts"].splitlines() if "name=" in line]
                   for c in calls]
        log = [json.loads(line) for line in (tmp_path / "job.h5.launch" / "log.jsonl").read_text().splitlines()]
        return rc, devices, calls, log

    return go


def test_launch_drops_each_lost_device_and_resumes_on_the_rest(play):
    rc, devices, calls, log = play(["lost 1", "lost 1", "ok"], run_args=("--overwrite",))
    assert rc == 0 and devices == [["a", "b", "c"], ["a", "c"], ["a"]]
    # the first run overwrites as asked; each restart continues the file
    assert [(c["overwrite"], c["resume"]) for c in calls] == [(True, False), (False, True), (False, True)]
    assert [e["event"] for e in log] == ["start", "ended", "start", "ended", "start", "done"]
    assert log[2]["lost"] == ["b"] and log[4]["lost"] == ["c"] and log[4]["epoch"] == 2


def test_overwrite_holds_until_a_run_has_opened_the_results(play):
    """A run lost while loading has not replaced the old results file yet: the next still overwrites it."""
    rc, devices, calls, _ = play(["early 2", "lost 1", "ok"], run_args=("--overwrite",))
    assert rc == 0 and devices == [["a", "b", "c"], ["a", "b"], ["a"]]
    assert [(c["overwrite"], c["resume"]) for c in calls] == [(True, False), (True, False), (False, True)]


def test_launch_gives_up_after_max_restarts_and_on_too_few_devices(play):
    from edgeshard_mpi.launcher import EXIT_FAILED, EXIT_GAVE_UP

    assert play(["lost 1", "lost 1"], max_restarts=1)[:2] == (EXIT_GAVE_UP, [["a", "b", "c"], ["a", "c"]])
    assert play(["lost 2", "refuse"])[:2] == (EXIT_TOO_FEW, [["a", "b", "c"], ["a", "b"]])
    assert play(["refuse"])[:2] == (EXIT_FAILED, [["a", "b", "c"]])  # no device lost: not run again


def test_a_device_whose_host_answers_after_the_grace_runs_again(play):
    rc, devices, _, log = play(["lost 2", "ok"], grace=0.01)
    assert rc == 0 and devices == [["a", "b", "c"], ["a", "b", "c"]]
    assert log[2]["lost"] == ["c"]  # recorded as lost, though it came back
    rc, devices, _, _ = play(["lost 2", "ok"], hosts=("localhost", "localhost", "gone.invalid"), grace=0.01)
    assert rc == 0 and devices == [["a", "b", "c"], ["a", "b"]]


def test_rank_0_lost_with_its_host_ends_the_job(play):
    rc, devices, _, _ = play(["lost 0"], hosts=("head.invalid", "localhost", "localhost"))
    assert rc == EXIT_RANK0_LOST and devices == [["a", "b", "c"]]
    rc, devices, _, _ = play(["lost 0", "ok"])  # its host answers: the same devices run again
    assert rc == 0 and devices == [["a", "b", "c"]] * 2


def test_launch_refuses_bad_options_before_starting_anything(tmp_path, monkeypatch, capsys):
    from edgeshard_mpi.cli import main

    job = tmp_path / "job.toml"
    job.write_text('model = "tiny-random"\nprompts = "p.jsonl"\n')
    for argv, said in ((["--max-restarts", "-1"], "is not a whole number >= 0"),
                       (["--overw"], "unrecognized arguments: --overw"),  # `run` takes no abbreviations
                       (["--schedule", "fastest"], "invalid choice: 'fastest'"),
                       ([str(job)], "launch: one job, not 2")):
        with pytest.raises(SystemExit) as e:
            main(["launch", str(job), "-f", "hosts", *argv])
        assert e.value.code == 2 and said in capsys.readouterr().err
    monkeypatch.setenv("MAX_RESTARTS", "three")
    with pytest.raises(SystemExit):
        main(["launch", str(job), "-f", "hosts"])
    assert "MAX_RESTARTS: 'three' is not a whole number >= 0" in capsys.readouterr().err
    assert main(["show", "--runs", str(tmp_path / "none.h5")]) == 1  # other commands do not read it


def test_a_rank_is_local_by_its_machine_not_its_host_name():
    from edgeshard_mpi.cluster import boot_id
    from edgeshard_mpi.launcher import _local

    me = boot_id()
    assert me  # Linux
    assert _local({"host": "anything", "boot": me})
    assert not _local({"host": "localhost", "boot": "another-machine"})  # a board called like this one
    assert _local({"host": "localhost"})  # a table without boot ids: by name
