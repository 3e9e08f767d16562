"""The source loop (rank 0) and the stage loop (every other stage of the plan).

Rank 0 is the source: it reads and tokenises the prompts, embeds them (it always holds unit 0),
runs its own units, sends the activations on, and receives the sampled token ids from the stage
that holds the head (logits never travel). Every other stage receives activations from the stage
before it, runs its units with that micro-batch's KV cache, and sends on; the head stage samples.
Ranks the plan leaves out wait, without spinning, for the end (see runner.py).

Schedules: `sequential` (one micro-batch at a time), `bubbles` (micro-batches in flight advance
step by step together), `no-bubbles` (EdgeShard: a micro-batch's next step enters the pipeline as
soon as its token is back at the source).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from array import array
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from .comm import ACT, STOP, TOKENS, Comm
from .drift import DriftWatch
from .jobs import Job, Request
from .messages import Step
from .planner import Plan
from .results import Record, ResultWriter
from .sampling import Sampler
from .scheduler import Launch, Scheduler
from .shard import Shard
from .trace import Tracer


@dataclasses.dataclass
class Prompt:
    """A request with its token ids, ready for the source loop."""

    request: Request
    ids: list[int]
    text: str  # the prompt as stored with the results (messages as JSON)
    error: str | None = None  # why it cannot run: it is recorded as an error, not run
    endpoint: str = ""  # the OpenAI endpoint it answers as: chat messages or a text completion
    choice: int = 0  # which of the request's n choices (each runs as a row of its own)


@dataclasses.dataclass
class Summary:
    requests: int
    tokens: int
    seconds: float
    ttft_ms: float  # mean time to first token
    ms_per_token: float  # mean decode time per token
    stages: list[dict]  # per stage: rank, device, units, bytes, compute_s, steps, cpu_s, wall_s, peak_rss
    ranks: list[dict] = dataclasses.field(default_factory=list)  # the same figures for every rank
    shapes: list[tuple[int, int]] = dataclasses.field(default_factory=list)  # (prompt, output) tokens, admission order
    predicted: dict | None = None  # the simulator's figures for the same plan, schedule and requests
    admission: str = "row"  # scheduler.ADMISSIONS: as run (a model with sliding layers admits by batch)
    rows_per_step: float = 0.0  # rows a launched step carried, on average (micro-batch fullness)
    prefill_chunk: int | None = None  # as run: tokens a step prefilled of a long joining prompt
    chunked: int = 0  # requests that joined by chunks
    errors: int = 0  # requests that could not run, recorded with their error (not in `requests`)
    segments: list[dict] = dataclasses.field(default_factory=list)  # a run that moved: each plan's part (runner.py)
    leftover: list[Prompt] = dataclasses.field(default_factory=list, repr=False)  # not run: the loop drained to move

    def record(self) -> dict:
        """The figures the results file keeps (not the shapes, which it has, nor the leftover)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("shapes", "leftover")}

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

__all__ = ["Prompt", "Summary", "source_loop", "stage_loop"]


def _parse_fault(text: str | None) -> tuple[int, int | None] | None:
    if not text or text.startswith("write:"):  # write:N is the results writer's (results.py)
        return None
    r, _, s = text.partition(":")
    try:
        return int(r), int(s) if s else None
    except ValueError:
        raise ValueError(f"EDGESHARD_FAULT={text!r} is not RANK, RANK:STEP or write:N") from None


_FAULT = _parse_fault(os.environ.get("EDGESHARD_FAULT"))  # read once, not at every step


def _parse_slow(text: str | None) -> tuple[int, int, float] | None:
    if not text:
        return None
    try:
        r, s, f = text.split(":")
        return int(r), int(s), float(f)
    except ValueError:
        raise ValueError(f"EDGESHARD_SLOW={text!r} is not RANK:STEP:FACTOR") from None


_SLOW = _parse_slow(os.environ.get("EDGESHARD_SLOW"))
_steps_here = 0  # steps this rank has applied in the job, whatever its plan: what EDGESHARD_SLOW counts


