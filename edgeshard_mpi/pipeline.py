"""The source loop (rank 0) and the stage loop (every other stage of the plan).

Rank 0 is the source: it reads and tokenises the prompts, embeds them (it always holds unit 0),
runs its own units, sends the activations on, and receives the sampled token ids from the stage
that holds the head (logits never travel). Every other stage receives activations from the stage
before it, runs its units with that micro-batch's KV cache, and sends on; the head stage samples.
Ranks the plan leaves out wait, without spinning, for the end (see runner.py).

Schedule: `sequential`, one micro-batch at a time through all stages.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .comm import ACT, STOP, TOKENS, Comm
from .jobs import Job, Request
from .planner import Plan
from .results import Record, ResultWriter
from .sampling import Sampler, SamplingParams
from .shard import Shard


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

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

__all__ = ["Prompt", "Summary", "source_loop", "stage_loop"]


def _fault_check(rank: int, step: int) -> None:
    """EDGESHARD_FAULT=RANK[:STEP] raises on that rank (at that step): tests use it to check aborts."""
    fault = os.environ.get("EDGESHARD_FAULT")
    if fault:
        r, _, s = fault.partition(":")
        if int(r) == rank and (not s or int(s) == step):
            raise RuntimeError(f"injected fault (EDGESHARD_FAULT={fault}) at step {step}")


def _timed_forward(shard: Shard, stats: dict, slot: int, x: torch.Tensor, pads) -> torch.Tensor:
    t0 = time.perf_counter()
    out = shard.forward(slot, x.to(shard.device), pads)
    stats["compute_s"] += time.perf_counter() - t0
    stats["steps"] += 1
    return out


def stage_loop(comm: Comm, shard: Shard, plan: Plan, index: int, stats: dict) -> None:
    """Receive, run this stage's units, send on (or sample and return token ids), until STOP."""
    prev = plan.stages[index - 1].rank
    nxt = plan.stages[index + 1].rank if index + 1 < len(plan.stages) else None
    samplers: dict[int, Sampler] = {}
    while True:
        msg = comm.recv(prev)
        if msg.kind == STOP:
            if nxt is not None:
                comm.send(nxt, STOP)
            return
        _fault_check(comm.rank, msg.step)
        pads = None
        if msg.meta is not None:  # a micro-batch's first step: fresh cache, its rows' settings
            pads = [int(p) for p in msg.meta[:, 0]]
            if nxt is None:
                samplers[msg.slot] = Sampler([SamplingParams.from_row(r) for r in msg.meta[:, 1:]])
        out = _timed_forward(shard, stats, msg.slot, msg.tensor, pads)
        if nxt is not None:
            comm.send(nxt, ACT, msg.slot, msg.step, out, msg.meta)
        else:
            comm.send(0, TOKENS, msg.slot, msg.step, samplers[msg.slot](out))


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
        self.finish: str | None = None
        self.text = ""
        self.t_first = self.t_last = 0.0

    def add(self, token: int, now: float, eos: set[int], tok) -> None:
        if self.finish:
            return  # a finished row rides along until its micro-batch ends; its tokens are dropped
        self.tokens.append(token)
        if len(self.tokens) == 1:
            self.t_first = now
        self.t_last = now
        if token in eos:
            self.finish = "eos"
        elif self.gen.stop:
            text = tok.decode(self.tokens, skip_special_tokens=True)
            cut = min((i for i in (text.find(s) for s in self.gen.stop) if i >= 0), default=-1)
            if cut >= 0:
                self.finish, self.text = "stop", text[:cut]
        if not self.finish and len(self.tokens) >= self.gen.max_new_tokens:
            self.finish = "length"


def source_loop(comm: Comm, shard: Shard, plan: Plan, job: Job, tok, prompts: list[Prompt],
                writer: ResultWriter, progress: bool, stats: dict) -> Summary:
    """Rank 0: micro-batches through the pipeline one at a time (sequential), results to HDF5."""
    from tqdm import tqdm

    nxt = plan.stages[1].rank if len(plan.stages) > 1 else None
    head = plan.stages[-1].rank
    eos = _eos_ids(shard.spec.path)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else min(eos)
    bar = tqdm(total=len(prompts), unit="req", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    total_tokens, ttfts, tpots = 0, [], []
    t_run = time.perf_counter()
    slot = 0  # sequential: one micro-batch in flight, always in slot 0
    for b in range(0, len(prompts), job.micro_batch_size):
        rows = [_Row(p) for p in prompts[b:b + job.micro_batch_size]]
        width = max(len(r.prompt.ids) for r in rows)
        pads = [width - len(r.prompt.ids) for r in rows]
        ids = torch.tensor([[pad_id] * p + r.prompt.ids for p, r in zip(pads, rows)], dtype=torch.long)  # (B, T)
        meta = np.array([[p, *r.gen.sampling().to_row()] for p, r in zip(pads, rows)], dtype=np.float64)
        sampler = Sampler([r.gen.sampling() for r in rows]) if nxt is None else None
        t_start = time.perf_counter()
        x, step = ids, 0
        while True:
            _fault_check(0, step)
            out = _timed_forward(shard, stats, slot, x, pads if step == 0 else None)
            if nxt is None:
                tokens = sampler(out)
            else:
                comm.send(nxt, ACT, slot, step, out, meta if step == 0 else None)
                tokens = comm.recv(head, TOKENS).tensor
            now = time.perf_counter()
            for r, t in zip(rows, tokens.tolist()):
                r.add(t, now, eos, tok)
            if all(r.finish for r in rows):
                break
            x, step = tokens[:, None], step + 1  # (B, 1)
        records = []
        for r in rows:
            n = len(r.tokens)
            text = r.text if r.finish == "stop" else tok.decode(r.tokens, skip_special_tokens=True)
            ttft = (r.t_first - t_start) * 1e3
            tpot = (r.t_last - r.t_first) * 1e3 / (n - 1) if n > 1 else float("nan")
            records.append(Record(r.prompt.request.id, r.prompt.request.where, r.prompt.text, text, r.tokens,
                                  r.finish, len(r.prompt.ids), n, ttft, tpot))
            total_tokens += n
            ttfts.append(ttft)
            if n > 1:
                tpots.append(tpot)
        writer.append(records)
        bar.update(len(rows))
        bar.set_postfix_str(f"{total_tokens / (time.perf_counter() - t_run):.1f} tok/s")
    bar.close()
    if nxt is not None:
        comm.send(nxt, STOP)
    shard.release(slot)
    return Summary(len(prompts), total_tokens, 0.0, float(np.mean(ttfts)),
                   float(np.mean(tpots)) if tpots else float("nan"), [])
