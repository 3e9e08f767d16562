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
from typing import Iterator

import numpy as np
import torch

from .comm import ACT, STOP, TOKENS, Comm
from .jobs import Job, Request
from .planner import Plan
from .results import Record, ResultWriter
from .sampling import Sampler, SamplingParams
from .shard import Shard
from .trace import Tracer


@dataclasses.dataclass
class Prompt:
    """A request with its token ids, ready for the source loop."""

    request: Request
    ids: list[int]
    text: str  # the prompt as stored with the results (messages as JSON)


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


def _fault_check(rank: int, step: int) -> None:
    """EDGESHARD_FAULT=RANK[:STEP] raises on that rank (at that step): tests use it to check aborts."""
    if _FAULT and _FAULT[0] == rank and _FAULT[1] in (None, step):
        raise RuntimeError(f"injected fault (EDGESHARD_FAULT={os.environ['EDGESHARD_FAULT']}) at step {step}")


def _timed_forward(shard: Shard, stats: dict, tracer: Tracer, slot: int, step: int, x: torch.Tensor, meta,
                   keep=None) -> torch.Tensor:
    """One step of a slot on this stage; `meta` (the rows' table) comes with a micro-batch's first step."""
    t0 = time.perf_counter()
    if keep is not None:
        shard.select(slot, keep)
    pads = capacity = None
    if meta is not None:  # KV room for the longest row: its prompt, then all but its last new token
        pads, capacity = [int(p) for p in meta[:, 0]], x.shape[1] + int(meta[:, 1].max()) - 1
    # activations arrive in the sender's dtype (the message header's): this stage computes in its own
    x = x.to(device=shard.device, dtype=shard.dtype if x.is_floating_point() else x.dtype)
    out = shard.forward(slot, x, pads, capacity)
    shard.sync()
    t1 = time.perf_counter()
    stats["compute_s"] += t1 - t0
    stats["steps"] += 1
    tracer.add("prefill" if pads is not None else "decode", t0, t1, slot, step)
    return out


def stage_loop(comm: Comm, shard: Shard, plan: Plan, index: int, stats: dict, tracer: Tracer) -> None:
    """Receive, run this stage's units, send on (or sample and return token ids), until STOP.

    Messages are handled in the order they arrive, whatever micro-batch slot they belong to; each
    slot has its own KV cache, so the same loop serves every schedule.
    """
    prev = plan.stages[index - 1].rank
    nxt = plan.stages[index + 1].rank if index + 1 < len(plan.stages) else None
    samplers: dict[int, Sampler] = {}
    while True:
        t0 = time.perf_counter()
        msg = comm.recv(prev)
        tracer.add("wait", t0, time.perf_counter())
        if msg.kind == STOP:
            if nxt is not None:
                comm.send(nxt, STOP)
            comm.flush()
            return
        _fault_check(comm.rank, msg.step)
        # a micro-batch's first step carries its rows' table: left pads, new tokens, sampling settings
        out = _timed_forward(shard, stats, tracer, msg.slot, msg.step, msg.tensor, msg.meta, msg.keep)
        t0 = time.perf_counter()
        if nxt is not None:
            comm.send(nxt, ACT, msg.slot, msg.step, out, msg.meta, msg.keep, wait=False)
        else:
            tokens = _sample_step(samplers, msg.slot, out, msg.meta, msg.keep)
            comm.send(0, TOKENS, msg.slot, msg.step, tokens, wait=False)
        tracer.add("send", t0, time.perf_counter(), msg.slot, msg.step)


