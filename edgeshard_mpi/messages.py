"""The typed step message: what one step of one micro-batch slot carries from stage to stage.

The source builds a `Step` from the scheduler's `Launch`; every stage applies the same row changes
from it, in the same order (keep, decode, trim, join), so the slot's KV caches never disagree.
comm.py moves only its integer fields and buffers; what they mean is said here alone, and a
joining row's sampling parameters travel as `SamplingParams.to_row()`, so a new sampling parameter
changes neither this module nor the transport.
"""

from __future__ import annotations

import dataclasses

import torch

from .comm import Message
from .sampling import SamplingParams

__all__ = ["Step"]


@dataclasses.dataclass
class Step:
    """One step of slot `slot` (scheduler.Launch, as the stages need it), or its tokens on the way back.

    tensor: a `fresh` step's prompts (rows, width, ...), left-padded by `pads`. Otherwise the decode
    input of every row (one token each), then the joining rows' prefill input (joining, width, ...),
    then each chunk's tokens, flattened into one tensor (`pack`, `split`). On the way back: one token
    id per row.
    keep: the stages' rows kept before the step (None: all). Then, when `capacity` is set on a step
    that is not fresh, the slot is re-laid out (`trim` columns dropped on the left, room for
    `capacity`); then joining rows take rows `places`, each prefilled from its tokens in the join
    block (left-padded to `width` by `pads`). A fresh step's `capacity` sizes the slot's new cache.
    chunks: (key, start, length, total) per chunk of a prompt prefilled by chunks (scheduler.Launch):
    its tokens start..start+length-1 of the `total` before its last, into the cache of row `key`;
    the chunk that ends at `total` joins its row, appended after the slot's rows.
    sampling: per joining row (every row of a fresh step), then per row joining by its last chunk, its
    SamplingParams; prompts: the same rows' prompt token ids when the head needs them
    (`SamplingParams.needs_prompt`), else [].
    times: the compute seconds of each stage that has run the step so far, in pipeline order; the
    reply brings every stage's back to the source, which watches them for drift (drift.py).
    columns: the slot's KV columns after the step, which its decode attends over (scheduler.Launch):
    what a work clock costs the step's context by.
    """

    slot: int
    step: int
    tensor: torch.Tensor
    fresh: bool = False
    rows: int = 0
    keep: list[int] | None = None
    places: list[int] = dataclasses.field(default_factory=list)
    pads: list[int] = dataclasses.field(default_factory=list)
    width: int = 0
    trim: int = 0
    capacity: int = 0
    sampling: list[SamplingParams] = dataclasses.field(default_factory=list)
    prompts: list[list[int]] = dataclasses.field(default_factory=list)
    logprobs: torch.Tensor | None = None  # on the way back, when rows ask: (rows, 1 + K) chosen then top K
    top_ids: torch.Tensor | None = None  # (rows, K) the top K's token ids
    chunks: list[tuple[int, int, int, int]] = dataclasses.field(default_factory=list)
    times: list[float] = dataclasses.field(default_factory=list)
    columns: int = 0

    @property
    def relayout(self) -> bool:
        return not self.fresh and self.capacity > 0

    @property
    def filled(self) -> int:
        """How many rows join by their last chunk in this step."""
        return sum(start + n == total for _, start, n, total in self.chunks)

    def forwards(self) -> list[tuple[int, int, int]]:
        """(tokens, columns, width) of each forward a stage runs for this step, in `split`'s order: what
        a work clock (simulate.StageLine.seconds) times the step by. Only the decode attends over the
        slot's columns; a prefill's attention spans its rows' width (columns 0)."""
        joined = len(self.pads) * self.width
        if self.fresh:
            return [(joined, 0, self.width)]
        return ([(self.rows, self.columns, 1)] + ([(joined, 0, self.width)] if joined else [])
                + [(c[2], 0, c[2]) for c in self.chunks])

    def split(self) -> tuple[torch.Tensor | None, torch.Tensor | None, list[torch.Tensor]]:
        """(decode input (rows, 1, ...), join input (joining, width, ...), each None when empty, and
        each chunk's input (1, length, ...))."""
        if self.fresh:
            return None, self.tensor, []
        n, t = self.rows, self.tensor
        joined = len(self.pads) * self.width
        join = t[n:n + joined].reshape(len(self.pads), self.width, *t.shape[1:]) if joined else None
        chunks = t[n + joined:].split([c[2] for c in self.chunks]) if self.chunks else []
        return t[:n].unsqueeze(1), join, [c.unsqueeze(0) for c in chunks]

    @staticmethod
    def pack(decode: torch.Tensor | None, join: torch.Tensor | None, chunks=()) -> torch.Tensor:
        """The inverse of `split` (a fresh step's tensor travels as it is)."""
        if decode is None:
            return join
        parts = [decode] + ([join] if join is not None else []) + list(chunks)
        flat = [x.reshape(-1, *x.shape[2:]) for x in parts]
        return flat[0] if len(flat) == 1 else torch.cat(flat)

    def passed_on(self, tensor: torch.Tensor, seconds: float) -> "Step":
        """The same step, carrying this stage's output and compute time to the next."""
        return dataclasses.replace(self, tensor=tensor, times=self.times + [seconds])

    def to_wire(self) -> tuple[list[int], list[torch.Tensor]]:
        joining = len(self.pads)
        fields = [self.slot, self.step, int(self.fresh), self.rows, joining, self.width, self.trim, self.capacity,
                  -1 if self.keep is None else len(self.keep), int(self.logprobs is not None), len(self.chunks),
                  len(self.times), self.columns]
        buffers = [self.tensor]
        if self.logprobs is not None:
            buffers += [self.logprobs, self.top_ids]
        # the row changes, as one int64 buffer: keep, then places (not on a fresh step) and pads, then chunks
        ints = (self.keep or []) + ([] if self.fresh else self.places) + self.pads + [x for c in self.chunks for x in c]
        if ints:
            buffers.append(torch.tensor(ints, dtype=torch.int64))
        if self.sampling:
            # per joining row: (len(params), len(prompt), *params, *prompt), as float64 (exact for ids < 2**53)
            flat = []
            for p, ids in zip(self.sampling, self.prompts or [[]] * len(self.sampling)):
                row = p.to_row()
                flat += [len(row), len(ids), *row, *ids]
            buffers.append(torch.tensor(flat, dtype=torch.float64))
        if self.times:
            buffers.append(torch.tensor(self.times, dtype=torch.float64))
        return fields, buffers

    @classmethod
    def from_wire(cls, msg: Message) -> "Step":
        (slot, step, fresh, rows, joining, width, trim, capacity, nkeep, has_logprobs, nchunks, ntimes,
         columns) = msg.fields
        bufs = iter(msg.buffers)
        tensor = next(bufs)
        logprobs, top_ids = (next(bufs), next(bufs)) if has_logprobs else (None, None)
        ints = next(bufs).tolist() if max(nkeep, 0) + joining + nchunks else []
        keep = ints[:nkeep] if nkeep >= 0 else None
        at = max(nkeep, 0)
        places = [] if fresh else ints[at:at + joining]
        at += len(places)
        pads = ints[at:at + joining]
        at += joining
        chunks = [tuple(ints[i:i + 4]) for i in range(at, at + 4 * nchunks, 4)]
        sampling, prompts = [], []
        if new := joining + sum(start + n == total for _, start, n, total in chunks):
            flat, at = next(bufs).tolist(), 0
            for _ in range(new):
                n, m = int(flat[at]), int(flat[at + 1])
                sampling.append(SamplingParams.from_row(flat[at + 2:at + 2 + n]))
                prompts.append([int(t) for t in flat[at + 2 + n:at + 2 + n + m]])
                at += 2 + n + m
        times = next(bufs).tolist() if ntimes else []
        return cls(slot, step, tensor, bool(fresh), rows, keep, places, pads, width, trim, capacity, sampling,
                   prompts, logprobs, top_ids, chunks, times, columns)

    def reply(self, tokens: torch.Tensor, logprobs=None, seconds: float = 0.0) -> "Step":
        """The head's answer: this step's token ids, one per row of the slot after the step, when rows
        asked for them their logprobs (Sampler.logprobs), and every stage's compute time, the head's
        (`seconds`) last."""
        values, ids = logprobs if logprobs is not None else (None, None)
        return Step(self.slot, self.step, tokens, logprobs=values, top_ids=ids, times=self.times + [seconds])
