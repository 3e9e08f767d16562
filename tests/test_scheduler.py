"""The scheduler alone, in-process: admission, the KV time axis it lays out, the in-flight rule, the barrier."""

from __future__ import annotations

import random

import pytest

from edgeshard_mpi.scheduler import Scheduler, in_flight_for


class _Axis:
    """A slot's KV time axis as the stages hold it: per row, its columns (a token, or None = masked)."""

    def __init__(self):
        self.rows: list[list] = []
        self.capacity = 0
        self.filling: dict[int, list] = {}  # chunked prefill: a row's own cache, by admission index

    def apply(self, launch) -> None:
        if launch.fresh:
            self.rows = [[None] * p + [("p", r.index, i) for i in range(r.prompt_tokens)]
                         for p, r in zip(launch.pads, launch.join)]
            self.capacity = launch.capacity
            return
        if launch.keep is not None:
            self.rows = [self.rows[i] for i in launch.keep]
        if launch.relayout:
            for i, row in enumerate(self.rows):  # rows a newcomer takes over are written anew
                assert i in launch.places or all(c is None for c in row[:max(0, launch.trim)]), "dropped a needed column"
            self.rows = [row[launch.trim:] if launch.trim >= 0 else [None] * -launch.trim + row for row in self.rows]
            self.capacity = launch.capacity
        column = len(self.rows[0])
        for p, pad, r in zip(launch.places, launch.pads, launch.join):
            assert launch.width + 1 - pad == r.prompt_tokens and column >= launch.width
            self.rows[p] = [None] * (column - r.prompt_tokens + 1) + [("p", r.index, i) for i in range(r.prompt_tokens - 1)]
        for r, start, n in launch.chunks:  # in order, contiguous, from the prompt's first token
            cache = self.filling.setdefault(r.index, [])
            assert start == len(cache) and n >= 1
            cache += [("p", r.index, i) for i in range(start, start + n)]
            if start + n == r.prompt_tokens - 1:  # its last chunk: it joins after the rows
                assert column >= len(cache)
                self.rows.append([None] * (column - len(cache)) + self.filling.pop(r.index))
        assert len(self.rows) == len(launch.rows)
        for row, r in zip(self.rows, launch.rows):  # the step's column: a new token, or a last prompt token
            row.append(("p", r.index, r.prompt_tokens - 1) if r.made == 0 else ("t", r.index, r.made))
        assert len(self.rows[0]) <= self.capacity


def _made_one_each(launch, made: dict) -> list[int]:
    """Every row of the launch made a token: the positions of the rows that reached their budget."""
    finished = []
    for i, r in enumerate(launch.rows):
        made[r.item] = made.get(r.item, 0) + 1
        if made[r.item] == r.max_new_tokens:
            finished.append(i)
    return finished


def _drive(requests, **kw):
    """Run a job through the scheduler with a fake clock; check the layout at every step."""
    sched = Scheduler(((i, p, n) for i, (p, n) in enumerate(requests)), **kw)
    chunk = kw.get("prefill_chunk")
    axes, made, queue = {}, {}, []
    for launch in sched.start():
        queue.append(launch)
    max_columns = {}
    while queue:
        launch = queue.pop(0)  # FIFO: slots come back in the order they went out
        axis = axes.setdefault(launch.slot, _Axis())
        if launch.fresh:  # rows filling go on filling, unless they start the slot anew, whole
            for r in launch.join:
                axis.filling.pop(r.index, None)
        axis.apply(launch)
        if chunk is not None:  # a step prefills at most a chunk, and a slot holds at most its rows
            assert sum(n for _, _, n in launch.chunks) <= chunk
            assert all(r.prompt_tokens - 1 <= chunk for r in launch.join) or launch.fresh
            assert len(launch.rows) + len(axis.filling) <= kw["micro_batch_size"]
        cols = len(axis.rows[0])
        assert all(len(row) == cols for row in axis.rows) and launch.columns == cols
        for row, r in zip(axis.rows, launch.rows):
            assert row[:r.pad] == [None] * r.pad and None not in row[r.pad:], "a row's pad is not its masked prefix"
        max_columns[launch.slot] = max(max_columns.get(launch.slot, 0), cols)
        finished = _made_one_each(launch, made)
        more, _ = sched.returned(launch.slot, finished)
        queue.extend(more)
    assert made == {i: n for i, (_, n) in enumerate(requests)}
    return sched, max_columns


REQS = [(random.Random(s).randint(1, 40), random.Random(s + 99).randint(1, 30)) for s in range(60)]


@pytest.mark.parametrize("schedule", ["sequential", "bubbles", "no-bubbles"])
@pytest.mark.parametrize("admission", ["row", "batch"])
@pytest.mark.parametrize("mbs", [1, 3, 8])
@pytest.mark.parametrize("chunk", [None, 4])
def test_every_request_gets_its_tokens_and_the_axis_holds(schedule, admission, mbs, chunk):
    _drive(REQS, micro_batch_size=mbs, schedule=schedule, in_flight=3, admission=admission, prefill_chunk=chunk)


