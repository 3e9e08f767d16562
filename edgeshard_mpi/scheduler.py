"""Which rows run in which micro-batch slot, step by step: the one scheduler the run and the simulator share.

Pure Python: no torch, no MPI. `pipeline.source_loop` drives it with shards and messages,
`simulate.simulate` with a cost clock; both ask it what to launch and tell it what came back.

A slot holds a micro-batch. Its rows share one KV time axis ("columns"): every step writes one
column for every row, and a row's columns before its first token are masked (its `pad`). Admission:
- `row` (iteration-level, as Orca and vLLM): a row that finishes frees its place, and the next prompt
  takes it at the slot's next step. All but its last prompt token are prefilled in that step, beside
  the other rows, and written into its row ending just before the step's column; its last prompt token
  then goes through the step with the other rows' tokens, and gives its first new token. So every step
  is one batched decode of all the slot's rows, and the cache is written in place.
- `batch`: new prompts enter a slot only when every row of its micro-batch has finished.
With `prefill_chunk` (row admission only), a joining prompt of more than that many tokens before its
last does not prefill in one step: it fills a cache of its own `prefill_chunk` tokens a step, beside
the slot's decode steps (Sarathi-Serve's chunked prefill), and joins, appended after the slot's rows,
at the step that carries its last chunk. One long prompt then no longer holds every stage for a whole
prefill while the other slots wait behind it. A slot starting anew, which would prefill its prompts padded
to the longest, does the same within its row budget: it starts with its prompts within a chunk of its
shortest, and the longer ones fill by chunks from its next step on; rows already filling go on filling.
Only when no new prompt is left to start it does the shortest of them start it, whole.
When a joining prompt does not fit before the step's column, or the rows need more columns than the
slot has, the step first re-lays the axis out: columns no row needs are dropped from the left (or
empty ones added there), and the capacity becomes what the rows need. That costs one copy of the
slot's cache, so it happens only then.

In flight: `sequential` runs one slot; otherwise `in_flight` slots (default twice the stages, one for
a single stage). `no-bubbles` launches a slot's next step as soon as its tokens are back; `bubbles`
waits until every slot in flight is back (the step barrier).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Generic, Iterable, Iterator, TypeVar

__all__ = ["ADMISSIONS", "DEFAULT_PREFILL_CHUNK", "SCHEDULES", "Launch", "Row", "Scheduler", "in_flight_for",
           "prefill_chunk_for", "slot_columns"]

SCHEDULES = ("sequential", "bubbles", "no-bubbles")
ADMISSIONS = ("row", "batch")
T = TypeVar("T")


# Row admission's KV headroom. Rows of different ages share a slot's time axis, so a slot holds its
# oldest row's columns plus its newest row's: with exactly the longest request's columns, one long row
# blocks every join behind it (on benchmarks/longtail.py's job, 2.3 rows a step in micro-batches of 8,
# fewer than admitting by batch); with a quarter more, 7.1, the same as with no bound at all.
ROW_HEADROOM = 1.25


# Chunked prefill's default chunk on a pipeline, in prompt tokens. On one stage there is no pipeline to
# keep busy, and a chunk only adds a forward's fixed cost: none there. See BENCHMARKS.md, "Chunked prefill".
DEFAULT_PREFILL_CHUNK = 64


def slot_columns(longest: int, admission: str) -> int:
    """The KV columns a slot may reach for requests of at most `longest` tokens (prompt and new ones):
    what the memory checks budget and the scheduler's `row_budget` holds row admission to."""
    return longest if admission == "batch" else math.ceil(longest * ROW_HEADROOM)


def prefill_chunk_for(stages: int, requested: int | None = None) -> int | None:
    """Prompt tokens a step prefills by chunks: as requested (0: none, prompts whole), else the default
    on a pipeline of more than one stage, none on one."""
    if requested is not None:
        return requested or None
    return DEFAULT_PREFILL_CHUNK if stages > 1 else None


def in_flight_for(schedule: str, stages: int, requested: int | None = None) -> int:
    """Micro-batches in flight: one when sequential; else as requested, or twice the stages (runner.py
    measured why), or one for a single stage, which has no pipeline to fill."""
    if schedule == "sequential":
        return 1
    if requested:
        return requested
    return 2 * stages if stages > 1 else 1


