"""A discrete-event replay of the pipeline's schedules on a Profile and a Plan, without a model.

    edgeshard simulate --profile profiles/paper-llama2-7b.json --objective throughput
    edgeshard simulate --profile P --plan plan.json --prompt-tokens 32 --new-tokens 96 --micro-batches 16

The run's own scheduler (scheduler.py) decides what each step carries and when it goes, here as in
`pipeline.source_loop`; this module only keeps the clock: each stage serves its arrivals in order
(one at a time, with that step's cost), every hop takes the link's latency plus bytes / bandwidth
with messages queued on the link one after another (as comm.py's link emulation delivers them), and
the head's token ids go back to rank 0, which hands them to the scheduler.

Step costs come from the profile, which times a decode step and a prefill of one micro-batch: a
stage's forward over T tokens (rows x width) is a straight line through those two points (a decode
step is its device's step cost plus its units' decode times, Profile.costs, Costs.stage_compute), so
it keeps a step's fixed cost, and a step of fewer rows costs less by their tokens' share of the
slope. Where the profile also timed a decode step of one row (Profile.one_row_s), a decode of fewer
rows runs on the line from that step to the profile's decode instead: a decode's rows each cost far
more than a prefill's tokens (smollm2 at 8 rows: about 5 ms a row against 1.4 ms a token). Where the
profile timed its blocks' decode at every row count up to its micro-batch (Profile.row_shape), that
way follows their shape, not a straight line: the few-row products' forms differ by row count. A decode
step also reads every row's KV cache, which grows with its slot's columns: past the profile's
context it costs each row its blocks' KV bytes per column times the device's measured seconds per
KV byte (Profile.context_costs), and less below it. A prefill's attention grows with its rows'
width the same way: past the profile's prompt each of its tokens costs its blocks' KV bytes per
column of width times the device's measured seconds for that (the prefill's line holds attention
at the profile's prompt length only; smollm2's prefill of 8 rows took 1.15x a token's cost at 512
tokens a row against 128). Figures are those a run reports
(pipeline.Summary): tokens/s over the whole job, mean decode ms/token per request (first to last
token), mean time to first token, and each stage's busy share.

Pure Python: no torch, no MPI.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
from typing import Sequence

from .planner import Plan, PlanError
from .scheduler import SCHEDULES, Launch, Scheduler

__all__ = ["Request", "Simulation", "StageLine", "StepCosts", "simulate", "uniform_requests", "SCHEDULES"]

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
    context: the columns the profile's decode step attended over; kv_s[s]: stage s's decode cost per row
    per column beyond them, as (window, seconds) by its blocks' sliding window (None: full attention);
    one_s[s]: stage s's decode step of one row (None: not measured); prefill_kv_s[s]: stage s's
    prefill cost per token per column of its rows' width beyond the profile's prompt, by window as
    kv_s. Each empty for a profile that did not measure it.
    """

    decode_s: tuple[float, ...]
    prefill_s: tuple[float, ...]
    prompt_tokens: int
    out_bytes: tuple[float, ...]
    latency: tuple[float, ...]
    bandwidth: tuple[float, ...]
    rows: int = 1  # the profile's micro-batch: the rows its decode and prefill times are for
    context: int = 0
    kv_s: tuple[tuple[tuple[int | None, float], ...], ...] = ()
    one_s: tuple[float | None, ...] = ()
    prefill_kv_s: tuple[tuple[tuple[int | None, float], ...], ...] = ()
    row_shape: tuple[tuple[float, ...] | None, ...] = ()  # per stage: Profile.row_shape of its device

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
        decode, prefill, out, lat, bw, kv, one, pkv, shape = [], [], [], [], [], [], [], [], []
        for s, nxt in zip(plan.stages, list(plan.stages[1:]) + [None]):
            decode.append(decode_costs.stage_compute(s.rank, s.first, s.last))
            kv.append(profile.context_costs(s.rank, s.first, s.last))
            pkv.append(profile.context_costs(s.rank, s.first, s.last, "prefill_kv_s"))
            one.append(profile.one_row_s(s.rank, s.first, s.last))
            shape.append(profile.row_shape(s.rank))
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
                   tuple(lat), tuple(bw), int(profile.shapes.get("micro_batch_size", 1)),
                   int(profile.shapes.get("context", 0)), tuple(kv), tuple(one), tuple(pkv), tuple(shape))

    def line(self, s: int) -> "StageLine":
        return StageLine(self.decode_s[s], self.prefill_s[s], self.rows, self.prompt_tokens, self.context,
                         self.kv_s[s] if self.kv_s else (), self.one_s[s] if self.one_s else None,
                         self.prefill_kv_s[s] if self.prefill_kv_s else (),
                         self.row_shape[s] if self.row_shape else None)

    def compute(self, s: int, width: int, rows: int | None = None, columns: int = 0) -> float:
        """Stage s's forward over `rows` rows (default: the profile's) of `width` new tokens each: 1 for a
        decode step over `columns` KV columns, the prompt for a prefill (StageLine.seconds)."""
        return self.line(s).seconds(width * (self.rows if rows is None else rows), columns, width)


