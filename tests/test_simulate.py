"""The schedule simulator against hand-worked timelines, the planner's closed forms, and its own invariants."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest

from edgeshard_mpi.planner import Plan, Stage, plan_for, predict
from edgeshard_mpi.profiler import Profile, ProfileError
from edgeshard_mpi.simulate import Request, StageLine, StepCosts, simulate, uniform_requests

ROOT = Path(__file__).resolve().parents[1]


def _two_stages(bandwidth=math.inf, latency=0.001) -> StepCosts:
    # stage 0: decode 10 ms, prefill of 5 tokens 30 ms; stage 1: decode 20 ms, prefill 60 ms
    return StepCosts(decode_s=(0.010, 0.020), prefill_s=(0.030, 0.060), prompt_tokens=5,
                     out_bytes=(1000.0, 8.0), latency=(latency, latency), bandwidth=(bandwidth, bandwidth))


def test_one_request_by_hand():
    sim = simulate(_two_stages(), [Request(5, 3)], micro_batch_size=1, schedule="sequential", trace=True)
    # prefill: 30 + 1 + 60 + 1 = 92 ms to the first token; each decode step 10 + 1 + 20 + 1 = 32 ms
    assert sim.ttft_ms == pytest.approx(92.0)
    assert sim.ms_per_token == pytest.approx(32.0)
    assert sim.seconds == pytest.approx(0.092 + 2 * 0.032)
    assert sim.tokens == 3
    assert [(e["rank"], e["name"], round(e["ts"] * 1e3, 6)) for e in sim.events] == [
        (0, "prefill", 0.0), (1, "prefill", 31.0), (0, "decode", 92.0), (1, "decode", 103.0),
        (0, "decode", 124.0), (1, "decode", 135.0)]


def test_prefill_interpolates_between_decode_and_profiled_prefill():
    c = _two_stages()
    assert c.compute(0, 1) == pytest.approx(0.010)
    assert c.compute(0, 5) == pytest.approx(0.030)
    assert c.compute(0, 3) == pytest.approx(0.020)


def test_a_step_of_fewer_rows_costs_less_by_their_tokens():
    # profiled at 4 rows: decode 10 ms, prefill of 4 x 5 tokens 30 ms, so 20 ms / 16 tokens = 1.25 ms a token
    c = dataclasses.replace(_two_stages(), rows=4)
    assert c.compute(0, 1) == pytest.approx(0.010) == c.compute(0, 1, 4)
    assert c.compute(0, 1, 1) == pytest.approx(0.010 - 3 * 0.00125)
    assert c.compute(0, 5, 2) == pytest.approx(0.010 + 0.00125 * (10 - 4))
    assert c.compute(0, 1, 0) >= 0.0


def test_a_prefill_measured_below_its_decode_never_makes_longer_prompts_cheaper():
    # a short prompt's prefill within the noise of the decode, below it: each token more costs nothing,
    # not less than nothing (a longer prompt once came out at 0 s, and its time to first token at 0 ms)
    line = StageLine(0.056, 0.010, 2, 2)
    assert line.seconds(2 * 2) == pytest.approx(0.056) == line.seconds(2 * 200)


def test_a_decode_costs_each_row_its_kv_columns_against_the_profiles_context():
    # profiled at 256 columns; full-attention blocks 10 us a row per column, sliding ones (window 64) 20 us
    line = StageLine(0.010, 0.030, 4, 5, context=256, kv_s=((None, 1e-5), (64, 2e-5)))
    assert line.seconds(4, 256) == pytest.approx(line.seconds(4))  # at the profile's context: its time
    assert line.seconds(4, 512) == pytest.approx(0.010 + 4 * 256 * 1e-5)  # the window's layers read no more
    assert line.seconds(2, 32) == pytest.approx(line.seconds(2) + 2 * (1e-5 * (32 - 256) + 2e-5 * (32 - 64)))
    assert line.seconds(20) == pytest.approx(0.030)  # a prefill (no columns): the profile's line alone
    assert StageLine(0.010, 0.030, 4, 5).seconds(4, 4096) == pytest.approx(0.010)  # not measured: no term


def test_a_prefill_costs_each_token_its_rows_width_against_the_profiles_prompt():
    # profiled at prompts of 5 tokens; full-attention blocks 1 us a token per column of width, sliding
    # ones (window 8) 2 us
    line = StageLine(0.010, 0.030, 4, 5, context=8, prefill_kv_s=((None, 1e-6), (8, 2e-6)))
    assert line.seconds(20, 0, 5) == pytest.approx(line.seconds(20))  # at the profile's prompt: its line
    assert line.seconds(2 * 40, 0, 40) == pytest.approx(line.seconds(80) + 80 * (1e-6 * 35 + 2e-6 * 3))
    assert line.seconds(3 * 2, 0, 2) == pytest.approx(line.seconds(6) - 6 * 3 * (1e-6 + 2e-6))  # shorter: less
    assert line.seconds(4, 40, 1) == pytest.approx(line.seconds(4, 40))  # a decode: its columns' term alone
    assert StageLine(0.010, 0.030, 4, 5).seconds(80, 0, 40) == pytest.approx(StageLine(0.010, 0.030, 4, 5).seconds(80))
    # the simulator costs a fresh step's prefill at its width: one request of 40 prompt tokens
    base = StepCosts(decode_s=(0.010,), prefill_s=(0.030,), prompt_tokens=5, out_bytes=(8.0,), latency=(0.0,),
                     bandwidth=(math.inf,))
    wide = dataclasses.replace(base, prefill_kv_s=(((None, 1e-6),),))
    plain, long = (simulate(c, [Request(40, 1)], micro_batch_size=1) for c in (base, wide))
    assert long.seconds == pytest.approx(plain.seconds + 40 * 35 * 1e-6)


def test_a_decode_of_fewer_rows_runs_on_the_line_from_one_row_to_the_profiles():
    # profiled at 4 rows: a decode of 4 rows 10 ms, of one row 4 ms; a prefill of 4 x 5 tokens 30 ms
    line = StageLine(0.010, 0.030, 4, 5, context=8, one_s=0.004)
    assert [line.seconds(r, 8) for r in (1, 2, 4)] == pytest.approx([0.004, 0.006, 0.010])
    assert line.seconds(20) == pytest.approx(0.030)  # prefills keep the line through decode and prefill
    assert line.seconds(1) == pytest.approx(0.010 - 3 * 0.00125)
    assert StageLine(0.010, 0.030, 4, 5, context=8).seconds(1, 8) == pytest.approx(line.seconds(1))  # not measured


def test_a_decode_of_fewer_rows_follows_the_shape_its_blocks_were_timed_in():
    # the same stage with its blocks timed at each of 1..4 rows: 2 rows 70% of the way from one row's
    # cost to 4 rows', 3 rows past 4 rows' own (a form slower at 3 than at 4, as fewrows can leave it)
    line = StageLine(0.010, 0.030, 4, 5, context=8, one_s=0.004)
    shaped = dataclasses.replace(line, row_shape=(0.0, 0.7, 1.2, 1.0))
    assert [shaped.seconds(r, 8) for r in (1, 2, 3, 4)] == pytest.approx([0.004, 0.0082, 0.0112, 0.010])
    assert shaped.seconds(20) == line.seconds(20) and shaped.seconds(8, 0, 2) == line.seconds(8, 0, 2)  # prefills
    assert shaped.seconds(6, 8) == pytest.approx(line.seconds(6, 8))  # past the rows timed: the line, as before
    # from a profile: the blocks' step at each count, as shares of the way; none where not timed,
    # or where the micro-batch came out no dearer than one row
    units = [{"name": n, "param_bytes": 1, "kv_bytes_per_token": 0, "out_bytes_per_token": 4}
             for n in ("embed", "block.0", "head")]
    times = {"decode_s": [0.001] * 3, "prefill_s": [0.002] * 3, "decode_one_s": [0.0005] * 3}
    prof = Profile(model={"name": "m", "fingerprint": "f", "num_units": 3}, units=units,
                   devices=[{"name": "a", **times, "decode_rows_s": [0.002, 0.0035, 0.0044, 0.004]},
                            {"name": "b", **times, "decode_rows_s": [0.004, 0.0035, 0.0044, 0.004]},
                            {"name": "old", **times}],
                   bandwidth=[[None] * 3] * 3, latency=[[0.0] * 3] * 3,
                   shapes={"prompt_tokens": 4, "context": 16, "micro_batch_size": 4})
    assert prof.row_shape(0) == pytest.approx((0.0, 0.75, 1.2, 1.0))
    assert prof.row_shape(1) is None and prof.row_shape(2) is None
    sc = StepCosts.from_profile(prof, Plan((Stage(0, 0, 1), Stage(1, 2, 2)), 3))
    assert sc.line(0).row_shape == pytest.approx((0.0, 0.75, 1.2, 1.0)) and sc.line(1).row_shape is None
    with pytest.raises(ProfileError, match=r"decode_rows_s has 4 entries, expected micro_batch_size 2"):
        dataclasses.replace(prof, shapes={**prof.shapes, "micro_batch_size": 2})


def test_the_simulator_costs_each_decode_step_at_its_slots_columns():
    # one request of 5 prompt tokens and 4 new ones on one stage, profiled at a context of 5 columns:
    # its decode steps attend over 6, 7 and 8 columns, 1 + 2 + 3 past the profile's, 1 ms each
    base = StepCosts(decode_s=(0.010,), prefill_s=(0.030,), prompt_tokens=5, out_bytes=(8.0,), latency=(0.0,),
                     bandwidth=(math.inf,))
    costs = dataclasses.replace(base, context=5, kv_s=(((None, 0.001),),))
    plain, long = (simulate(c, [Request(5, 4)], micro_batch_size=1) for c in (base, costs))
    assert plain.seconds == pytest.approx(0.030 + 3 * 0.010)
    assert long.seconds == pytest.approx(plain.seconds + 0.006)


def test_a_profile_gives_each_stage_its_kv_bytes_times_its_devices_seconds_a_byte():
    units = [{"name": "embed", "param_bytes": 1, "kv_bytes_per_token": 0, "out_bytes_per_token": 4},
             {"name": "block.0", "param_bytes": 1, "kv_bytes_per_token": 100, "out_bytes_per_token": 4},
             {"name": "block.1", "param_bytes": 1, "kv_bytes_per_token": 100, "out_bytes_per_token": 4,
              "kv_window": 8},
             {"name": "head", "param_bytes": 1, "kv_bytes_per_token": 0, "out_bytes_per_token": 4}]
    times = {"decode_s": [0.001] * 4, "prefill_s": [0.002] * 4}
    prof = Profile(model={"name": "m", "fingerprint": "f", "num_units": 4}, units=units,
                   devices=[{"name": "a", **times, "decode_kv_s": 1e-6, "decode_step_s": 0.0005,
                             "decode_one_s": [0.0006, 0.0007, 0.0008, None]},
                            {"name": "b", **times, "decode_kv_s": 1e-6, "param_bytes": [1] * 4,
                             "kv_bytes_per_token": [0, 50, 50, 0], "out_bytes_per_token": [2] * 4},
                            {"name": "old", **times}],
                   bandwidth=[[None] * 3] * 3, latency=[[0.0] * 3] * 3,
                   shapes={"prompt_tokens": 4, "context": 16, "micro_batch_size": 2})
    assert prof.context_costs(0, 0, 3) == (pytest.approx((None, 1e-4)), pytest.approx((8, 1e-4)))
    assert prof.context_costs(1, 1, 1) == (pytest.approx((None, 5e-5)),)  # its own dtype's bytes
    assert prof.context_costs(0, 0, 0) == () == prof.context_costs(2, 0, 3)  # no blocks; not measured
    assert prof.context_costs(0, 0, 3, "prefill_kv_s") == ()  # a prefill's width: not measured
    prof.devices[0]["prefill_kv_s"] = 2e-8
    assert prof.context_costs(0, 0, 3, "prefill_kv_s") == (pytest.approx((None, 2e-6)), pytest.approx((8, 2e-6)))
    # one row: the step cost once, and each unit's time past it; a unit not timed, or a device
    # profiled before one-row steps were, gives none
    assert prof.one_row_s(0, 0, 2) == pytest.approx(0.0005 + 0.0001 + 0.0002 + 0.0003)
    assert prof.one_row_s(0, 2, 3) is None and prof.one_row_s(2, 0, 1) is None
    prof.devices[0]["decode_one_step_s"] = 0.0004  # measured at one row: it stands for the step cost there
    assert prof.one_row_s(0, 0, 2) == pytest.approx(0.0004 + 0.0002 + 0.0003 + 0.0004)
    del prof.devices[0]["decode_one_step_s"]
    sc = StepCosts.from_profile(prof, Plan((Stage(0, 0, 1), Stage(1, 2, 3)), 4))
    assert sc.context == 16 and sc.line(0).kv_s == (pytest.approx((None, 1e-4)),)
    assert sc.one_s == (pytest.approx(0.0008), None)
    # stage 1's block slides over 8 columns: 40 columns cost what 16 do, 4 cost 2 rows x 4 columns less
    assert sc.compute(1, 1, 2, 40) == pytest.approx(sc.compute(1, 1, 2, 16))
    assert sc.compute(1, 1, 2, 4) == pytest.approx(sc.compute(1, 1, 2, 16) - 2 * 4 * 5e-5)


def test_no_bubbles_reaches_the_bottleneck_rate():
    c = _two_stages()
    sim = simulate(c, uniform_requests(8, 5, 400), micro_batch_size=1, schedule="no-bubbles", in_flight=8)
    # the 20 ms stage is the bottleneck: at most 50 steps (tokens) per second, and close to it
    assert sim.tokens_per_s <= 50.0 + 1e-9
    assert sim.tokens_per_s > 0.97 * 50.0
    assert sim.busy[1] > 0.97


def test_schedules_order_and_bubbles():
    c = _two_stages()
    reqs = uniform_requests(8, 5, 50)
    seq, bub, nob = (simulate(c, reqs, micro_batch_size=1, schedule=s, in_flight=4)
                     for s in ("sequential", "bubbles", "no-bubbles"))
    assert seq.tokens_per_s < bub.tokens_per_s <= nob.tokens_per_s
    assert seq.bubble_share > bub.bubble_share >= nob.bubble_share
    # every schedule runs the same work
    assert seq.tokens == bub.tokens == nob.tokens == 400


def test_a_slow_link_limits_throughput():
    # 1000 bytes per step on a 10 kB/s link: 0.1 s per step whatever the compute
    c = _two_stages(bandwidth=10_000.0, latency=0.0)
    sim = simulate(c, uniform_requests(8, 1, 200), micro_batch_size=1, schedule="no-bubbles", in_flight=8)
    assert sim.tokens_per_s == pytest.approx(10.0, rel=0.03)
    assert sim.tokens_per_s <= 10.0 + 1e-9


def test_rows_leave_and_slots_take_new_prompts():
    c = _two_stages()
    reqs = [Request(5, n) for n in (1, 7, 3, 3, 0, 9, 2)]  # a request with no tokens to make is not run
    sim = simulate(c, reqs, micro_batch_size=2, schedule="no-bubbles", in_flight=2, trace=True, admission="batch")
    assert sim.requests == 6
    assert sim.tokens == 25
    prefills = [e for e in sim.events if e["name"] == "prefill" and e["rank"] == 0]
    assert len(prefills) == 3  # micro-batches of (1, 7), (3, 3), (9, 2)
    # stage 0 steps: each micro-batch runs as many steps as its longest row
    assert len([e for e in sim.events if e["rank"] == 0]) == 7 + 3 + 9
    for r in (0, 1):  # a stage does one thing at a time
        spans = sorted((e["ts"], e["ts"] + e["dur"]) for e in sim.events if e["rank"] == r)
        assert all(a[1] <= b[0] + 1e-12 for a, b in zip(spans, spans[1:]))
    busy = [sum(e["dur"] for e in sim.events if e["rank"] == r) / sim.seconds for r in (0, 1)]
    assert sim.busy == pytest.approx(busy)
    # row admission: a finished row's place takes the next prompt at once, so fewer, fuller steps
    row = simulate(c, reqs, micro_batch_size=2, schedule="no-bubbles", in_flight=2, trace=True)
    assert (row.requests, row.tokens) == (6, 25)
    assert row.rows_per_step > sim.rows_per_step
    assert len([e for e in row.events if e["rank"] == 0]) < 7 + 3 + 9
    assert row.seconds < sim.seconds


def test_a_prompt_joining_by_chunks_costs_a_chunk_a_step():
    # one stage: decode 10 ms, 5 ms a token more (prefill of 5 tokens: 30 ms). A (8 new tokens) and B
    # (2) start together; C, 10 tokens before its last, takes B's place after B's second token
    c = StepCosts(decode_s=(0.010,), prefill_s=(0.030,), prompt_tokens=5, out_bytes=(8.0,), latency=(0.0,),
                  bandwidth=(math.inf,))
    reqs = [Request(2, 8), Request(2, 2), Request(11, 2)]
    ms = lambda sim: [round(e["dur"] * 1e3, 6) for e in sim.events][:5]
    whole = simulate(c, reqs, micro_batch_size=2, trace=True)
    # fresh step of 2 x 2 tokens: 25 ms; a decode of 2 rows: 15; then C's 10 tokens in one step beside it
    assert ms(whole)[:4] == [25.0, 15.0, 15.0 + 55.0, 15.0]
    chunked = simulate(c, reqs, micro_batch_size=2, trace=True, prefill_chunk=4)
    # by chunks of 4, 4 and 2, beside A decoding alone; C joins with its last chunk
    assert ms(chunked) == [25.0, 15.0, 10.0 + 25.0, 10.0 + 25.0, 15.0 + 15.0]
    assert (chunked.tokens, whole.tokens) == (12, 12) and chunked.seconds > whole.seconds  # two more fixed costs


@pytest.mark.parametrize("objective", ["latency", "throughput", "edge-solo", "cloud-edge-even"])
def test_sequential_equals_the_planners_latency(objective):
    prof = Profile.load(ROOT / "profiles" / "paper-llama2-7b.json")
    costs = prof.costs()
    plan = plan_for(costs, objective)
    sim = simulate(StepCosts.from_profile(prof, plan), uniform_requests(3, 32, 96), micro_batch_size=1,
                   schedule="sequential")
    assert sim.ms_per_token / 1e3 == pytest.approx(predict(costs, plan)["latency_s"], rel=1e-9)


def test_throughput_plan_pipelines_to_its_predicted_bottleneck():
    prof = Profile.load(ROOT / "profiles" / "paper-llama2-7b.json")
    costs = prof.costs()
    plan = plan_for(costs, "throughput")
    p = predict(costs, plan)
    sim = simulate(StepCosts.from_profile(prof, plan), uniform_requests(64, 32, 400), micro_batch_size=1,
                   schedule="no-bubbles", in_flight=2 * len(plan.stages))
    assert sim.tokens_per_s <= 1 / p["bottleneck_s"] * (1 + 1e-9)
    assert sim.tokens_per_s > 0.85 / p["bottleneck_s"]  # prefills and the ramp cost the rest


def test_bad_arguments():
    with pytest.raises(ValueError, match="schedule"):
        simulate(_two_stages(), [Request(5, 3)], micro_batch_size=1, schedule="fast")
    with pytest.raises(ValueError, match="micro_batch_size"):
        simulate(_two_stages(), [Request(5, 3)], micro_batch_size=0)


def test_a_stage_pays_its_devices_step_cost_once():
    # each unit was timed alone from a cold start, 0.5 s of which is the step's cold start: a stage
    # of three units costs 0.5 + 3 x 0.5, not 3 x 1.0
    prof = Profile.load(ROOT / "profiles" / "paper-llama2-7b.json")
    d = prof.to_dict()
    d.pop("format")
    n = prof.num_units
    for dev in d["devices"]:
        dev["decode_s"] = [1.0] * n
        dev["decode_step_s"] = 0.5
    prof = Profile(**d, source="<test>")
    costs = prof.costs()
    assert costs.stage_s[0] == 0.5 and costs.compute[0][0] == 0.5
    assert costs.stage_compute(0, 0, 0) == 1.0  # one unit: as timed alone
    assert costs.stage_compute(3, 1, 3) == 2.0
    plan = Plan((Stage(0, 0, 2), Stage(1, 3, n - 1)), n)
    sc = StepCosts.from_profile(prof, plan)
    assert sc.decode_s == (2.0, 0.5 + 0.5 * (n - 3))
    assert predict(costs, plan)["stage_compute_s"] == list(sc.decode_s)