@dataclasses.dataclass(eq=False)
class Row(Generic[T]):
    """One request in a slot: its prompt and token budget, where it sits, how far it got."""

    item: T  # the driver's own object (a prompt, a simulated request)
    prompt_tokens: int
    max_new_tokens: int
    index: int  # admission order
    pad: int = 0  # masked columns before its first prompt token, in its slot's time axis
    made: int = 0  # tokens it has generated so far
    prefilled: int = 0  # with chunked prefill: its prompt tokens in its own cache so far


@dataclasses.dataclass
class Launch:
    """One step of one slot, as every stage applies it, in this order:

    1. `keep`: the stages' rows kept, in that order (None: all); the others finished and nobody took
       their place. A `fresh` step instead starts the slot anew with `rows`, prefilled whole,
       left-padded to `width` by `pads`; its cache holds `capacity` columns.
    2. `relayout` (columns, or None): the axis is re-laid out first: every row's first `trim` columns
       dropped (negative: that many empty ones added), room for `capacity` columns.
    3. `join`: rows placed at positions `places` (of the kept rows; the finished rows there leave).
       Each one's prompt but its last token is prefilled, left-padded to `width` by `pads`, and written
       into its row to end just before the step's column.
    4. `chunks`: each (row, start, length) prefills that row's prompt tokens start..start+length-1
       into the row's own cache (its first chunk starts it). A row whose last chunk this is joins:
       appended after the rows, in the chunks' order (`rows` ends with them).
    5. Every row decodes one token: a kept row its newest token, a joining row its last prompt token.
    """

    slot: int
    step: int
    keep: list[int] | None
    rows: list[Row]  # the slot's rows after the step, in the stages' order: tokens come back so
    join: list[Row]
    places: list[int]
    pads: list[int]
    width: int
    fresh: bool
    trim: int = 0
    capacity: int = 0
    relayout: bool = False
    chunks: list[tuple[Row, int, int]] = dataclasses.field(default_factory=list)
    columns: int = 0  # the axis's length after the step: the KV columns its decode attends over

    @property
    def filled(self) -> list[Row]:
        """The rows that join with their last chunk, appended after the others in this order."""
        return [r for r, start, n in self.chunks if start + n == r.prompt_tokens - 1]


@dataclasses.dataclass
class _Slot:
    rows: list[Row]  # after the last launched step, in the stages' order
    step: int = 0
    columns: int = 0  # the axis's length after the last launched step: the next step writes this column
    capacity: int = 0  # columns the stages' caches hold
    pending: tuple | None = None  # bubbles: the next step's (keep, rows, joining, places), held for the barrier
    filling: list[Row] = dataclasses.field(default_factory=list)  # chunked prefill: rows not joined yet