def _slow_check(rank: int, shard: Shard) -> None:
    """EDGESHARD_SLOW=RANK:STEP:FACTOR: from its STEP-th step on, rank RANK's device takes FACTOR times as
    long for every step, to the end of the job, in whatever plan (Shard.drift). Tests and
    benchmarks/replan.py slow a device mid-run with it."""
    global _steps_here
    _steps_here += 1
    if _SLOW and _SLOW[0] == rank and _steps_here >= _SLOW[1]:
        shard.drift = _SLOW[2]


def _fault_check(rank: int, step: int) -> None:
    """EDGESHARD_FAULT=RANK[:STEP] raises on that rank (at that step): tests use it to check aborts."""
    if _FAULT and _FAULT[0] == rank and _FAULT[1] in (None, step):
        raise RuntimeError(f"injected fault (EDGESHARD_FAULT={os.environ['EDGESHARD_FAULT']}) at step {step}")


def _apply(shard: Shard, stats: dict, tracer: Tracer, step: Step) -> tuple[torch.Tensor, float]:
    """One step of a slot on this stage, in the order every stage applies it (messages.Step): rows
    kept, the slot re-laid out, rows joining, chunks (a row joining with its last), then one decode
    step of every row. Returns this stage's output (what the next stage takes (Step.pack), or, on the
    head's stage, the logits of the step's rows) and its compute seconds."""
    t0 = time.perf_counter()
    dec, join, chunks = step.split()
    # activations arrive in the sender's dtype (the message header's): this stage computes in its own
    cast = lambda x: None if x is None else x.to(device=shard.device,
                                                    dtype=shard.dtype if x.is_floating_point() else x.dtype)
    dec, join = cast(dec), cast(join)
    forwards = step.forwards()
    with shard.running(forwards):  # a device that times its work times it by these
        if step.fresh:
            out = shard.run_units(step.slot, join, step.pads, step.capacity)
        else:
            if step.keep is not None:
                shard.select(step.slot, step.keep)
            if step.relayout:
                shard.relayout(step.slot, step.trim, step.capacity)
            join_out = shard.join(step.slot, step.places, join, step.pads, step.width) if step.pads else None
            chunk_out = []
            for (key, start, n, total), x in zip(step.chunks, chunks):
                chunk_out.append(shard.chunk(step.slot, key, cast(x), start, total))
                if start + n == total:
                    shard.join_filled(step.slot, key, total)
            out = shard.run_units(step.slot, dec)
            if not shard.has_head:
                out = Step.pack(out, join_out, chunk_out)
    shard.sync()
    t1 = time.perf_counter()
    stats["compute_s"] += t1 - t0
    stats["steps"] += 1
    tracer.add("prefill" if step.fresh or step.width or step.chunks else "decode", t0, t1, step.slot, step.step,
               forwards)
    return out, t1 - t0


def stage_loop(comm: Comm, shard: Shard, plan: Plan, index: int, stats: dict, tracer: Tracer) -> None:
    """Receive, run this stage's units, send on (or sample and return token ids), until STOP.

    Messages are handled in the order they arrive, whatever micro-batch slot they belong to; each
    slot has its own KV cache, so the same loop serves every schedule.
    """
    prev = plan.stages[index - 1].rank
    nxt = plan.stages[index + 1].rank if index + 1 < len(plan.stages) else None
    samplers: dict[int, Sampler] = {}
    eos = _eos_ids(shard.spec.path) if nxt is None else set()  # min_tokens holds them back
    while True:
        t0 = time.perf_counter()
        msg = comm.recv(prev)
        tracer.add("wait", t0, time.perf_counter())
        if msg.kind == STOP:
            if nxt is not None:
                comm.send(nxt, STOP)
            comm.flush()
            return
        step = Step.from_wire(msg)
        _fault_check(comm.rank, step.step)
        _slow_check(comm.rank, shard)
        out, seconds = _apply(shard, stats, tracer, step)
        t0 = time.perf_counter()
        if nxt is not None:
            comm.send(nxt, ACT, *step.passed_on(out, seconds).to_wire(), wait=False)
        else:
            comm.send(0, TOKENS, *_sample_step(samplers, step, out, seconds, eos).to_wire(), wait=False)
        tracer.add("send", t0, time.perf_counter(), step.slot, step.step)


