"""Re-planning when a stage drifts (--replan), under mpiexec, on the work clock so that the slowdown is exact."""

from __future__ import annotations

import json

from conftest import reference_tokens, run_mpi, write_job

from edgeshard_mpi.profiler import Profile
from edgeshard_mpi.results import read_attrs, read_results

PROMPTS = [f"{w} is the word of the day, and" for w in ("apple", "river", "stone", "cloud", "maple", "engine",
                                                        "violet", "harbor", "pepper", "signal", "copper", "meadow",
                                                        "lantern", "falcon", "garden", "thunder", "velvet", "canyon",
                                                        "marble", "saddle", "ribbon", "glacier", "orchard", "beacon")]
NEW = 16


def test_a_device_slowed_mid_run_is_planned_around_and_every_request_runs_once(tmp_path, tiny_path):
    # Three equal devices; the run measures their profile and splits the model among them. From its
    # 40th step on, the middle one takes 10x as long (EDGESHARD_SLOW, as a throttled device would).
    # Rank 0 sees that stage drift, plans again on the speeds it measured, drains the micro-batches
    # in flight, reloads the shards, and finishes the job on the new plan: every request once, with
    # generate's tokens, the slowed device holding less than it did. Its profile is measured with every
    # rank at once (--profile-load together), and saved apart from one measured in turns.
    env = {"EDGESHARD_PROFILES": str(tmp_path / "profiles"), "EDGESHARD_SLOW": "1:40:10"}
    hosts = tmp_path / "three.hosts"
    hosts.write_text("".join(f"# device: name={n} slowdown=8 clock=work\nlocalhost:1\n" for n in ("a", "b", "c")))
    want = reference_tokens(tiny_path, PROMPTS, NEW, 1)
    job = write_job(tmp_path, "tiny-random", [{"id": str(i), "prompt": p} for i, p in enumerate(PROMPTS)],
                    extra=f'hostfile = "{hosts}"\nmicro_batch_size = 1\n', generation=f"max_new_tokens = {NEW}",
                    plan='[plan]\nobjective = "throughput"')
    proc = run_mpi(["run", str(job), "--no-progress", "--replan", "--profile-load", "together"], 3, env=env,
                   timeout=240)
    assert proc.returncode == 0, proc.stderr
    assert "edgeshard: drift: b computes" in proc.stderr and "moving" in proc.stderr, proc.stderr
    records = read_results(tmp_path / "job.h5")
    assert sorted(r.id for r in records) == sorted(str(i) for i in range(len(PROMPTS))), "a request lost or twice"
    by_id = {r.id: r.token_ids for r in records}
    assert [by_id[str(i)] for i in range(len(PROMPTS))] == want
    attrs = read_attrs(tmp_path / "job.h5")
    assert attrs["profile"].endswith("-together.json")
    assert Profile.load(attrs["profile"]).shapes["load"] == "together"
    moves = json.loads(attrs["moves"])
    moved = [m for m in moves if m["moved"]]
    assert len(moved) == 1 and moved[0]["saved_s"] > moved[0]["reload_s"] + moved[0]["drain_s"]
    assert 8 < moved[0]["ratios"]["b"] < 12  # the window's steps all at 10x, on the work clock
    drift = json.loads(attrs["drift"])
    assert drift[0]["device"] == "b" and drift[0]["drifting"]
    summary = json.loads(attrs["summary"])
    first, second = summary["segments"]
    assert first["requests"] + second["requests"] == len(PROMPTS) and second["requests"] > 0

    def units_of_b(seg):
        return sum(st["last"] - st["first"] + 1 for st in seg["stages"] if st["device"] == "b")

    assert units_of_b(second) < units_of_b(first)
    assert "plan 2 of 2:" in proc.stdout