def test_a_long_prompt_joins_by_chunks_beside_the_decode_steps():
    # slot of 2: a long-lived row, and a short one whose place a 10-token prompt takes by chunks of 4
    reqs = [(3, 20), (3, 1), (11, 3), (2, 2)]
    sched = Scheduler(((i, p, n) for i, (p, n) in enumerate(reqs)), micro_batch_size=2, prefill_chunk=4)
    (launch,) = sched.start()
    seen = []
    made = {}
    while True:
        seen.append(([(r.item, start, n) for r, start, n in launch.chunks], [r.item for r in launch.rows]))
        finished = _made_one_each(launch, made)
        more, done = sched.returned(launch.slot, finished)
        if done:
            break
        (launch,) = more
    # row 2's 10 tokens before its last go 4, 4, 2, while row 0 decodes alone; it joins with the
    # last; row 3 (1 token before its last) joins whole in the place row 2's first finished token frees
    assert seen[1:4] == [([(2, 0, 4)], [0]), ([(2, 4, 4)], [0]), ([(2, 8, 2)], [0, 2])]
    assert made == {i: n for i, (_, n) in enumerate(reqs)}
    _drive(reqs, micro_batch_size=2, prefill_chunk=4)


def test_filling_rows_start_over_by_chunks_when_their_slot_does():
    # the slot's last row finishes while a long prompt is still filling: the slot starts anew with the
    # next prompt (a step needs a row to decode), and the long one goes on filling where it was
    reqs = [(3, 4), (3, 2), (30, 2), (3, 2)]
    _drive(reqs, micro_batch_size=2, prefill_chunk=4)
    sched = Scheduler(((i, p, n) for i, (p, n) in enumerate(reqs)), micro_batch_size=2, prefill_chunk=4)
    (launch,) = sched.start()
    (launch,) = sched.returned(0, [])[0]
    (launch,) = sched.returned(0, [1])[0]  # row 1 is done: row 2 fills, by chunks of 4
    assert [(r.item, start, n) for r, start, n in launch.chunks] == [(2, 0, 4)] and launch.keep == [0]
    (launch,) = sched.returned(0, [])[0]
    (launch,) = sched.returned(0, [0])[0]  # row 0 is done, and row 2 has 21 tokens left to prefill
    assert launch.fresh and [r.item for r in launch.join] == [3] and launch.width == 3
    (launch,) = sched.returned(0, [])[0]
    assert [(r.item, start, n) for r, start, n in launch.chunks] == [(2, 8, 4)]
    # with no prompt left to start a slot, the shortest row still filling starts it, whole
    sched = Scheduler(((i, p, n) for i, (p, n) in enumerate([(3, 2), (30, 2), (20, 2)])), micro_batch_size=3,
                      prefill_chunk=4)
    (launch,) = sched.start()
    assert [r.item for r in launch.rows] == [0] and [r.item for r in sched.slots[0].filling] == [1, 2]
    (launch,) = sched.returned(0, [])[0]
    (launch,) = sched.returned(0, [0])[0]
    assert launch.fresh and [r.item for r in launch.rows] == [2] and launch.width == 20
    assert [r.item for r in sched.slots[0].filling] == [1]
    _drive([(3, 2), (30, 2), (20, 2)], micro_batch_size=3, prefill_chunk=4)


@pytest.mark.parametrize("reqs,starts", [([(3, 40), (20, 5), (2, 40), (12, 5)], [0, 2]),
                                         ([(20, 5), (9, 40), (12, 5)], [1, 2])])  # none is short
def test_a_fresh_slot_starts_with_its_short_prompts_and_fills_the_long_ones_by_chunks(reqs, starts):
    # a fresh slot would prefill every row padded to its longest prompt: those within a chunk of its
    # shortest start it, and the others fill by chunks beside their decode steps, as when joining
    sched, _ = _drive(reqs, micro_batch_size=4, prefill_chunk=4)
    assert sched.chunked == len(reqs) - len(starts)
    sched = Scheduler(((i, p, n) for i, (p, n) in enumerate(reqs)), micro_batch_size=4, prefill_chunk=4)
    (launch,) = sched.start()
    assert launch.fresh and [r.item for r in launch.rows] == starts
    assert launch.width == max(reqs[i][0] for i in starts)
    (launch,) = sched.returned(0, [])[0]
    long = [i for i in range(len(reqs)) if i not in starts]
    assert [(r.item, start, n) for r, start, n in launch.chunks] == [(long[0], 0, 4)]
    # past the row budget (the slot's axis could reach the longest prompt plus the most new tokens),
    # every row starts whole
    (bounded,) = Scheduler(((i, p, n) for i, (p, n) in enumerate(reqs)), micro_batch_size=4, prefill_chunk=4,
                           row_budget=max(p for p, _ in reqs) + max(n for _, n in reqs) - 1).start()
    assert len(bounded.rows) == len(reqs) and bounded.width == max(p for p, _ in reqs)
    # prompts of one length start together, whole, chunks or not: nothing is padded
    (even,) = Scheduler(((i, 20, 5) for i in range(4)), micro_batch_size=4, prefill_chunk=4).start()
    assert len(even.rows) == 4 and even.width == 20
    # without chunks, the same slot starts with every prompt, padded to the longest
    (whole,) = Scheduler(((i, p, n) for i, (p, n) in enumerate(reqs)), micro_batch_size=4).start()
    assert len(whole.rows) == len(reqs) and whole.width == max(p for p, _ in reqs)


