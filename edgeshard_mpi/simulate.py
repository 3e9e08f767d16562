"""A discrete-event replay of the pipeline's schedules on a Profile and a Plan, without a model.

    edgeshard simulate --profile profiles/paper-llama2-7b.json --objective throughput
    edgeshard simulate --profile P --plan plan.json --prompt-tokens 32 --new-tokens 96 --micro-batches 16

It replays what `pipeline.source_loop` and `pipeline.stage_loop` do, event by event: rank 0 launches
up to `in_flight` micro-batches (prefill), each stage serves its arrivals in order (one at a time,
with that micro-batch's step cost), every hop takes the link's latency plus bytes / bandwidth with
messages queued on the link one after another (as comm.py's link emulation delivers them), the
head's token ids go back to rank 0, which launches the micro-batch's next step (`no-bubbles`),
or waits for every micro-batch in flight to finish the step (`bubbles`), or runs one micro-batch at
a time (`sequential`). Rows leave their micro-batch when they have their tokens, and a micro-batch
whose rows have all finished is replaced by the next prompts at once, as in a run.

Step costs come from the profile: a decode step of a stage is its device's step cost plus its
units' decode times (Profile.costs, Costs.stage_compute); a prefill of width w is interpolated between the decode step (w = 1) and the profiled prefill (w =
the profile's prompt length), which keeps the fixed cost of a step in both. Figures are those a run
reports (pipeline.Summary): tokens/s over the whole job, mean decode ms/token per request (first to
last token), mean time to first token, and each stage's busy share.

Pure Python: no torch, no MPI.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
from typing import Sequence

from .planner import Plan, PlanError

__all__ = ["Request", "Simulation", "StepCosts", "simulate", "uniform_requests", "default_in_flight"]

SCHEDULES = ("sequential", "bubbles", "no-bubbles")


def default_in_flight(stages: int) -> int:
    """Micro-batches in flight when the job does not say: twice the stages (runner.py measured why);
    a single stage has no pipeline to fill."""
    return 2 * stages if stages > 1 else 1


@dataclasses.dataclass(frozen=True)
class Request:
    prompt_tokens: int
    new_tokens: int  # tokens it generates before it finishes (max_new_tokens, or fewer at EOS)


def uniform_requests(count: int, prompt_tokens: int, new_tokens: int) -> list[Request]:
    return [Request(prompt_tokens, new_tokens)] * count


@dataclasses.dataclass(frozen=True)
class StepCosts:
    """What one stage's step and one hop cost, from a Profile, for one Plan.

    decode_s[s], prefill_s[s]: stage s's compute for a decode step and a prefill of `prompt_tokens`
    (the profile's); out_bytes[s]: bytes per row per token stage s sends on (the head: a token id);
    latency[s], bandwidth[s]: the link from stage s to the next (the head's: back to rank 0).
    """

    decode_s: tuple[float, ...]
    prefill_s: tuple[float, ...]
    prompt_tokens: int
    out_bytes: tuple[float, ...]
    latency: tuple[float, ...]
    bandwidth: tuple[float, ...]

    @classmethod
    def from_profile(cls, profile, plan: Plan) -> "StepCosts":
        if plan.num_units != profile.num_units:
            raise PlanError(f"{plan.source}: plan is for {plan.num_units} units, the profile "
                            f"{profile.source} for {profile.num_units}")
        m = len(profile.devices)
        bad = [s.rank for s in plan.stages if s.rank >= m]
        if bad:
            raise PlanError(f"{plan.source}: plan uses rank(s) {bad}, the profile has {m} device(s)")
        decode_costs, prefill_costs = profile.costs("decode"), profile.costs("prefill")
        decode, prefill, out, lat, bw = [], [], [], [], []
        for s, nxt in zip(plan.stages, list(plan.stages[1:]) + [None]):
            decode.append(decode_costs.stage_compute(s.rank, s.first, s.last))
            prefill.append(prefill_costs.stage_compute(s.rank, s.first, s.last))
            head = nxt is None
            out.append(8.0 if head else float(profile.out_bytes_per_token(s.rank)[s.last]))  # in its dtype
            to = 0 if head else nxt.rank
            if to == s.rank:
                lat.append(0.0)
                bw.append(math.inf)
            else:
                lat.append(float(profile.latency[s.rank][to]))
                b = profile.bandwidth[s.rank][to]
                bw.append(math.inf if b is None else float(b))
        return cls(tuple(decode), tuple(prefill), int(profile.shapes["prompt_tokens"]), tuple(out),
                   tuple(lat), tuple(bw))

    def compute(self, s: int, width: int) -> float:
        """Stage s's step over `width` new tokens per row: 1 for a decode step, the prompt for a prefill."""
        if width <= 1:
            return self.decode_s[s]
        p = self.prompt_tokens
        if p <= 1:
            return self.prefill_s[s] * width
        return max(0.0, self.decode_s[s] + (self.prefill_s[s] - self.decode_s[s]) * (width - 1) / (p - 1))


@dataclasses.dataclass
class Simulation:
    """A simulated run's figures, defined as pipeline.Summary's are."""

    schedule: str
    in_flight: int
    requests: int
    tokens: int
    seconds: float
    ttft_ms: float
    ms_per_token: float
    busy: list[float]  # per stage: compute / seconds
    events: list[dict] = dataclasses.field(default_factory=list)  # trace events (with trace=True)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def bubble_share(self) -> float:
        """The share of stage time spent waiting, over all stages of the plan."""
        return 1.0 - sum(self.busy) / len(self.busy) if self.busy else 0.0

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("events")
        d["tokens_per_s"] = self.tokens_per_s
        d["bubble_share"] = self.bubble_share
        return d


class _Batch:
    """A micro-batch in a slot: rows' remaining tokens, as the source tracks them."""

    def __init__(self, rows: list[Request], first: int):
        self.rows = rows
        self.first = first  # index of its first request, for TTFT bookkeeping
        self.left = [r.new_tokens for r in rows]
        self.active = [i for i, n in enumerate(self.left) if n > 0]
        self.width = max(r.prompt_tokens for r in rows)
        self.step = 0
        self.t_start = 0.0
        self.t_first = [0.0] * len(rows)


def simulate(costs: StepCosts, requests: Sequence[Request], *, micro_batch_size: int, schedule: str = "no-bubbles",
             in_flight: int | None = None, ranks: Sequence[int] | None = None, trace: bool = False) -> Simulation:
    """Replay `requests` (in admission order) through the stages; see the module docstring.

    ranks: each stage's rank, for trace events (default 0..stages-1).
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule {schedule!r}: choose one of {', '.join(SCHEDULES)}")
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    n_st = len(costs.decode_s)
    ranks = list(ranks) if ranks is not None else list(range(n_st))
    in_flight = 1 if schedule == "sequential" else (in_flight or default_in_flight(n_st))
    pending = [r for r in requests if r.new_tokens > 0]
    events: list[dict] = []
    busy = [0.0] * n_st
    free = [0.0] * n_st  # when each stage finishes the work it has
    link_free = [0.0] * n_st  # when the link out of each stage finishes its last message
    queue: list[tuple[float, int, int, int]] = []  # (arrival time, seq, stage, slot): FIFO per stage
    seq = 0
    next_req = 0
    slots: dict[int, _Batch] = {}
    ready: list[int] = []
    ttfts: list[float] = []
    tpots: list[float] = []
    tokens = 0
    t_end = 0.0

    def admit() -> _Batch | None:
        nonlocal next_req
        rows = pending[next_req:next_req + micro_batch_size]
        if not rows:
            return None
        b = _Batch(rows, next_req)
        next_req += len(rows)
        return b

    def run_stage(s: int, slot: int, t: float) -> float:
        """Stage s takes the slot's current step at time t (or when it is free); returns when it sends."""
        nonlocal seq
        b = slots[slot]
        width = b.width if b.step == 0 else 1
        start = max(t, free[s])
        dur = costs.compute(s, width)
        free[s] = start + dur
        busy[s] += dur
        if trace:
            events.append({"rank": ranks[s], "name": "prefill" if width > 1 else "decode", "ts": start, "dur": dur,
                           "slot": slot, "step": b.step})
        rows = len(b.active)
        nbytes = costs.out_bytes[s] * rows * (width if s < n_st - 1 else 1)
        if s == n_st - 1 and n_st == 1:
            arrive = free[s]  # the source holds the head: its tokens are at hand
        else:
            send = max(free[s], link_free[s])
            link_free[s] = send + nbytes / costs.bandwidth[s]
            arrive = link_free[s] + costs.latency[s]
        heapq.heappush(queue, (arrive, seq, (s + 1) % n_st if n_st > 1 else 0, slot))
        seq += 1
        return free[s]

    def launch(slot: int, t: float) -> None:
        b = slots[slot]
        if b.step == 0:
            b.t_start = max(t, free[0])
        run_stage(0, slot, t)

    for slot in range(max(1, in_flight)):
        b = admit()
        if b is None:
            break
        slots[slot] = b
        launch(slot, 0.0)

    while queue:
        t, _, s, slot = heapq.heappop(queue)
        if s != 0:
            run_stage(s, slot, t)
            continue
        # tokens back at the source: the source takes them when it is free, then decides
        now = max(t, free[0])
        free[0] = now
        b = slots[slot]
        for i in b.active:
            b.left[i] -= 1
            tokens += 1
            if b.step == 0:
                b.t_first[i] = now
                ttfts.append(now - b.t_start)
            if b.left[i] == 0:
                n = b.rows[i].new_tokens
                if n > 1:
                    tpots.append((now - b.t_first[i]) / (n - 1))
        b.active = [i for i in b.active if b.left[i] > 0]
        b.step += 1
        t_end = max(t_end, now)
        if not b.active:
            new = admit()
            if new is None:
                del slots[slot]
            else:
                slots[slot] = new
        if slot in slots:
            if schedule == "bubbles":
                ready.append(slot)
            else:
                launch(slot, now)
        if schedule == "bubbles" and ready and len(ready) == len(slots):
            for r in sorted(ready):
                launch(r, now)
            ready = []

    mean = lambda xs: sum(xs) / len(xs) if xs else math.nan
    return Simulation(schedule, in_flight, len(pending), tokens, t_end, mean(ttfts) * 1e3, mean(tpots) * 1e3,
                      [b / t_end if t_end > 0 else 0.0 for b in busy], events)
