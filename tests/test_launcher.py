"""The launcher's pure parts, in-process: survivors' hostfiles, what ended a run, profiles cut to survivors."""

from __future__ import annotations

import json

import pytest

from edgeshard_mpi.cluster import Device, parse_hostfile
from edgeshard_mpi.launcher import Ended, Heartbeat, LaunchFolder, describe_runs, hostfile_text, lost_ranks
from edgeshard_mpi.profiler import Profile, cluster_fingerprint, find_profile

TABLE = [{"rank": r, "device": n, "host": "localhost", "pid": 100 + r} for r, n in enumerate("abc")]


def test_a_survivors_hostfile_reads_back_as_the_same_devices(tmp_path):
    devices = [Device("board", host="10.0.0.5", memory=8 * 2**30, slowdown=3.5, bandwidth=6.25e6, latency=0.002,
                      clock="work"),
               Device("gpu", host="10.0.0.9", memory=24 * 2**30, torch="cuda:0", dtype="float16", quantize="none"),
               Device("cpu", host="10.0.0.7", threads=8, dtype="bfloat16", quantize="int8")]
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
    (Ended(9, "edgeshard: error on rank 1 of 3: MPI error\n", first=[0, 1]), None, ("lost", (1,), "crashed: MPI error")),
    (Ended(9, "=   PID 102 RUNNING AT localhost\n", first=[]), None,
     ("lost", (2,), "its process ended (named by mpiexec)")),
    (Ended(255, "ssh: connect to host x: No route to host\n"), None, ("unknown", (), "exit status 255")),
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
                   devices=devices, bandwidth=[[None if k == j else 1e6 * (k + 1) + j for j in range(m)] for k in range(m)],
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