def _sample_step(samplers: dict[int, Sampler], step: Step, logits, seconds: float, eos: set[int]) -> Step:
    """The head's part of a step: the slot's sampler follows the step's row changes (from the same
    message every stage receives), then one token per row (and logprobs, for rows that ask): the
    reply, with the head's compute `seconds` after the other stages'."""
    if step.fresh:
        sampler = samplers[step.slot] = Sampler(step.sampling, step.prompts, eos)
    else:
        sampler = samplers[step.slot]
        if step.keep is not None:
            sampler.select(step.keep)
        if step.sampling:  # joining rows take their places; rows joining by chunks come after the others
            appended = range(len(sampler.rows), len(sampler.rows) + step.filled)
            sampler.replace(step.places + list(appended), step.sampling, step.prompts)
    tokens = sampler(logits)
    return step.reply(tokens, sampler.logprobs(logits, tokens), seconds)


def _eos_ids(model_path: str) -> set[int]:
    ids: set[int] = set()
    for name in ("generation_config.json", "config.json"):
        f = Path(model_path) / name
        if f.is_file():
            eos = json.loads(f.read_text()).get("eos_token_id")
            if eos is not None:
                ids.update(eos if isinstance(eos, list) else [eos])
                break  # generate() stops on the generation config's EOS when it has one
    return ids


class _Row:
    """One request's progress inside a micro-batch, on the source."""

    def __init__(self, prompt: Prompt):
        self.prompt = prompt
        self.gen = prompt.request.generation
        self.tokens: list[int] = []
        self.logprobs: list[float] = []  # the chosen tokens', when the request asks (SamplingParams.logprobs)
        self.top_ids: list[int] = []  # the top k tokens of each step, flattened
        self.top_logprobs: list[float] = []
        self.finish: str | None = None
        self.text = ""
        self.t_start = self.t_first = self.t_last = 0.0  # launched, first token, last token

    def add(self, token: int, now: float, eos: set[int], tok, logprobs=None) -> None:
        """One new token; logprobs: the head's ([chosen, top...], [top ids]) for it, when rows asked."""
        self.tokens.append(token)
        k = self.gen.sampling.logprobs
        if k >= 0 and logprobs is not None:
            values, ids = logprobs
            self.logprobs.append(values[0])
            self.top_logprobs += values[1:1 + k]
            self.top_ids += ids[:k]
        if len(self.tokens) == 1:
            self.t_first = now
        self.t_last = now
        sp = self.gen.sampling
        if len(self.tokens) < sp.min_tokens:
            pass  # nothing ends a request before min_tokens (the head held EOS and the stop ids back)
        elif token in eos and not sp.ignore_eos:
            self.finish = "eos"
        elif token in sp.stop_token_ids:
            self.finish = "stop"
            self.text = tok.decode(self.tokens[:-1], skip_special_tokens=True)
        elif self.gen.stop:
            # a new stop string must end in the newest tokens: look at a short decoded tail first,
            # so the check stays O(1) per token; decode everything only on a hit
            tail = tok.decode(self.tokens[-(max(map(len, self.gen.stop)) + 8):], skip_special_tokens=True)
            if any(s in tail for s in self.gen.stop):
                text = tok.decode(self.tokens, skip_special_tokens=True)
                cut = min((i for i in (text.find(s) for s in self.gen.stop) if i >= 0), default=-1)
                if cut >= 0:
                    self.finish, self.text = "stop", text[:cut]
        if not self.finish and len(self.tokens) >= self.gen.max_new_tokens:
            self.finish = "length"


def _step_of(ln: Launch, pad_id: int) -> Step:
    """The step message for a scheduler launch, its rows being `_Row`s: the token ids rank 0 embeds."""

    def padded(rows: list[_Row], cut: int) -> torch.Tensor:  # prompts less `cut` tokens, left-padded
        ids = [r.prompt.ids[:len(r.prompt.ids) - cut] for r in rows]
        return torch.tensor([[pad_id] * (ln.width - len(i)) + i for i in ids], dtype=torch.long)

    rows = [r.item for r in ln.join]
    new = rows + [r.item for r in ln.filled]  # every row that joins in this step, in the stages' order
    sampling = [r.gen.sampling for r in new]
    prompts = [r.prompt.ids if r.gen.sampling.needs_prompt else [] for r in new]
    if ln.fresh:
        return Step(ln.slot, 0, padded(rows, 0), True, 0, None, [], ln.pads, ln.width, 0, ln.capacity, sampling,
                    prompts)
    # a staying row feeds its newest token, a joining row its last prompt token (scheduler.py)
    last = torch.tensor([r.item.tokens[-1] if r.made else r.item.prompt.ids[-1] for r in ln.rows], dtype=torch.long)
    join = padded(rows, 1) if rows and ln.width else None
    chunks = [torch.tensor([r.item.prompt.ids[start:start + n]]) for r, start, n in ln.chunks]
    return Step(ln.slot, ln.step, Step.pack(last[:, None], join, chunks), False, len(ln.rows), ln.keep, ln.places,
                ln.pads, ln.width, ln.trim, ln.capacity if ln.relayout else 0, sampling, prompts,
                chunks=[(r.index, start, n, r.prompt_tokens - 1) for r, start, n in ln.chunks], columns=ln.columns)