def _sample_step(samplers: dict[int, Sampler], slot: int, logits: torch.Tensor, meta, keep) -> torch.Tensor:
    """The head's part of a step: a new sampler on a micro-batch's first step (from the same row
    table every stage receives), the finished rows dropped, then one token per row."""
    if meta is not None:
        samplers[slot] = Sampler([SamplingParams.from_row(r) for r in meta[:, 2:]])
    elif keep is not None:
        samplers[slot].select(keep)
    return samplers[slot](logits)


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

    def __init__(self, prompt: Prompt, index: int):
        self.prompt = prompt
        self.index = index  # its place in admission order
        self.gen = prompt.request.generation
        self.tokens: list[int] = []
        self.finish: str | None = None
        self.text = ""
        self.t_first = self.t_last = 0.0

    def add(self, token: int, now: float, eos: set[int], tok) -> None:
        self.tokens.append(token)
        if len(self.tokens) == 1:
            self.t_first = now
        self.t_last = now
        if token in eos:
            self.finish = "eos"
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


class _MicroBatch:
    """A micro-batch in a slot, on the source: its rows, and which of them still generate."""

    def __init__(self, rows: list[_Row], pad_id: int):
        self.rows = rows
        self.active = list(range(len(rows)))  # rows the stages still hold, in their order
        self.keep: list[int] | None = None  # positions (in the stages' order) kept at the next step
        self.step = 0
        self.t_start = 0.0
        width = max(len(r.prompt.ids) for r in rows)
        self.pads = [width - len(r.prompt.ids) for r in rows]
        self.ids = torch.tensor([[pad_id] * p + r.prompt.ids for p, r in zip(self.pads, rows)])  # (B, T)
        # the rows' table every stage gets with the first step: pads, new tokens, sampling settings
        self.meta = np.array([[p, r.gen.max_new_tokens, *r.gen.sampling().to_row()] for p, r in zip(self.pads, rows)],
                             dtype=np.float64)
        self.last: torch.Tensor | None = None  # last tokens of the active rows, (A,)

    def take(self, tokens: list[int], now: float, eos: set[int], tok) -> list[_Row]:
        """Record a step's tokens; drop rows that finished; return them."""
        done = []
        for i, t in zip(self.active, tokens):
            self.rows[i].add(t, now, eos, tok)
        still = [k for k, i in enumerate(self.active) if not self.rows[i].finish]
        if len(still) < len(self.active):
            done = [self.rows[i] for i in self.active if self.rows[i].finish]
            self.keep = still  # the stages drop the finished rows before the next step
            self.active = [self.active[k] for k in still]
        self.last = torch.tensor([tokens[k] for k in still], dtype=torch.long)
        self.step += 1
        return done


def _record(r: _Row, t_start: float, tok) -> Record:
    n = len(r.tokens)
    text = r.text if r.finish == "stop" else tok.decode(r.tokens, skip_special_tokens=True)
    tpot = (r.t_last - r.t_first) * 1e3 / (n - 1) if n > 1 else float("nan")
    return Record(r.prompt.request.id, r.prompt.request.where, r.prompt.text, text, r.tokens, r.finish,
                  len(r.prompt.ids), n, (r.t_first - t_start) * 1e3, tpot)