class Scheduler(Generic[T]):
    """Slots, admission, the in-flight rule, the bubbles barrier and row retirement.

    source: (item, prompt_tokens, max_new_tokens) in admission order, pulled only as rows are needed.
    row_budget: columns a slot may grow to for a joining row; a row longer than that still runs, in a
    slot whose axis is its own. Use it to bound the KV memory row admission takes (None: no bound).
    prefill_chunk: prompt tokens a step prefills for rows joining by chunks (None: every join whole).
    """

    def __init__(self, source: Iterable[tuple[T, int, int]], *, micro_batch_size: int, schedule: str = "no-bubbles",
                 in_flight: int | None = None, stages: int = 1, admission: str = "row",
                 row_budget: int | None = None, prefill_chunk: int | None = None):
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule {schedule!r}: choose one of {', '.join(SCHEDULES)}")
        if admission not in ADMISSIONS:
            raise ValueError(f"admission {admission!r}: choose one of {', '.join(ADMISSIONS)}")
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        if prefill_chunk is not None and prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1 token, got {prefill_chunk}")
        self._source: Iterator[tuple[T, int, int]] = iter(source)
        self._next: tuple[T, int, int] | None = None
        self.micro_batch_size = micro_batch_size
        self.schedule = schedule
        self.admission = admission
        self.in_flight = in_flight_for(schedule, stages, in_flight)
        self.row_budget = row_budget
        self.prefill_chunk = prefill_chunk if admission == "row" else None
        self.admitted = 0
        self.slots: dict[int, _Slot] = {}
        self._ready: list[int] = []  # bubbles: slots back from their step, waiting for the others
        self.steps = 0  # launched steps, and the rows they carried: rows per step = row_steps / steps
        self.row_steps = 0
        self.chunked = 0  # rows that joined by chunks
        self.draining = False  # drain(): nothing more is admitted

    # -- the driver's calls ------------------------------------------------------------------
    def start(self) -> list[Launch]:
        """The first step of up to `in_flight` slots."""
        out = []
        for slot in range(self.in_flight):
            rows = self._take(self.micro_batch_size)
            if not rows:
                break
            self.slots[slot] = _Slot([])
            out.append(self._launch(slot, None, [], rows, []))
        return out

    def returned(self, slot: int, finished: Iterable[int]) -> tuple[list[Launch], bool]:
        """A slot's step is back; `finished` are the positions (in `Launch.rows` order) of its rows that
        finished with it. Returns the steps to launch now, and whether this slot is done for good."""
        s = self.slots[slot]
        for r in s.rows:
            r.made += 1
        gone = set(finished)
        joining: list[Row] = []
        fresh = len(gone) == len(s.rows)
        if gone and (self.admission == "row" or fresh):
            joining = self._take(self.micro_batch_size - len(s.filling) if fresh else len(gone), None if fresh else s,
                                 gone)
            if fresh and not joining and s.filling:
                # no new prompt to decode beside the rows still filling: the shortest starts the slot, whole
                first = min(s.filling, key=lambda r: r.prompt_tokens)
                s.filling.remove(first)
                first.prefilled, joining = 0, [first]
            if not fresh and self.prefill_chunk is not None:  # long prompts join by chunks, after the rows
                s.filling += [r for r in joining if r.prompt_tokens - 1 > self.prefill_chunk]
                joining = [r for r in joining if r.prompt_tokens - 1 <= self.prefill_chunk]
        if joining and fresh:  # nobody left: the slot starts anew
            pending = (None, [], joining, [])
        elif joining or gone:
            # finished rows that a newcomer takes over stay in place; the others leave
            taken = sorted(gone)[:len(joining)]
            kept = [i for i in range(len(s.rows)) if i not in gone or i in taken]
            places = [kept.index(i) for i in taken]
            pending = (None if len(kept) == len(s.rows) else kept, [s.rows[i] for i in kept], joining, places)
        else:
            pending = (None, s.rows, [], [])
        if not pending[1] and not pending[2] and not s.filling:
            del self.slots[slot]
            return self._release_barrier(), True
        if self.schedule == "bubbles":
            s.pending = pending  # held until every slot in flight is back
            self._ready.append(slot)
            return self._release_barrier(), False
        return [self._launch(slot, *pending)], False

    def drain(self) -> list[T]:
        """Admit nothing more: the slots run their rows to the end, and then the driver's loop ends
        (`slots` empties). Returns the items taken from the source but not admitted, in order, for the
        driver to run later (a move to a new plan, runner.py)."""
        self.draining = True
        held, self._next = self._next, None
        return [held[0]] if held is not None else []

    # -- internals ---------------------------------------------------------------------------
    def _release_barrier(self) -> list[Launch]:
        if self.schedule != "bubbles" or not self._ready or len(self._ready) < len(self.slots):
            return []
        ready, self._ready = sorted(self._ready), []
        out = []
        for slot in ready:
            pending, self.slots[slot].pending = self.slots[slot].pending, None
            out.append(self._launch(slot, *pending))
        return out

    def _peek(self) -> tuple[T, int, int] | None:
        if self.draining:
            return None
        if self._next is None:
            self._next = next(self._source, None)
        return self._next

    def _take(self, n: int, slot: _Slot | None = None, gone: set[int] = frozenset()) -> list[Row]:
        """Up to n new rows; joining a running slot, only while its capacity stays within the budget."""
        out: list[Row] = []
        while len(out) < n and (nxt := self._peek()) is not None:
            item, prompt, new = nxt
            if slot is not None and self.row_budget is not None:
                rows = [r for i, r in enumerate(slot.rows) if i not in gone]
                *_, capacity = self._layout(slot, rows, out + [Row(item, prompt, new, -1)])
                if capacity > max(self.row_budget, prompt + new - 1):
                    break  # it waits, in order, until rows leave and the axis shortens
            self._next = None
            out.append(Row(item, prompt, new, self.admitted))
            self.admitted += 1
        return out

    @staticmethod
    def _layout(slot: _Slot, rows: list[Row], joining: list[Row]) -> tuple[int, int, bool, int]:
        """(the column this step writes, trim, relayout?, capacity) for staying `rows` and `joining` rows."""
        if not rows:  # a fresh slot: the prompts' width, then each row's new tokens
            width = max(r.prompt_tokens for r in joining)
            return width, 0, True, width + max(r.max_new_tokens for r in joining) - 1
        # after this step, a staying row still feeds max_new - 1 - made tokens, a joining row max_new - 1
        more = max([r.max_new_tokens - 1 - r.made for r in rows] + [r.max_new_tokens - 1 for r in joining])
        before = max((r.prompt_tokens - 1 for r in joining), default=0)  # prefilled before the column
        column = slot.columns
        trim = min(r.pad for r in rows)
        wasted = trim >= max(64, column // 2)  # attention runs over columns nobody needs
        if before <= column and column + 1 + more <= slot.capacity and not wasted:
            return column, 0, False, slot.capacity
        column = max(column - trim, before)
        return column, slot.columns - column, True, column + 1 + more

    def _may_fill(self, rows: list[Row]) -> bool:
        """Whether a fresh slot of `rows` may let some fill by chunks: rows of different ages then share
        its axis, which may reach the longest prompt plus the most new tokens of any row; only within the
        row budget (the memory checks' bound), else every row starts whole, as one micro-batch."""
        reach = max(r.prompt_tokens for r in rows) + max(r.max_new_tokens for r in rows)
        return self.row_budget is None or reach <= self.row_budget

    def _chunks(self, s: _Slot) -> list[tuple[Row, int, int]]:
        """This step's chunks: `prefill_chunk` tokens, to the filling rows in admission order."""
        out, budget = [], self.prefill_chunk or 0
        for r in s.filling:
            if budget == 0:
                break
            n = min(budget, r.prompt_tokens - 1 - r.prefilled)
            out.append((r, r.prefilled, n))
            r.prefilled += n
            budget -= n
        s.filling = [r for r in s.filling if r.prefilled < r.prompt_tokens - 1]
        self.chunked += sum(start + n == r.prompt_tokens - 1 for r, start, n in out)
        return out

    def _launch(self, slot: int, keep: list[int] | None, rows: list[Row], joining: list[Row],
                places: list[int]) -> Launch:
        s = self.slots[slot]
        fresh = not rows
        if fresh and self.prefill_chunk is not None and len(joining) > 1 and self._may_fill(joining):
            # a fresh slot prefills its prompts padded to the longest: it starts with those within a chunk
            # of its shortest, and the longer ones fill by chunks beside its decode steps from the next
            # step on, after the rows that were filling already, which keep what they have
            first = min(r.prompt_tokens for r in joining)
            short = [r for r in joining if r.prompt_tokens <= first + self.prefill_chunk]
            s.filling += [r for r in joining if r not in short]
            joining = short
        chunks = [] if fresh else self._chunks(s)
        filled = [r for r, start, n in chunks if start + n == r.prompt_tokens - 1]
        staying = [r for i, r in enumerate(rows) if i not in places]  # the others are taken over
        column, trim, relayout, capacity = self._layout(s, staying, joining + filled)
        if fresh:
            width = column
            for r in joining:
                r.pad = width - r.prompt_tokens
            rows = joining
            pads = [r.pad for r in joining]
            s.columns = width
        else:
            for r in staying:
                r.pad -= trim
            width = max((r.prompt_tokens - 1 for r in joining), default=0)
            pads = [width - (r.prompt_tokens - 1) for r in joining]
            rows = list(rows)
            for p, r in zip(places, joining):
                rows[p] = r
            rows += filled
            for r in joining + filled:
                r.pad = column - (r.prompt_tokens - 1)
            s.columns = column + 1
        s.capacity = capacity
        launch = Launch(slot, 0 if fresh else s.step, None if fresh else keep, rows, joining, places, pads, width,
                        fresh, trim, capacity, relayout, chunks, s.columns)
        s.rows, s.step = rows, launch.step + 1
        self.steps += 1
        self.row_steps += len(rows)
        return launch