def _error_record(p: Prompt) -> Record:
    nan = float("nan")
    return Record(p.request.id, p.request.where, p.text, "", [], "error", len(p.ids), 0, nan, nan, "error", p.error,
                  p.endpoint)


def _record(r: _Row, tok) -> Record:
    n = len(r.tokens)
    text = r.text if r.finish == "stop" else tok.decode(r.tokens, skip_special_tokens=True)
    tpot = (r.t_last - r.t_first) * 1e3 / (n - 1) if n > 1 else float("nan")
    return Record(r.prompt.request.id, r.prompt.request.where, r.prompt.text, text, r.tokens, r.finish,
                  len(r.prompt.ids), n, (r.t_first - r.t_start) * 1e3, tpot, endpoint=r.prompt.endpoint,
                  choice=r.prompt.choice, logprobs=r.logprobs, top_ids=r.top_ids, top_logprobs=r.top_logprobs)


def source_loop(comm: Comm, shard: Shard, plan: Plan, job: Job, tok, prompts: Iterator[Prompt],
                writer: ResultWriter, progress: bool, stats: dict, tracer: Tracer, *, schedule: str = "no-bubbles",
                in_flight: int = 1, admission: str = "row", total: int | None = None,
                row_budget: int | None = None, prefill_chunk: int | None = None, watch: DriftWatch | None = None,
                move: Callable[[DriftWatch, int, int], bool] | None = None,
                beat: Callable[[], None] | None = None) -> Summary:
    """Rank 0: feed micro-batch slots through the pipeline, results to HDF5 as they finish.

    scheduler.py decides what each step of each slot carries (which rows stay, which join) and when it
    goes; this loop builds the step messages, runs rank 0's units, and takes the tokens that come back.
    `watch` follows each stage's compute against its profile; while a stage drifts, `move(watch,
    requests done, tokens made)` is asked (at most once a window) whether to move to a new plan:
    then nothing more is admitted, the micro-batches in flight finish, and the Summary's `leftover`
    holds the prompts taken but not run. `beat()` is called as each step comes back and after each
    of rank 0's own forwards: the progress that `edgeshard launch` watches for (launcher.Heartbeat).
    """
    from tqdm import tqdm

    nxt = plan.stages[1].rank if len(plan.stages) > 1 else None
    head = plan.stages[-1].rank
    eos = _eos_ids(shard.spec.path)
    if tok.pad_token_id is None and not eos:
        raise ValueError(f"{shard.spec.path}: the model has no pad token and no eos_token_id to pad with")
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else min(eos)
    bar = tqdm(total=total, unit="req", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    counts = {"requests": 0, "tokens": 0, "errors": 0}
    ttfts, tpots = [], []
    t_run = time.perf_counter()
    samplers: dict[int, Sampler] = {}  # slot -> sampler, when rank 0 holds the head itself
    local_tokens: list[Step] = []  # the head's replies, computed here when rank 0 is the head

    # the job's shape for the simulator: (prompt, output) tokens of each request in admission order,
    # 16 bytes a request (a finished row itself, with its prompt and text, is not kept)
    prompt_lens, output_lens = array("q"), array("q")

    def source():
        for p in prompts:
            if p.error:  # recorded as it is, and the job goes on
                writer.append([_error_record(p)])
                counts["errors"] += 1
                bar.update(1)
                continue
            prompt_lens.append(len(p.ids))
            output_lens.append(0)
            yield _Row(p), len(p.ids), p.request.generation.max_new_tokens

    sched = Scheduler(source(), micro_batch_size=job.micro_batch_size, schedule=schedule, in_flight=in_flight,
                      stages=len(plan.stages), admission=admission, row_budget=row_budget,
                      prefill_chunk=prefill_chunk)
    # slot -> its step in flight, and that step's forwards
    launched: dict[int, tuple[Launch, list[tuple[int, int, int]]]] = {}
    leftover: list[Prompt] = []

    def launch(ln: Launch) -> None:
        """Build the slot's step message, run rank 0's units on it, send it on."""
        _fault_check(0, ln.step)
        now = time.perf_counter()
        for r in ln.join + [r for r, start, _ in ln.chunks if start == 0]:
            r.item.t_start = now
        step = _step_of(ln, pad_id)
        launched[ln.slot] = ln, step.forwards()
        _slow_check(0, shard)
        out, seconds = _apply(shard, stats, tracer, step)
        if beat is not None:  # a long stage-0 prefill is progress too, not a hung rank 0
            beat()
        if nxt is None:
            local_tokens.append(_sample_step(samplers, step, out, seconds, eos))
        else:
            t0 = time.perf_counter()
            comm.send(nxt, ACT, *step.passed_on(out, seconds).to_wire(), wait=False)
            tracer.add("send", t0, time.perf_counter(), ln.slot, ln.step)

    def finish(rows: list[_Row]) -> None:
        records = [_record(r, tok) for r in rows]
        writer.append(records)
        for rec in records:
            counts["tokens"] += rec.output_tokens
            ttfts.append(rec.ttft_ms)
            if rec.output_tokens > 1:
                tpots.append(rec.ms_per_token)
        counts["requests"] += len(records)
        bar.update(len(records))
        errors = f", {counts['errors']} errors" if counts["errors"] else ""
        drift = f", {watch.postfix()}" if watch is not None and watch.drifting else ""
        bar.set_postfix_str(f"{counts['tokens'] / (time.perf_counter() - t_run):.1f} tok/s{errors}{drift}")

    def watched(back: Step, forwards: list[tuple[int, int, int]]) -> None:
        for d in watch.observe(back.times, forwards, len(back.tensor), time.perf_counter() - t_run):
            tqdm.write(f"edgeshard: drift: {d.describe()} over its last {d.steps} steps", file=sys.stderr)
        if move is not None and not sched.draining and watch.due() and move(watch, counts["requests"], counts["tokens"]):
            leftover.extend(r.prompt for r in sched.drain())

    for ln in sched.start():
        launch(ln)
    while sched.slots:
        if local_tokens:
            back = local_tokens.pop(0)
        else:
            t0 = time.perf_counter()
            msg = comm.recv(head, TOKENS)
            tracer.add("wait", t0, time.perf_counter())
            back = Step.from_wire(msg)
        if beat is not None:
            beat()
        slot = back.slot
        ln, forwards = launched.pop(slot)
        if watch is not None:
            watched(back, forwards)
        now = time.perf_counter()
        finished = []
        values = back.logprobs.tolist() if back.logprobs is not None else None
        ids = back.top_ids.tolist() if back.logprobs is not None else None
        for i, (row, t) in enumerate(zip(ln.rows, back.tensor.tolist())):
            row.item.add(t, now, eos, tok, (values[i], ids[i]) if values is not None else None)
            if row.item.finish:
                finished.append(i)
                output_lens[row.index] = len(row.item.tokens)
        if finished:
            finish([ln.rows[i].item for i in finished])
        more, done = sched.returned(slot, finished)
        if done:
            shard.release(slot)
            samplers.pop(slot, None)
        for nl in more:
            launch(nl)
    bar.close()
    if nxt is not None:
        comm.send(nxt, STOP)
    comm.flush()
    return Summary(counts["requests"], counts["tokens"], 0.0, float(np.mean(ttfts)) if ttfts else float("nan"),
                   float(np.mean(tpots)) if tpots else float("nan"), [],
                   shapes=list(zip(prompt_lens, output_lens))[:sched.admitted], admission=admission,
                   prefill_chunk=sched.prefill_chunk, chunked=sched.chunked,
                   rows_per_step=sched.row_steps / sched.steps if sched.steps else 0.0, errors=counts["errors"],
                   leftover=leftover)