def source_loop(comm: Comm, shard: Shard, plan: Plan, job: Job, tok, prompts: Iterator[Prompt],
                writer: ResultWriter, progress: bool, stats: dict, tracer: Tracer, *, schedule: str = "no-bubbles",
                in_flight: int = 1, total: int | None = None) -> Summary:
    """Rank 0: feed micro-batches through the pipeline, results to HDF5 as they finish.

    Up to `in_flight` micro-batches (slots) run at once. `no-bubbles`: a slot's next step enters the
    pipeline as soon as its tokens are back. `bubbles`: step t+1 of any slot starts only when every
    slot in flight has finished step t. `sequential`: one slot. A slot whose rows have all finished
    takes the next prompts at once (continuous admission); finished rows leave their micro-batch at
    the next step, so they cost no more compute.
    """
    from tqdm import tqdm

    if schedule == "sequential":
        in_flight = 1
    nxt = plan.stages[1].rank if len(plan.stages) > 1 else None
    head = plan.stages[-1].rank
    eos = _eos_ids(shard.spec.path)
    if tok.pad_token_id is None and not eos:
        raise ValueError(f"{shard.spec.path}: the model has no pad token and no eos_token_id to pad with")
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else min(eos)
    bar = tqdm(total=total, unit="req", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    counts = {"requests": 0, "tokens": 0}
    ttfts, tpots = [], []
    t_run = time.perf_counter()
    samplers: dict[int, Sampler] = {}  # slot -> sampler, when rank 0 holds the head itself
    local_tokens: list[tuple[int, torch.Tensor]] = []  # (slot, tokens) computed here when rank 0 is the head

    # the job's shape for the simulator: (prompt, output) tokens of each request in admission order,
    # 16 bytes a request (a finished row itself, with its prompt and text, is not kept)
    prompt_lens, output_lens = array("q"), array("q")

    def admit() -> _MicroBatch | None:
        rows = [_Row(p, len(prompt_lens) + i) for i, p in zip(range(job.micro_batch_size), prompts)]
        for r in rows:
            prompt_lens.append(len(r.prompt.ids))
            output_lens.append(0)
        return _MicroBatch(rows, pad_id) if rows else None

    def launch(slot: int, mb: _MicroBatch) -> None:
        """Run rank 0's units for the slot's next step and send it on."""
        _fault_check(0, mb.step)
        first = mb.step == 0
        if first:
            mb.t_start = time.perf_counter()
        x = mb.ids if first else mb.last[:, None]  # (B, T) or (A, 1)
        keep, mb.keep = mb.keep, None
        out = _timed_forward(shard, stats, tracer, slot, mb.step, x, mb.meta if first else None, keep)
        if nxt is None:
            local_tokens.append((slot, _sample_step(samplers, slot, out, mb.meta if first else None, keep)))
        else:
            t0 = time.perf_counter()
            comm.send(nxt, ACT, slot, mb.step, out, mb.meta if first else None,
                      None if keep is None else np.array(keep), wait=False)
            tracer.add("send", t0, time.perf_counter(), slot, mb.step)

    def finish(rows: list[_Row], t_start: float) -> None:
        records = [_record(r, t_start, tok) for r in rows]
        writer.append(records)
        for r in rows:
            output_lens[r.index] = len(r.tokens)
        for rec in records:
            counts["tokens"] += rec.output_tokens
            ttfts.append(rec.ttft_ms)
            if rec.output_tokens > 1:
                tpots.append(rec.ms_per_token)
        counts["requests"] += len(records)
        bar.update(len(records))
        bar.set_postfix_str(f"{counts['tokens'] / (time.perf_counter() - t_run):.1f} tok/s")

    slots: dict[int, _MicroBatch] = {}
    for slot in range(max(1, in_flight)):
        mb = admit()
        if mb is None:
            break
        slots[slot] = mb
        launch(slot, mb)
    ready: list[int] = []  # bubbles: slots whose step came back, waiting for the others
    while slots:
        if local_tokens:
            slot, tokens = local_tokens.pop(0)
        else:
            t0 = time.perf_counter()
            msg = comm.recv(head, TOKENS)
            tracer.add("wait", t0, time.perf_counter())
            slot, tokens = msg.slot, msg.tensor
        mb = slots[slot]
        done = mb.take(tokens.tolist(), time.perf_counter(), eos, tok)
        if done:
            finish(done, mb.t_start)
        if not mb.active:  # every row finished: the slot takes new prompts
            new = admit()
            if new is None:
                del slots[slot]
                shard.release(slot)
            else:
                slots[slot] = new
        if slot in slots:
            if schedule == "bubbles":
                ready.append(slot)
            else:
                launch(slot, slots[slot])
        if schedule == "bubbles" and ready and len(ready) == len(slots):
            for s in sorted(ready):  # the step barrier: everyone in flight has finished this step
                launch(s, slots[s])
            ready = []
    bar.close()
    if nxt is not None:
        comm.send(nxt, STOP)
    comm.flush()
    return Summary(counts["requests"], counts["tokens"], 0.0, float(np.mean(ttfts)) if ttfts else float("nan"),
                   float(np.mean(tpots)) if tpots else float("nan"), [],
                   shapes=list(zip(prompt_lens, output_lens)))