@dataclasses.dataclass(frozen=True)
class StageLine:
    """One stage's forward time as a function of the tokens it computes: the straight line through
    the profile's decode step (`rows` tokens) and prefill (`rows` x `prompt_tokens`), never below
    nothing; for a decode, the line from one row (`one_s`) to the profile's rows where measured, and
    each row's reading of its KV columns against the profile's `context`, and for a prefill its
    tokens' attention over their rows' width against the profile's prompt (StepCosts). The
    simulator costs every forward with it, and a device with `clock=work` takes exactly this long
    (shard.Shard.running), so that the two differ only in what the simulator models besides
    compute."""

    decode_s: float
    prefill_s: float
    rows: int
    prompt_tokens: int
    context: int = 0
    kv_s: tuple[tuple[int | None, float], ...] = ()
    one_s: float | None = None  # a decode step of one row, where the profile measured it
    prefill_kv_s: tuple[tuple[int | None, float], ...] = ()
    row_shape: tuple[float, ...] | None = None  # 1..rows: the share of the way from one_s to decode_s

    def seconds(self, tokens: int, columns: int = 0, width: int = 0) -> float:
        """A forward over `tokens` tokens; `columns`: a decode's (one token a row) KV columns, 0 for a
        prefill, whose rows are `width` tokens each (0: as the profile's prompt)."""
        p = self.prompt_tokens
        if columns and self.one_s is not None and self.rows > 1:  # a decode of `tokens` rows
            shape = self.row_shape
            share = shape[tokens - 1] if shape and 1 <= tokens <= len(shape) else (tokens - 1) / (self.rows - 1)
            t = self.one_s + (self.decode_s - self.one_s) * share
        elif p <= 1:
            t = self.prefill_s * tokens / self.rows
        else:  # a token more never costs less: a prefill measured below its decode (noise, a short
            # prompt) would otherwise price longer prompts below nothing
            per_token = max(0.0, self.prefill_s - self.decode_s) / (self.rows * (p - 1))
            t = self.decode_s + per_token * (tokens - self.rows)
        if columns:
            c = self.context
            t += tokens * sum(k * (min(columns, w or columns) - min(c, w or c)) for w, k in self.kv_s)
        elif width:
            t += tokens * sum(k * (min(width, w or width) - min(p, w or p)) for w, k in self.prefill_kv_s)
        return max(0.0, t)


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
    admission: str = "row"
    rows_per_step: float = 0.0  # rows a launched step carried, on average

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


