"""Drift watching and the move rule, in-process: the figures a run compares and what it decides on them."""

from __future__ import annotations

import math

import pytest
import torch

from edgeshard_mpi.drift import DriftWatch, worth_moving
from edgeshard_mpi.messages import Step
from edgeshard_mpi.profiler import Profile
from edgeshard_mpi.simulate import StageLine


def _watch(window=8, threshold=0.25):
    # stage 0: 10 ms a decode step of 2 rows and 2 ms per prefill token on top; stage 1: twice that
    lines = [StageLine(0.010, 0.010 + 0.002 * 2 * 7, 2, 8), StageLine(0.020, 0.020 + 0.004 * 2 * 7, 2, 8)]
    return DriftWatch(lines, ["board", "mid"], threshold=threshold, window=window)


def test_a_stage_drifts_once_its_window_is_off_by_more_than_the_threshold_and_comes_back():
    w = _watch()
    for k in range(8):  # on the profile: decode steps of 2 rows
        assert w.observe([0.010, 0.020], [(2, 0)], 2, now=k) == []
    assert w.ratios() == pytest.approx([1.0, 1.0])
    # stage 1 now takes 3x: after k slow steps its window is (8 - k + 3k) / 8 = 1 + k/4: over 1.25 at k = 2
    assert w.observe([0.010, 0.060], [(2, 0)], 2, now=8) == []
    (d,) = w.observe([0.010, 0.060], [(2, 0)], 2, now=9)
    assert (d.stage, d.device, d.drifting, d.steps) == (1, "mid", True, 8)
    assert d.ratio == pytest.approx(1.5) and d.measured_s == pytest.approx(6 * 0.020 + 2 * 0.060)
    assert w.drifting == {1} and "mid 1.50x" in w.postfix()
    for k in range(8):
        w.observe([0.010, 0.060], [(2, 0)], 2, now=10 + k)
    assert w.ratio(1) == pytest.approx(3.0) and w.ratio(0) == pytest.approx(1.0)
    # back to its profile: out of drift within half the threshold, 3 - 2k/8 <= 1.125 from k = 8 on
    # (at 1.25, k = 7, it still drifts: a stage at the edge does not flap in and out)
    back = [w.observe([0.010, 0.020], [(2, 0)], 2, now=20 + k) for k in range(8)]
    assert [len(b) for b in back] == [0] * 7 + [1] and not back[-1][0].drifting and not w.drifting
    assert [e.drifting for e in w.events] == [True, False]


def test_prefills_are_predicted_by_their_tokens():
    w = _watch(window=1)
    # a step of 2 decode rows, a join of 2 rows of 5 tokens and a chunk of 3: the line per forward
    forwards = [(2, 0), (10, 0), (3, 0)]
    expect = [sum(line.seconds(*f) for f in forwards) for line in w.lines]
    assert expect[0] == pytest.approx(0.010 + (0.010 + 0.002 * 8) + max(0.0, 0.010 + 0.002 * 1))
    w.observe(expect, forwards, 2, now=0)
    assert w.ratios() == pytest.approx([1.0, 1.0]) and not w.drifting


def test_asked_at_most_once_a_window_and_only_while_drifting():
    w = _watch(window=4)
    for k in range(4):
        w.observe([0.010, 0.020], [(2, 0)], 2, now=k)
    assert not w.due()
    w.observe([0.010, 0.160], [(2, 0)], 2, now=4)  # 8x: the window is off at once, but mostly old steps
    assert w.drifting == {1}
    for k in range(3):
        w.observe([0.010, 0.160], [(2, 0)], 2, now=5 + k)
        assert not w.due()
    w.observe([0.010, 0.160], [(2, 0)], 2, now=8)  # a whole window at the new pace
    assert w.ratio(1) == pytest.approx(8.0) and w.due() and not w.due()
    for k in range(3):
        w.observe([0.010, 0.160], [(2, 0)], 2, now=9 + k)
        assert not w.due()
    w.observe([0.010, 0.160], [(2, 0)], 2, now=12)
    assert w.due()


def test_pace_is_tokens_over_the_recent_returns():
    w = _watch(window=2)
    assert w.pace() == (0.0, 0.0)
    for k in range(5):
        w.observe([0.010, 0.020], [(4, 0)], 4, now=0.5 * k)
    assert w.pace() == pytest.approx((8.0, 0.5))  # 16 tokens after the first return, over 2 s


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="threshold"):
        _watch(threshold=0)
    with pytest.raises(ValueError, match="window"):
        _watch(window=0)


def test_worth_moving_weighs_the_time_saved_against_the_move():
    # the new plan takes 0.6 of the old one's step: of 100 s left, 40 s saved
    assert worth_moving(1.0, 0.6, 100.0, 10.0, 5.0) == (True, pytest.approx(40.0))
    assert worth_moving(1.0, 0.6, 100.0, 30.0, 10.5) == (False, pytest.approx(40.0))
    assert worth_moving(1.0, 1.0, 100.0, 0.0, 0.0) == (False, 0.0)  # no better: never
    assert worth_moving(0.0, 0.5, 100.0, 0.0, 0.0) == (False, 0.0)


def test_step_times_travel_with_the_step_and_come_back_in_stage_order():
    step = Step(3, 7, torch.zeros(2, 1, 4), rows=2, columns=40)
    step = step.passed_on(torch.ones(2, 1, 4), 0.25)
    fields, buffers = step.to_wire()
    from edgeshard_mpi.comm import Message

    got = Step.from_wire(Message(1, fields, buffers))
    assert got.times == [0.25] and got.forwards() == [(2, 40, 1)]
    reply = got.reply(torch.tensor([5, 6]), None, 0.5)
    back = Step.from_wire(Message(2, *reply.to_wire()))
    assert back.times == [0.25, 0.5] and back.tensor.tolist() == [5, 6]


def test_a_profile_scaled_by_a_run_keeps_unmeasured_units_unmeasured():
    prof = Profile(model={"name": "m", "fingerprint": "f", "num_units": 2},
                   units=[{"name": "u", "param_bytes": 1, "kv_bytes_per_token": 0, "out_bytes_per_token": 1}] * 2,
                   devices=[{"name": "a", "decode_s": [1.0, 2.0], "prefill_s": [3.0, None], "decode_step_s": 0.5},
                            {"name": "b", "decode_s": [1.0, 1.0], "prefill_s": [2.0, 2.0]}],
                   bandwidth=[[None, 1.0], [1.0, None]], latency=[[0.0, 0.0], [0.0, 0.0]],
                   shapes={"prompt_tokens": 8, "context": 16, "micro_batch_size": 1})
    s = prof.scaled({0: 3.0})
    a, b = s.devices
    assert a["decode_s"] == [3.0, 6.0] and a["prefill_s"][0] == 3.0 * 3 and a["prefill_s"][1] is None
    assert a["decode_step_s"] == 1.5 and b == prof.devices[1] and prof.devices[0]["decode_s"] == [1.0, 2.0]
    assert "a x3.00" in s.notes and math.isclose(s.costs().compute[0][0], 3.0 - 1.5)
