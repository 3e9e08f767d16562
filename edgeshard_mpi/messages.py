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
    flattened into one tensor (`pack`, `split`). On the way back: one token id per row.
    keep: the stages' rows kept before the step (None: all). Then, when `capacity` is set on a step
    that is not fresh, the slot is re-laid out (`trim` columns dropped on the left, room for
    `capacity`); then joining rows take rows `places`, each prefilled from its tokens in the join
    block (left-padded to `width` by `pads`). A fresh step's `capacity` sizes the slot's new cache.
    sampling: per joining row (every row of a fresh step), its SamplingParams; prompts: per joining
    row, its prompt's token ids when the head needs them (`SamplingParams.needs_prompt`), else [].
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

    @property
    def relayout(self) -> bool:
        return not self.fresh and self.capacity > 0

    def split(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(decode input (rows, 1, ...), join input (joining, width, ...)), each None when empty."""
        if self.fresh:
            return None, self.tensor
        n, t = self.rows, self.tensor
        join = t[n:].reshape(len(self.pads), self.width, *t.shape[1:]) if self.pads and self.width else None
        return t[:n].unsqueeze(1), join

    @staticmethod
    def pack(decode: torch.Tensor | None, join: torch.Tensor | None) -> torch.Tensor:
        """The inverse of `split` (a fresh step's tensor travels as it is)."""
        if decode is None:
            return join
        if join is None:
            return decode.reshape(-1, *decode.shape[2:])
        return torch.cat([decode.reshape(-1, *decode.shape[2:]), join.reshape(-1, *join.shape[2:])])

    def passed_on(self, tensor: torch.Tensor) -> "Step":
        """The same step, carrying this stage's output to the next."""
        return dataclasses.replace(self, tensor=tensor)

    def to_wire(self) -> tuple[list[int], list[torch.Tensor]]:
        joining = len(self.pads)
        fields = [self.slot, self.step, int(self.fresh), self.rows, joining, self.width, self.trim, self.capacity,
                  -1 if self.keep is None else len(self.keep), int(self.logprobs is not None)]
        buffers = [self.tensor]
        if self.logprobs is not None:
            buffers += [self.logprobs, self.top_ids]
        if self.keep is not None:
            buffers.append(torch.tensor(self.keep, dtype=torch.int64))
        if joining:
            cols = [self.pads] if self.fresh else [self.places, self.pads]
            buffers.append(torch.tensor(cols, dtype=torch.int64))
            # per joining row: (len(params), len(prompt), *params, *prompt), as float64 (exact for ids < 2**53)
            flat = []
            for p, ids in zip(self.sampling, self.prompts or [[]] * joining):
                row = p.to_row()
                flat += [len(row), len(ids), *row, *ids]
            buffers.append(torch.tensor(flat, dtype=torch.float64))
        return fields, buffers

    @classmethod
    def from_wire(cls, msg: Message) -> "Step":
        slot, step, fresh, rows, joining, width, trim, capacity, nkeep, has_logprobs = msg.fields
        bufs = iter(msg.buffers)
        tensor = next(bufs)
        logprobs, top_ids = (next(bufs), next(bufs)) if has_logprobs else (None, None)
        keep = next(bufs).tolist() if nkeep >= 0 else None
        places, pads, sampling, prompts = [], [], [], []
        if joining:
            cols = next(bufs).tolist()
            pads, places = cols[-1], ([] if fresh else cols[0])
            flat, at = next(bufs).tolist(), 0
            for _ in range(joining):
                n, m = int(flat[at]), int(flat[at + 1])
                sampling.append(SamplingParams.from_row(flat[at + 2:at + 2 + n]))
                prompts.append([int(t) for t in flat[at + 2 + n:at + 2 + n + m]])
                at += 2 + n + m
        return cls(slot, step, tensor, bool(fresh), rows, keep, places, pads, width, trim, capacity, sampling,
                   prompts, logprobs, top_ids)

    def reply(self, tokens: torch.Tensor, logprobs=None) -> "Step":
        """The head's answer: this step's token ids, one per row of the slot after the step, and, when
        rows asked for them, their logprobs (Sampler.logprobs)."""
        values, ids = logprobs if logprobs is not None else (None, None)
        return Step(self.slot, self.step, tokens, logprobs=values, top_ids=ids)
