"""Planner tests: the exact DPs against an exhaustive search, the baselines, the error messages.

    $ python -m pytest -q tests/test_planner.py
"""

from __future__ import annotations

import math
import random

import pytest

from edgeshard_mpi import planner
from edgeshard_mpi.planner import (Costs, Plan, PlanError, Stage, cloud_device, cloud_edge_even, cloud_edge_opt,
                                   edge_solo, even_split, memory_proportional, plan_latency, plan_throughput,
                                   predict)

INF = math.inf


def approx(x):
    return pytest.approx(x, rel=1e-9, abs=1e-12)


# --- reference: exhaustive search, written independently of the planner -------------------------

def _transfer(c: dict, k: int, j: int, nbytes: float) -> float:
    return 0.0 if k == j else c["latency"][k][j] + nbytes / c["bandwidth"][k][j]


def _bytes(c: dict, i: int, j: int, key: str = "unit_bytes") -> float:
    """Unit i's bytes on device j (or what it sends from there, key="out_bytes"): (N,) or, per device, (N, M)."""
    b = c[key][i]
    return b[j] if isinstance(b, (list, tuple)) else b


def exhaustive(c: dict) -> tuple[float, float]:
    """(least latency, least bottleneck) over every plan: every ordered sequence of distinct devices
    starting at device 0, every contiguous split of the units; inf when nothing fits."""
    n, m = len(c["compute"]), len(c["compute"][0])
    memory = [INF if x is None else x for x in c["device_memory"]]
    best = [INF, INF]

    step = c.get("stage_s") or [0.0] * m

    def go(first, dev, used, lat, bot):
        comp, mem = step[dev], 0
        for last in range(first, n):
            comp += c["compute"][last][dev]
            mem += _bytes(c, last, dev)
            if mem > memory[dev]:
                break  # bytes only grow with the shard
            nbytes = _bytes(c, last, dev, "out_bytes")
            if last == n - 1:
                back = _transfer(c, dev, 0, nbytes)
                best[0] = min(best[0], lat + comp + back)
                best[1] = min(best[1], max(bot, comp, back))
            else:
                for nxt in range(1, m):
                    if nxt not in used:
                        send = _transfer(c, dev, nxt, nbytes)
                        go(last + 1, nxt, used | {nxt}, lat + comp + send, max(bot, comp, send))

    go(0, 0, frozenset([0]), 0.0, 0.0)
    return best[0], best[1]


def evaluate(c: dict, plan: Plan) -> tuple[float, float, bool]:
    """(latency, bottleneck, fits) of a plan, straight from the definitions."""
    n = len(c["compute"])
    memory = [INF if x is None else x for x in c["device_memory"]]
    lat, bot, fits = 0.0, 0.0, True
    for s, nxt in zip(plan.stages, list(plan.stages[1:]) + [None]):
        comp = (c.get("stage_s") or [0.0] * len(c["device_memory"]))[s.rank] + sum(c["compute"][i][s.rank] for i in s.units)
        send = _transfer(c, s.rank, nxt.rank if nxt else 0, _bytes(c, s.last, s.rank, "out_bytes"))
        lat += comp + send
        bot = max(bot, comp, send)
        fits &= sum(_bytes(c, i, s.rank) for i in s.units) <= memory[s.rank]
    assert sum(len(s.units) for s in plan.stages) == n
    return lat, bot, fits


# --- random instances ------------------------------------------------------------------------------

