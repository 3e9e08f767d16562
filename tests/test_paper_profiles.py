"""The shipped paper-testbed profiles (benchmarks/paper_profiles.py) and what the planner makes of them.

    $ python -m pytest -q tests/test_paper_profiles.py

Pure Python, no MPI or torch. The optimality checks compare plans through `predict`, not against
hard-coded numbers: an exact optimum is at least as good as every baseline that fits.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from edgeshard_mpi.planner import (PlanError, cloud_device, cloud_edge_even, cloud_edge_opt, edge_solo, even_split,
                                   memory_proportional, plan_latency, plan_throughput, predict)
from edgeshard_mpi.profiler import Profile

PROFILES = Path(__file__).resolve().parents[1] / "profiles"
MODELS = {"llama2-7b": 34, "llama2-13b": 42, "llama2-70b": 82}

BASELINES = {
    "edge_solo": edge_solo,
    "cloud_edge_even": cloud_edge_even,
    "cloud_edge_opt_latency": lambda c: cloud_edge_opt(c, "latency"),
    "cloud_edge_opt_throughput": lambda c: cloud_edge_opt(c, "throughput"),
    "even_split": even_split,
    "memory_proportional": memory_proportional,
}
PAPER_BASELINES = ["edge_solo", "cloud_edge_even", "cloud_edge_opt_latency", "cloud_edge_opt_throughput"]


def load(model: str) -> Profile:
    return Profile.load(PROFILES / f"paper-{model}.json")


@pytest.mark.parametrize("model", MODELS)
def test_profile_loads(model):
    prof = load(model)
    assert prof.num_units == MODELS[model] == prof.model["num_units"]
    assert prof.model["name"] == model and prof.cluster == "paper-testbed-15"
    assert [u["name"] for u in prof.units] == ["embed"] + [f"block.{b}" for b in range(MODELS[model] - 2)] + ["head"]
    names = prof.device_names
    assert len(names) == 15 and len(set(names)) == 15
    assert names[0].startswith("agx-orin") and names[14] == "rtx3090-cloud"
    assert prof.notes and prof.shapes == {"prompt_tokens": 32, "context": 80, "micro_batch_size": 1}
    costs = prof.costs("decode")
    assert cloud_device(costs) == 14


def test_7b_matches_paper_figures():
    """The 7B profile carries PAPER's figures: 0.488 / 0.754 GiB units, 174.0 / 198.6 / 26.1 ms totals."""
    prof = load("llama2-7b")
    assert prof.units[0]["param_bytes"] / 2**30 == pytest.approx(0.488, abs=5e-4)
    assert prof.units[1]["param_bytes"] / 2**30 == pytest.approx(0.754, abs=5e-4)
    for rank, total_ms in ((0, 174.0), (12, 198.6), (14, 26.1)):
        assert sum(prof.devices[rank]["decode_s"]) * 1e3 == pytest.approx(total_ms, rel=1e-9)
    costs = prof.costs("decode")
    # 16384 bytes of hidden state over the 1 Mbit/s source -> cloud link: 2.1 ms + 131.072 ms
    assert costs.transfer(0, 14, costs.out_bytes[0]) == pytest.approx(0.0021 + 16384 / 125000)
    assert costs.transfer(1, 14, costs.out_bytes[0]) == pytest.approx(0.0021 + 16384 / 6.25e6)


@pytest.mark.parametrize("name", PAPER_BASELINES + ["even_split"])
def test_70b_baselines_run_out_of_memory(name):
    with pytest.raises(PlanError):
        BASELINES[name](load("llama2-70b").costs("decode"))


@pytest.mark.parametrize("planner_fn", [plan_latency, plan_throughput])
def test_70b_edgeshard_fits(planner_fn):
    prof = load("llama2-70b")
    costs = prof.costs("decode")
    plan = planner_fn(costs)
    unit_bytes = prof.unit_bytes()
    assert [u for s in plan.stages for u in s.units] == list(range(82))
    for s in plan.stages:
        assert sum(unit_bytes[u] for u in s.units) <= prof.devices[s.rank]["memory"]
    assert predict(costs, plan)["fits"]


@pytest.mark.parametrize("model", MODELS)
def test_edgeshard_no_worse_than_any_feasible_baseline(model):
    costs = load(model).costs("decode")
    best_latency = predict(costs, plan_latency(costs))["latency_s"]
    best_bottleneck = predict(costs, plan_throughput(costs))["bottleneck_s"]
    feasible = 0
    for name, fn in BASELINES.items():
        try:
            p = predict(costs, fn(costs))
        except PlanError:
            continue
        feasible += 1
        assert best_latency <= p["latency_s"] * (1 + 1e-12), name
        assert best_bottleneck <= p["bottleneck_s"] * (1 + 1e-12), name
    if model == "llama2-7b":
        assert feasible == len(BASELINES)  # the 7B model fits everywhere, the source included