def test_row_admission_keeps_micro_batches_fuller_than_batch_admission():
    row, _ = _drive(REQS, micro_batch_size=8, admission="row")
    batch, _ = _drive(REQS, micro_batch_size=8, admission="batch")
    # batch admission waits for the longest row of each micro-batch; row admission refills at once
    assert row.row_steps / row.steps > 1.5 * batch.row_steps / batch.steps
    assert row.steps < batch.steps


def test_rows_join_mid_flight_and_sit_at_every_position():
    # rows finishing one after another: each freed place is taken at the next step, the newcomer
    # goes after the rows that stay, and moves forward as the rows before it leave
    reqs = [(5, 2), (3, 3), (7, 4), (2, 5)] + [(4, 6)] * 8
    sched = Scheduler(((i, p, n) for i, (p, n) in enumerate(reqs)), micro_batch_size=4)
    (launch,) = sched.start()
    late, places, made = set(), set(), {}
    while True:
        finished = []
        for i, r in enumerate(launch.rows):
            made[r.item] = made.get(r.item, 0) + 1
            if made[r.item] == r.max_new_tokens:
                finished.append(i)
            if r.item in late:
                places.add(i)
        more, done = sched.returned(launch.slot, finished)
        if done:
            break
        (launch,) = more
        if launch.join:
            assert not launch.fresh and len(launch.join) == len(finished)
            late |= {r.item for r in launch.join}
    assert late == set(range(4, len(reqs))) and places == {0, 1, 2, 3}


def test_the_row_budget_holds_a_long_prompt_back_until_the_axis_is_short():
    # a 100-token prompt cannot join a slot whose rows still need long; it waits in order, and
    # the rows behind it wait with it
    reqs = [(10, 50), (10, 2), (100, 3), (5, 3)]
    sched, cols = _drive(reqs, micro_batch_size=2, admission="row", row_budget=60)
    assert max(cols.values()) <= 102  # the long row's own span, not 100 + the other row's 50


def test_in_flight_rule():
    assert in_flight_for("sequential", 4, 8) == 1
    assert in_flight_for("no-bubbles", 4) == 8
    assert in_flight_for("bubbles", 1) == 1
    assert in_flight_for("no-bubbles", 3, 5) == 5


def test_bubbles_launches_only_when_every_slot_is_back():
    sched = Scheduler(((i, 4, 3) for i in range(6)), micro_batch_size=1, schedule="bubbles", in_flight=3)
    first = sched.start()
    assert [l.slot for l in first] == [0, 1, 2]
    assert sched.returned(0, [])[0] == [] and sched.returned(1, [])[0] == []
    assert [l.slot for l in sched.returned(2, [])[0]] == [0, 1, 2]


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="admission 'rows'"):
        Scheduler([], micro_batch_size=1, admission="rows")
    with pytest.raises(ValueError, match="schedule 'fast'"):
        Scheduler([], micro_batch_size=1, schedule="fast")
    with pytest.raises(ValueError, match="prefill_chunk must be >= 1"):
        Scheduler([], micro_batch_size=1, prefill_chunk=0)


@pytest.mark.parametrize("schedule", ["sequential", "bubbles", "no-bubbles"])
@pytest.mark.parametrize("admission,chunk,budget", [("row", None, None), ("row", 4, 40), ("row", None, 40),
                                                    ("batch", None, None)])
def test_a_drained_run_finishes_its_rows_and_hands_back_the_rest_in_order(schedule, admission, chunk, budget):
    """A move to a new plan (runner.py): drain mid-run, let the slots finish, then a second scheduler
    takes what the first handed back and what its source never gave: every request runs once, in order."""
    source = iter([(i, p, n) for i, (p, n) in enumerate(REQS)])
    made = {}
    sched = Scheduler(source, micro_batch_size=3, schedule=schedule, in_flight=3, admission=admission,
                      prefill_chunk=chunk, row_budget=budget)
    queue, returns, leftover = list(sched.start()), 0, None
    while queue:
        launch = queue.pop(0)
        returns += 1
        if returns == 25:
            leftover = sched.drain()
        more, _ = sched.returned(launch.slot, _made_one_each(launch, made))
        assert not (sched.draining and any(ln.join for ln in more)), "a row joined after the drain"
        queue.extend(more)
    assert not sched.slots and leftover is not None
    first = set(made)
    assert all(made[i] == REQS[i][1] for i in first), "a row of the drained run did not finish"
    rest = [(i, *REQS[i]) for i in leftover] + list(source)
    assert [i for i, _, _ in rest] == list(range(len(first), len(REQS))), "not handed back in order"
    assert set(range(len(first))) == first
    second, _ = _drive([(p, n) for _, p, n in rest], micro_batch_size=3, schedule=schedule, in_flight=3,
                       admission=admission, prefill_chunk=chunk, row_budget=budget)
    assert second.admitted == len(rest)
