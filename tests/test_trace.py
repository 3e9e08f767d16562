"""Timelines: every rank's events in a Chrome trace, consistent with the run's own counts, and drawn."""

from __future__ import annotations

import json

import pytest

from conftest import run_mpi, write_job
from edgeshard_mpi.cli import main
from edgeshard_mpi.results import read_attrs
from edgeshard_mpi.trace import Tracer, load_trace

PROMPTS = ["The quick brown fox", "In a distant galaxy, a lone explorer discovered", "def fibonacci(n):",
           "Once upon a time", "Water boils at"]


def test_a_traced_run_has_one_track_per_rank_matching_its_steps(tmp_path, tiny_path):
    job = write_job(tmp_path, "tiny-random", [{"prompt": p} for p in PROMPTS], extra="micro_batch_size = 2")
    trace = tmp_path / "t.json"
    proc = run_mpi(["run", str(job), "--no-progress", "--trace", str(trace)], 3, timeout=120)
    assert proc.returncode == 0, proc.stderr
    d = json.loads(trace.read_text())
    assert d["otherData"]["schedule"] == "no-bubbles"
    tracks, meta = load_trace(trace)
    assert [t["rank"] for t in tracks] == [0, 1, 2]
    summary = json.loads(read_attrs(tmp_path / "job.h5")["summary"])
    work = []
    for tr, stage in zip(tracks, summary["stages"]):
        compute = [e for e in tr["events"] if e[0] in ("prefill", "decode")]
        assert len(compute) == stage["steps"]
        assert sum(e[2] for e in compute) == pytest.approx(stage["compute_s"], rel=1e-3)
        assert len([e for e in compute if e[0] == "prefill"]) == 3  # 5 prompts in micro-batches of 2
        # each compute event carries its step's forwards, the same on every stage, which the simulator's
        # line costs it by: a decode step of its 1-2 rows over the slot's columns, a prefill of its width
        for name, *_, forwards in compute:
            tokens, columns, width = forwards[0]
            if name == "decode":
                assert tokens in (1, 2) and columns > 0 and width == 1, forwards
            else:
                assert columns == 0 and tokens >= width >= 1, forwards
        work.append({(e[3], e[4]): e[5] for e in compute})
        spans = sorted((e[1], e[1] + e[2]) for e in tr["events"])
        assert all(a[1] <= b[0] + 1e-6 for a, b in zip(spans, spans[1:])), "a rank does one thing at a time"
    assert work[0] == work[1] == work[2]
    # drawn from the trace, and from the results file that names it
    for src, out in ((trace, tmp_path / "a.png"), (tmp_path / "job.h5", tmp_path / "b.png")):
        assert main(["show", "--timeline", str(src), "--out", str(out)]) == 0
        assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tracing_off_records_nothing():
    t = Tracer(enabled=False)
    t.add("decode", 0.0, 1.0, 0, 0)
    assert t.events == []
    t = Tracer(enabled=True)
    t.start()
    t.add("decode", t.origin + 0.5, t.origin + 0.75, 1, 2)
    assert t.events == [("decode", 0.5, 0.25, 1, 2)]


def test_simulated_trace_draws_the_same_way(tmp_path, capsys):
    from conftest import ROOT

    trace = tmp_path / "sim.json"
    assert main(["simulate", "--profile", str(ROOT / "profiles" / "paper-llama2-7b.json"), "--objective", "latency",
                 "--schedule", "bubbles", "--micro-batches", "4", "--new-tokens", "8", "--trace", str(trace)]) == 0
    tracks, meta = load_trace(trace)
    assert meta["simulated"] and meta["schedule"] == "bubbles"
    assert sum(1 for t in tracks for e in t["events"] if e[0] == "prefill") == 4 * len(tracks)
    assert main(["show", "--timeline", str(trace), "--out", str(tmp_path / "s.png")]) == 0
    assert "bubbles" in capsys.readouterr().out
