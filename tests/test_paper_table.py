"""benchmarks/paper_table.py: the simulated paper table goes the paper's way, and agrees with the planner.

    python -m pytest -q tests/test_paper_table.py

Pure Python (planner + simulator on the shipped paper profiles), a few seconds.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

from edgeshard_mpi.planner import PlanError, plan_latency, plan_throughput, predict
from edgeshard_mpi.profiler import Profile

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    path = ROOT / "benchmarks" / "paper_table.py"
    spec = importlib.util.spec_from_file_location("paper_table", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def prof7() -> Profile:
    return Profile.load(ROOT / "profiles" / "paper-llama2-7b.json")


@pytest.fixture(scope="module")
def rows7(bench, prof7) -> dict:
    return bench.compare(prof7)


def test_7b_edgeshard_latency_below_edge_solo_and_equal_to_prediction(rows7, prof7):
    es, solo = rows7["EdgeShard"]["latency"], rows7["Edge-Solo"]["latency"]
    assert es["ms_per_token"] < solo["ms_per_token"], (es, solo)
    # one request of one micro-batch through the sequential schedule is exactly the latency DP's sum
    predicted_ms = predict(prof7.costs("decode"), plan_latency(prof7.costs("decode")))["latency_s"] * 1e3
    assert es["ms_per_token"] <= predicted_ms * (1 + 1e-9), (es["ms_per_token"], predicted_ms)
    assert math.isclose(es["ms_per_token"], predicted_ms, rel_tol=1e-9), (es["ms_per_token"], predicted_ms)


def test_7b_edgeshard_throughput_beats_every_baseline(bench, rows7):
    es = rows7["EdgeShard"]["throughput"]["tokens_per_s"]
    for name in bench.BASELINES:
        base = rows7[name]["throughput"]
        assert "error" not in base, (name, base)
        assert es > base["tokens_per_s"], (name, es, base["tokens_per_s"])
    h = bench.headline(rows7)
    assert h["matches_paper"] is True, h
    assert h["latency_vs_edge_solo"] < 1 < h["throughput_vs_best_baseline"], h


def test_70b_baselines_out_of_memory_edgeshard_fits(bench):
    prof = Profile.load(ROOT / "profiles" / "paper-llama2-70b.json")
    costs = prof.costs("decode")
    for name in bench.BASELINES:
        for plan_fn in bench.METHODS[name]:
            with pytest.raises(PlanError):
                plan_fn(costs)
    for plan_fn in (plan_latency, plan_throughput):
        assert predict(costs, plan_fn(costs))["fits"], plan_fn.__name__
    rows = bench.compare(prof)
    assert all("error" in rows[name][col] for name in bench.BASELINES for col in ("latency", "throughput")), rows
    es = rows["EdgeShard"]
    assert "error" not in es["latency"] and "error" not in es["throughput"], es
    assert es["latency"]["ms_per_token"] > 0 and es["throughput"]["tokens_per_s"] > 0, es


def test_sweep_edgeshard_latency_non_increasing_with_bandwidth(bench, prof7):
    sweep = bench.bandwidth_sweep(prof7, [1, 2, 5, 10, 20, 50])
    lat = [sweep[mb]["EdgeShard"]["latency"]["ms_per_token"] for mb in sweep]
    assert all(b <= a * (1 + 1e-12) for a, b in zip(lat, lat[1:])), list(zip(sweep, lat))
    # the sweep really changes the source <-> cloud link: Cloud-Edge-Opt gains from it
    opt = [sweep[mb]["Cloud-Edge-Opt"]["latency"]["ms_per_token"] for mb in sweep]
    assert opt[-1] < opt[0], opt


def test_with_source_keeps_the_slow_link_on_the_source(bench, prof7):
    slow, fast = prof7.bandwidth[0][bench.CLOUD], prof7.bandwidth[1][bench.CLOUD]
    assert slow < fast, (slow, fast)
    nx = bench.with_source(prof7, 12)
    assert nx.devices[0]["name"] == prof7.devices[12]["name"] and nx.devices[12]["name"] == prof7.devices[0]["name"]
    assert nx.bandwidth[0][bench.CLOUD] == nx.bandwidth[bench.CLOUD][0] == slow
    assert nx.bandwidth[12][bench.CLOUD] == nx.bandwidth[bench.CLOUD][12] == fast
    cloud = bench.with_source(prof7, bench.CLOUD)
    assert cloud.devices[0]["name"] == prof7.devices[bench.CLOUD]["name"]
    links = [b for r, row in enumerate(cloud.bandwidth) for c, b in enumerate(row) if r != c]
    assert set(links) == {fast}, set(links)


def test_70b_int8_still_needs_edgeshard_and_fewer_devices(bench):
    # a quarter of the bytes (69 GB): still more than the source and the cloud hold together (52 GB),
    # so every baseline is still out of memory; EdgeShard's latency plan needs fewer devices
    prof = Profile.load(ROOT / "profiles" / "paper-llama2-70b.json")
    int8 = bench.int8_llama2_70b(prof)
    total = lambda p: sum(u["param_bytes"] for u in p.units)
    assert 0.25 < total(int8) / total(prof) < 0.2502
    rows, fp32 = bench.compare(int8), bench.compare(prof)
    assert all("error" in rows[name][col] for name in bench.BASELINES for col in ("latency", "throughput")), rows
    assert len(rows["EdgeShard"]["latency"]["stages"]) < len(fp32["EdgeShard"]["latency"]["stages"])