def random_problem(rng: random.Random, max_devices: int = 6, max_units: int = 12) -> dict:
    """A random problem whose devices come in types (clones share compute, memory and links), with
    asymmetric links, integer or float times, and memories from unlimited to too small."""
    m = rng.randint(1, max_devices)
    n = rng.randint(1, max_units)
    n_types = rng.randint(1, m)
    kind = [rng.randrange(n_types) for _ in range(m)]  # device 0 may have clones too
    integer_times = rng.random() < 0.3  # ties between plans
    unit_bytes = [rng.randint(1, 20) for _ in range(n)]
    total = sum(unit_bytes)

    speed = [rng.choice([0.5, 1, 2, 5, 10]) for _ in range(n_types)]
    compute_of_type = [[float(rng.randint(1, 5)) if integer_times else rng.uniform(0.1, 2.0) / speed[t]
                        for t in range(n_types)] for _ in range(n)]
    memory_of_type = []
    for _ in range(n_types):
        r = rng.random()
        if r < 0.15:
            memory_of_type.append(None)
        elif r < 0.35:
            memory_of_type.append(total + rng.randint(0, 5))
        elif r < 0.9:
            memory_of_type.append(rng.randint(max(unit_bytes), max(max(unit_bytes), total // 2)))
        else:
            memory_of_type.append(rng.randint(0, max(unit_bytes)))  # may fit nothing
    bw = [[rng.choice([1.0, 5.0, 20.0, 100.0, INF]) for _ in range(n_types)] for _ in range(n_types)]
    lt = [[float(rng.randint(0, 2)) if integer_times else rng.choice([0.0, 0.01, 0.3]) for _ in range(n_types)]
          for _ in range(n_types)]
    problem = {
        "compute": [[compute_of_type[i][kind[j]] for j in range(m)] for i in range(n)],
        "unit_bytes": unit_bytes,
        "device_memory": [memory_of_type[kind[j]] for j in range(m)],
        "out_bytes": [rng.randint(0, 10) for _ in range(n)],
        "bandwidth": [[bw[kind[k]][kind[j]] for j in range(m)] for k in range(m)],
        "latency": [[lt[kind[k]][kind[j]] for j in range(m)] for k in range(m)],
    }
    if rng.random() < 0.4:  # a step cost per stage, by type: long stages pay it once
        step = [rng.choice([0.0, 0.05, 0.5, 2.0]) for _ in range(n_types)]
        problem["stage_s"] = [step[kind[j]] for j in range(m)]
    if m > 2 and rng.random() < 0.2:
        # break one clone's symmetry by one link, so near-identical devices must stay apart
        k, j = rng.sample(range(m), 2)
        problem["latency"][k][j] += 0.5
    return problem


def per_device_bytes(rng: random.Random, p: dict) -> dict:
    """The problem with each device holding units in a dtype of its own: unit bytes and what it sends
    scaled per device (int8 ~ 1/4, bf16 1/2, fp32 1, by powers of two so sums stay exact). Clones
    mostly share their scales, so types still merge; sometimes one clone alone differs, and must not."""
    n, m = len(p["compute"]), len(p["device_memory"])
    kinds: dict = {}
    scale = []  # (unit bytes, out bytes) per device
    for j in range(m):
        key = (tuple(row[j] for row in p["compute"]), p["device_memory"][j])
        scale.append(kinds.setdefault(key, (rng.choice([0.25, 0.5, 1.0]), rng.choice([0.5, 1.0]))))
    if m > 1 and rng.random() < 0.3:
        scale[rng.randrange(m)] = (rng.choice([0.25, 0.5, 1.0, 2.0]), rng.choice([0.5, 1.0, 2.0]))
    return p | {"unit_bytes": [[p["unit_bytes"][i] * scale[j][0] for j in range(m)] for i in range(n)],
                "out_bytes": [[p["out_bytes"][i] * scale[j][1] for j in range(m)] for i in range(n)]}


@pytest.mark.parametrize("bytes_per_device", [False, True], ids=["bytes", "bytes-per-device"])
def test_dps_match_exhaustive_search_on_random_problems(bytes_per_device):
    rng = random.Random(20240514)
    infeasible = feasible = 0
    for case in range(400):
        p = random_problem(rng)
        if bytes_per_device:
            p = per_device_bytes(rng, p)
        costs = Costs(**p)
        best_latency, best_bottleneck = exhaustive(p)
        if math.isinf(best_latency):
            infeasible += 1
            for dp in (plan_latency, plan_throughput):
                with pytest.raises(PlanError, match="does not fit"):
                    dp(costs)
            continue
        feasible += 1
        lat_plan, thr_plan = plan_latency(costs), plan_throughput(costs)
        for plan, key, best, index in [(lat_plan, "latency_s", best_latency, 0),
                                       (thr_plan, "bottleneck_s", best_bottleneck, 1)]:
            lat, bot, fits = evaluate(p, plan)
            assert fits, (case, plan)
            assert plan.stages[0] == Stage(0, 0, plan.stages[0].last), (case, plan)
            assert (lat, bot)[index] == approx(best), (case, key, plan, p)
            assert predict(costs, plan)[key] == approx(best), (case, key)
            assert predict(costs, plan)["fits"]
        # the optimum is no worse than any baseline that fits
        for baseline in (edge_solo, even_split, memory_proportional, cloud_edge_even,
                         lambda c: cloud_edge_opt(c, "latency"), lambda c: cloud_edge_opt(c, "throughput")):
            try:
                b = predict(costs, baseline(costs))
            except PlanError:
                continue
            assert b["fits"]
            assert best_latency <= b["latency_s"] + 1e-9
            assert best_bottleneck <= b["bottleneck_s"] + 1e-9
    assert infeasible > 20 and feasible > 200, (infeasible, feasible)  # both kinds were exercised


def test_types_merge_clones_but_not_the_source_or_near_clones():
    p = {
        "compute": [[1.0, 1.0, 1.0, 1.0, 2.0]] * 3,
        "unit_bytes": [1, 1, 1],
        "device_memory": [10, 10, 10, 10, 10],
        "out_bytes": [1, 1, 1],
        "bandwidth": [[10.0] * 5 for _ in range(5)],
        "latency": [[0.1] * 5 for _ in range(5)],
    }
    assert planner._device_types(Costs(**p)) == [[0], [1, 2, 3], [4]]
    p["latency"][3][4] = 0.2  # device 3 now differs from 1 and 2 in one link
    assert planner._device_types(Costs(**p)) == [[0], [1, 2], [3], [4]]
    p["latency"][3][4] = 0.1
    p["unit_bytes"] = [[1, 1, 0.5, 1, 1]] * 3  # device 2 holds its units in half the bytes (bf16)
    assert planner._device_types(Costs(**p)) == [[0], [1, 3], [2], [4]]
    p["out_bytes"] = [[1, 1, 1, 0.5, 1]] * 3  # device 3 sends in half the bytes
    assert planner._device_types(Costs(**p)) == [[0], [1], [2], [3], [4]]


def test_what_a_device_sends_is_counted_in_its_own_dtype():
    # units 1..4 take both other devices, two units each, over a slow link between them; device 2
    # sends its activations in half the bytes (bf16), so the optimum puts it first, sending
    p = {
        "compute": [[1.0, 0.1, 0.1]] * 5,
        "unit_bytes": [1] * 5,
        "device_memory": [1, 2, 2],
        "out_bytes": [[100, 100, 50]] * 4 + [[8, 8, 8]],
        "bandwidth": [[INF] * 3, [INF, INF, 10.0], [INF, 10.0, INF]],
        "latency": [[0.0] * 3 for _ in range(3)],
    }
    costs = Costs(**p)
    for dp in (plan_latency, plan_throughput):
        assert dp(costs).stages == (Stage(0, 0, 0), Stage(2, 1, 2), Stage(1, 3, 4))
    assert predict(costs, plan_latency(costs))["stage_send_s"] == [0.0, approx(5.0), 0.0]


def test_a_device_that_fits_the_model_only_in_its_own_dtype_gets_it():
    # the source holds the embedding only; the fast device 1 holds the rest only in int8 (a quarter
    # of the bytes), the roomy device 2 is slow: the plan puts units 1..4 on device 1
    fp32 = [8, 8, 8, 8, 8]
    p = {
        "compute": [[1.0, 0.1, 1.0]] * 5,
        "unit_bytes": [[b, b / 4, b] for b in fp32],
        "device_memory": [8, 10, None],
        "out_bytes": [0] * 5,
        "bandwidth": [[INF] * 3 for _ in range(3)],
        "latency": [[0.0] * 3 for _ in range(3)],
    }
    for dp in (plan_latency, plan_throughput):
        assert dp(Costs(**p)).stages == (Stage(0, 0, 0), Stage(1, 1, 4))
    assert predict(Costs(**p), plan_latency(Costs(**p)))["stage_bytes"] == [8, 8]
    # counted in fp32 everywhere, device 1 holds one unit, and the slow device takes the rest
    p32 = p | {"unit_bytes": fp32}
    assert sorted((s.rank, len(s.units)) for s in plan_latency(Costs(**p32)).stages) == [(0, 1), (1, 1), (2, 3)]
    with pytest.raises(PlanError, match="device 1 would hold units 1..4 = 32 bytes but offers 10 bytes"):
        planner._make_plan(Costs(**p32), [(0, 0, 0), (1, 1, 4)], "manual")


def test_memory_forces_shards_the_greedy_would_miss():
    # Two fast devices that each hold 2 units and one slow roomy one: the optimum spreads units
    # 1..4 over both fast devices, which needs both in the state.
    p = {
        "compute": [[1.0, 0.1, 0.1, 5.0]] * 5,
        "unit_bytes": [1, 1, 1, 1, 1],
        "device_memory": [1, 2, 2, None],
        "out_bytes": [0, 0, 0, 0, 0],
        "bandwidth": [[INF] * 4 for _ in range(4)],
        "latency": [[0.0] * 4 for _ in range(4)],
    }
    costs = Costs(**p)
    plan = plan_latency(costs)
    assert predict(costs, plan)["latency_s"] == approx(1.4)
    assert sorted(len(s.units) for s in plan.stages[1:]) == [2, 2]
    assert predict(costs, plan_throughput(costs))["bottleneck_s"] == approx(1.0)


# --- baselines ------------------------------------------------------------------------------------

def uniform_problem(n: int, m: int, memory=None, compute=None) -> dict:
    return {
        "compute": [[(compute or [1.0] * m)[j] for j in range(m)] for _ in range(n)],
        "unit_bytes": [10] * n,
        "device_memory": memory or [None] * m,
        "out_bytes": [4] * n,
        "bandwidth": [[100.0] * m for _ in range(m)],
        "latency": [[0.01] * m for _ in range(m)],
    }


def test_edge_solo_on_a_roomy_source():
    costs = Costs(**uniform_problem(6, 3, memory=[60, 10, 10]))
    plan = edge_solo(costs)
    assert plan.stages == (Stage(0, 0, 5),) and plan.objective == "edge_solo"
    assert predict(costs, plan)["latency_s"] == approx(6.0)  # no transfer: the source keeps the output
    assert predict(costs, plan)["bottleneck_s"] == approx(6.0)


def test_even_split_shapes():
    costs = Costs(**uniform_problem(10, 3))
    plan = even_split(costs)
    assert [(s.rank, s.first, s.last) for s in plan.stages] == [(0, 0, 3), (1, 4, 6), (2, 7, 9)]
    assert plan.objective == "even_split"
    # more devices than units: the extra devices take no part
    assert even_split(Costs(**uniform_problem(2, 4))).ranks == [0, 1]


def test_memory_proportional_proportions():
    plan = memory_proportional(Costs(**uniform_problem(8, 3, memory=[100, 100, 200])))
    assert [len(s.units) for s in plan.stages] == [2, 2, 4]
    assert plan.objective == "memory_proportional"
    # a device with no memory takes no part; the source keeps unit 0 even with a tiny share
    plan = memory_proportional(Costs(**uniform_problem(8, 3, memory=[10, 0, 1000])))
    assert [(s.rank, s.first, s.last) for s in plan.stages] == [(0, 0, 0), (2, 1, 7)]
    with pytest.raises(PlanError, match=r"unlimited"):
        memory_proportional(Costs(**uniform_problem(8, 2, memory=[100, None])))


def test_cloud_edge_baselines():
    # device 2 is the fastest ("cloud"), behind a slow link
    p = uniform_problem(6, 3, compute=[1.0, 0.8, 0.1])
    costs = Costs(**p)
    assert cloud_device(costs) == 2
    assert [(s.rank, s.first, s.last) for s in cloud_edge_even(costs).stages] == [(0, 0, 2), (2, 3, 5)]
    # cloud_edge_opt is the best of all splits, found here by hand
    for objective, key in [("latency", "latency_s"), ("throughput", "bottleneck_s")]:
        plan = cloud_edge_opt(costs, objective)
        splits = [Plan((Stage(0, 0, s - 1),) + ((Stage(2, s, 5),) if s < 6 else ()), 6) for s in range(1, 7)]
        assert predict(costs, plan)[key] == approx(min(predict(costs, q)[key] for q in splits))
    # with a very slow link to the cloud, the best split keeps everything on the source
    p["latency"] = [[100.0] * 3 for _ in range(3)]
    assert cloud_edge_opt(Costs(**p)).stages == (Stage(0, 0, 5),)
    with pytest.raises(PlanError, match="second device"):
        cloud_edge_even(Costs(**uniform_problem(4, 1)))


# --- the paper's testbed shape --------------------------------------------------------------------

def make_testbed(n_blocks: int = 32) -> Costs:
    """15 devices like the paper's: source (an AGX Orin), 11 more AGX Orin, 2 Orin NX, one RTX 3090;
    Llama2-7B-like per-unit decode times and memory, 50 Mbps links, 2.1 ms latency."""
    ms, gb = 1e-3, 1e9
    kinds = ["agx"] * 12 + ["nx"] * 2 + ["3090"]
    per_unit = {"agx": (0.627, 5.3, 4.48), "nx": (0.476, 6.0, 5.48), "3090": (0.077, 0.8, 0.648)}
    memory = {"agx": 29 * gb, "nx": 14 * gb, "3090": 22 * gb}
    n = n_blocks + 2
    compute = [[per_unit[k][0 if i == 0 else 2 if i == n - 1 else 1] * ms for k in kinds] for i in range(n)]
    m = len(kinds)
    bw = [[50e6 / 8] * m for _ in range(m)]
    bw[0][m - 1] = bw[m - 1][0] = 1e6 / 8  # the source-to-cloud links are the slow ones
    return Costs(compute=compute, unit_bytes=[0.488 * gb] + [0.754 * gb] * (n - 1),
                 device_memory=[memory[k] for k in kinds], out_bytes=[4096 * 4] * n,
                 bandwidth=bw, latency=[[2.1 * ms] * m for _ in range(m)], device_names=kinds)


def test_testbed_dps_beat_the_baselines():
    costs = make_testbed()
    assert [len(t) for t in planner._device_types(costs)] == [1, 11, 2, 1]
    lat = predict(costs, plan_latency(costs))
    thr = predict(costs, plan_throughput(costs))
    for baseline in (edge_solo, cloud_edge_even, cloud_edge_opt, even_split, memory_proportional):
        try:
            b = predict(costs, baseline(costs))
        except PlanError:
            continue  # 28 GB does not fit on every shape
        assert lat["latency_s"] <= b["latency_s"] + 1e-12
        assert thr["bottleneck_s"] <= b["bottleneck_s"] + 1e-12
    assert thr["bottleneck_s"] < lat["latency_s"]


# --- errors ---------------------------------------------------------------------------------------

def test_infeasible_message_gives_the_numbers():
    p = uniform_problem(5, 2, memory=[120, 130])
    p["unit_bytes"] = [50, 50, 50, 150, 50]  # 350 bytes; unit 3 fits nowhere
    costs = Costs(**p)
    for dp in (plan_latency, plan_throughput):
        with pytest.raises(PlanError) as e:
            dp(costs)
        msg = str(e.value)
        assert "350 bytes" in msg and "250 bytes" in msg, msg  # needed, offered
        assert "unit 3 (150 bytes" in msg and "device 1 with 130 bytes" in msg, msg
        assert "100 bytes" in msg and "short" in msg, msg
    with pytest.raises(PlanError) as e:
        edge_solo(costs)
    assert "device 0 would hold units 0..4 = 350 bytes" in str(e.value) and "120 bytes" in str(e.value)
    with pytest.raises(PlanError) as e:
        cloud_edge_opt(costs)
    assert "first 2 unit(s)" in str(e.value) and "last 1" in str(e.value)


def test_source_must_hold_unit_zero():
    p = uniform_problem(3, 2, memory=[5, None])
    with pytest.raises(PlanError, match=r"unit 0 \(10 bytes.*source device 0, which offers 5 bytes"):
        plan_latency(Costs(**p))


def test_fragmentation_message():
    # 18 bytes on 20 bytes of memory, but no contiguous cut fits two devices
    p = uniform_problem(3, 2, memory=[10, 10])
    p["unit_bytes"] = [6, 6, 6]
    with pytest.raises(PlanError, match="contiguous shards"):
        plan_throughput(Costs(**p))


def test_costs_validation():
    p = uniform_problem(3, 2)
    with pytest.raises(PlanError, match=r"unit_bytes has 2 entries, expected 3"):
        Costs(**(p | {"unit_bytes": [1, 2]}))
    with pytest.raises(PlanError, match=r"unit_bytes\[1\] has 1 entries, expected 2"):
        Costs(**(p | {"unit_bytes": [[1, 2], [1], [1, 2]]}))
    with pytest.raises(PlanError, match=r"unit_bytes\[2\]\[0\] = -1.0"):
        Costs(**(p | {"unit_bytes": [[1, 2], [1, 2], [-1, 2]]}))
    with pytest.raises(PlanError, match="not a mix"):
        Costs(**(p | {"unit_bytes": [[1, 2], 1, 1]}))
    assert Costs(**(p | {"unit_bytes": [[1, 2]] * 3})).bytes_on(1) == (2.0, 2.0, 2.0)
    with pytest.raises(PlanError, match=r"out_bytes\[0\]\[1\] = -4.0"):
        Costs(**(p | {"out_bytes": [[4, -4]] * 3}))
    assert Costs(**(p | {"out_bytes": [[4, 2]] * 3})).out_bytes_on(1) == (2.0, 2.0, 2.0)
    with pytest.raises(PlanError, match=r"bandwidth\[0\]\[1\] = 0.0"):
        Costs(**(p | {"bandwidth": [[1.0, 0.0], [1.0, 1.0]]}))
    with pytest.raises(PlanError, match=r"compute\[2\]\[1\] = -1.0"):
        Costs(**(p | {"compute": [[1.0, 1.0], [1.0, 1.0], [1.0, -1.0]]}))
    costs = Costs(**p)
    assert costs.transfer(0, 0, 1e9) == 0.0
    assert costs.transfer(0, 1, 4) == approx(0.01 + 4 / 100)
    assert costs.device_memory == (INF, INF)
    with pytest.raises(PlanError, match="costs have 2 device"):
        predict(costs, Plan((Stage(0, 0, 0), Stage(5, 1, 2)), 3))


def test_single_device_and_single_unit():
    costs = Costs(**uniform_problem(1, 3))
    assert plan_latency(costs).stages == (Stage(0, 0, 0),)
    assert plan_throughput(costs).stages == (Stage(0, 0, 0),)
    costs = Costs(**uniform_problem(4, 1, memory=[40]))
    assert plan_throughput(costs).stages == (Stage(0, 0, 3),)


def test_too_many_distinct_devices_is_refused_with_the_numbers():
    m = 30  # all different: 2^29 count vectors
    p = uniform_problem(2, m, compute=[1.0 + j for j in range(m)])
    with pytest.raises(PlanError, match=r"30 devices in 30 types .* table cells"):
        plan_latency(Costs(**p))


def test_confidence_names_the_runner_up_a_spread_would_crown():
    # latency, 4 units: the board holds all (4.0 s) against the server's 1.05 s a unit and a hop of
    # 0.01 + 4/100 s each way. Within 1% the plan stays best. Within 10%, with the board 10% slower
    # and the server 10% faster, the board keeping the embedding and the server the rest wins:
    # 1.1 + 0.05 + 3 x 0.945 + 0.05 = 4.035 s, against the plan's 4.4 s.
    from edgeshard_mpi.confidence import confidence

    c = Costs(**uniform_problem(4, 2, compute=[1.0, 1.05]), device_names=["board", "server"])
    plan = planner.plan_for(c, "latency")
    assert [(s.rank, s.first, s.last) for s in plan.stages] == [(0, 0, 3)]
    sure = confidence(c, plan, [0.01, 0.01], "latency")
    assert sure.runner_up is None and sure.describe(["board", "server"]).startswith("sure")
    unsure = confidence(c, plan, [0.1, 0.1], "latency")
    assert [(s.rank, s.first, s.last) for s in unsure.runner_up.stages] == [(0, 0, 0), (1, 1, 3)]
    assert unsure.loss == approx(4.4 / 4.035 - 1)
    assert "board slower by its spread" in unsure.describe(["board", "server"])
    # a profile without spreads cannot say
    unknown = confidence(c, plan, [0.1, None], "latency")
    assert not unknown.known and "has no spread for server" in unknown.describe(["board", "server"])