def simulate(costs: StepCosts, requests: Sequence[Request], *, micro_batch_size: int, schedule: str = "no-bubbles",
             in_flight: int | None = None, admission: str = "row", prefill_chunk: int | None = None,
             ranks: Sequence[int] | None = None, trace: bool = False) -> Simulation:
    """Replay `requests` (in admission order) through the stages; see the module docstring.

    ranks: each stage's rank, for trace events (default 0..stages-1).
    """
    n_st = len(costs.decode_s)
    pending = [r for r in requests if r.new_tokens > 0]
    sched = Scheduler(((i, r.prompt_tokens, r.new_tokens) for i, r in enumerate(pending)),
                      micro_batch_size=micro_batch_size, schedule=schedule, in_flight=in_flight, stages=n_st,
                      admission=admission, prefill_chunk=prefill_chunk)
    ranks = list(ranks) if ranks is not None else list(range(n_st))
    events: list[dict] = []
    busy = [0.0] * n_st
    free = [0.0] * n_st  # when each stage finishes the work it has
    link_free = [0.0] * n_st  # when the link out of each stage finishes its last message
    queue: list[tuple[float, int, int, Launch]] = []  # (arrival time, seq, stage, step): FIFO per stage
    seq = 0
    t_start: dict[int, float] = {}  # request -> when the step it joined in started
    t_first: dict[int, float] = {}
    ttfts: list[float] = []
    tpots: list[float] = []
    tokens = 0
    t_end = 0.0

    def step_cost(s: int, ln: Launch) -> float:
        """A fresh step is one prefill of its rows. Otherwise one decode of every row and, when rows
        join, a prefill of their prompts but the last token, and each chunk: forwards of their own (each
        its fixed cost again)."""
        if ln.fresh:
            return costs.compute(s, ln.width, len(ln.rows))
        cost = costs.compute(s, 1, len(ln.rows), ln.columns)
        if ln.width:
            cost += costs.compute(s, ln.width, len(ln.join))
        return cost + sum(costs.compute(s, n, 1) for _, _, n in ln.chunks)

    def run_stage(s: int, ln: Launch, t: float) -> None:
        """Stage s takes the step at time t (or when it is free), and sends it on."""
        nonlocal seq
        start = max(t, free[s])
        dur = step_cost(s, ln)
        free[s] = start + dur
        busy[s] += dur
        if trace:
            events.append({"rank": ranks[s], "name": "prefill" if ln.fresh or ln.width or ln.chunks else "decode",
                           "ts": start, "dur": dur, "slot": ln.slot, "step": ln.step})
        carried = len(ln.rows) * ln.width if ln.fresh else (len(ln.rows) + len(ln.join) * ln.width
                                                             + sum(n for _, _, n in ln.chunks))
        nbytes = costs.out_bytes[s] * (carried if s < n_st - 1 else len(ln.rows))
        if s == n_st - 1 and n_st == 1:
            arrive = free[s]  # the source holds the head: its tokens are at hand
        else:
            send = max(free[s], link_free[s])
            link_free[s] = send + nbytes / costs.bandwidth[s]
            arrive = link_free[s] + costs.latency[s]
        heapq.heappush(queue, (arrive, seq, (s + 1) % n_st if n_st > 1 else 0, ln))
        seq += 1

    def launch(ln: Launch, t: float) -> None:
        for r in ln.join + [r for r, start, _ in ln.chunks if start == 0]:
            t_start[r.item] = max(t, free[0])
        run_stage(0, ln, t)

    for ln in sched.start():
        launch(ln, 0.0)
    while queue:
        t, _, s, ln = heapq.heappop(queue)
        if s != 0:
            run_stage(s, ln, t)
            continue
        # tokens back at the source: the source takes them when it is free, then decides
        now = max(t, free[0])
        free[0] = now
        finished = []
        for i, r in enumerate(ln.rows):
            tokens += 1
            if r.made == 0:
                t_first[r.item] = now
                ttfts.append(now - t_start[r.item])
            if r.made + 1 >= r.max_new_tokens:
                finished.append(i)
                if r.max_new_tokens > 1:
                    tpots.append((now - t_first[r.item]) / (r.max_new_tokens - 1))
        t_end = max(t_end, now)
        more, _ = sched.returned(ln.slot, finished)
        for nl in more:
            launch(nl, now)

    mean = lambda xs: sum(xs) / len(xs) if xs else math.nan
    return Simulation(schedule, sched.in_flight, len(pending), tokens, t_end, mean(ttfts) * 1e3, mean(tpots) * 1e3,
                      [b / t_end if t_end > 0 else 0.0 for b in busy], events, admission,
                      sched.row_steps / sched.steps if sched.steps else 0.0)
