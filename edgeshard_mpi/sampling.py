"""Choosing the next token: penalties and logits processors, then greedy or seeded sampling.

Sampling happens on the stage that holds the LM head, so only token ids travel back to the source.
Each request owns a `torch.Generator` seeded from its seed and draws exactly one number per
token, so its tokens do not depend on the partition, the micro-batch it shares, or the schedule.

The parameters mean what transformers' logits processors and vLLM's `SamplingParams` mean, applied
in transformers' order: repetition penalty (over the prompt and the tokens so far), presence and
frequency penalties (OpenAI's, over the tokens so far), `min_tokens` (EOS and the stop token ids
cannot come before it), then temperature, top-k, top-p and min-p. A new parameter is a field of
`SamplingParams` (the job files, the prompt files and the step message take it from there) and its
effect in `_process` or `_sample`.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["SamplingParams", "Sampler", "MAX_LOGPROBS"]

MAX_LOGPROBS = 20  # top logprobs a token may carry (OpenAI's limit)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = no top-k filter
    top_p: float = 1.0  # 1 = no nucleus filter
    min_p: float = 0.0  # drop tokens less likely than min_p x the likeliest (0 = off)
    seed: int = 0
    repetition_penalty: float = 1.0  # > 1 discourages any token of the prompt or output (1 = off)
    presence_penalty: float = 0.0  # subtracted from the logit of every token already generated
    frequency_penalty: float = 0.0  # subtracted once per time a token was generated
    min_tokens: int = 0  # EOS and stop_token_ids are held back until this many tokens
    ignore_eos: bool = False  # EOS does not end the request
    stop_token_ids: tuple[int, ...] = ()  # these end the request (the token is kept in its ids)
    # -1: none; k >= 0: each chosen token's logprob and the k likeliest tokens' (the model's own
    # distribution, before penalties and temperature, as vLLM's default)
    logprobs: int = -1

    def __post_init__(self):
        checks = (
            ("temperature", self.temperature >= 0, ">= 0"),
            ("top_k", self.top_k >= 0, ">= 0"),
            ("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
            ("min_p", 0 <= self.min_p <= 1, "in [0, 1]"),
            ("seed", 0 <= self.seed < 2**53, "in [0, 2**53)"),  # travels as a float64
            ("repetition_penalty", self.repetition_penalty > 0, "> 0"),
            ("presence_penalty", -2 <= self.presence_penalty <= 2, "in [-2, 2]"),  # OpenAI's range
            ("frequency_penalty", -2 <= self.frequency_penalty <= 2, "in [-2, 2]"),
            ("min_tokens", self.min_tokens >= 0, ">= 0"),
            ("stop_token_ids", all(0 <= t < 2**53 for t in self.stop_token_ids), "token ids >= 0"),
            ("logprobs", -1 <= self.logprobs <= MAX_LOGPROBS, f"in [-1, {MAX_LOGPROBS}]"),
        )
        for name, ok, limit in checks:
            if not ok:
                raise ValueError(f"{name} must be {limit}, got {getattr(self, name)!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalized(self) -> bool:
        """Whether the logits change before the choice (see `_process`)."""
        return (self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0
                or self.min_tokens > 0)

    @property
    def needs_prompt(self) -> bool:
        """Whether the head needs the prompt's token ids (the repetition penalty counts them)."""
        return self.repetition_penalty != 1

    def to_row(self) -> list[float]:
        """The parameters as numbers, in field order; a tuple field as its length then its items."""
        row: list[float] = []
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            row += [float(len(v)), *map(float, v)] if isinstance(v, tuple) else [float(v)]
        return row

    @classmethod
    def from_row(cls, row) -> "SamplingParams":
        values, it = {}, iter(row)
        for f, default in ((f, f.default) for f in dataclasses.fields(cls)):
            if isinstance(default, tuple):
                values[f.name] = tuple(int(next(it)) for _ in range(int(next(it))))
            else:
                values[f.name] = type(default)(next(it))
        return cls(**values)


@dataclasses.dataclass
class _Row:
    params: SamplingParams
    generator: object  # torch.Generator, or None when greedy
    seen: list[int]  # the prompt's ids, when the repetition penalty needs them
    made: list[int]  # the tokens chosen so far


class Sampler:
    """The sampling state of one micro-batch: per row its parameters, generator and tokens so far.

    eos: the model's EOS ids, which `min_tokens` holds back."""

    def __init__(self, params: list[SamplingParams], prompts: list[list[int]] | None = None, eos=()):
        self.eos = tuple(eos)
        self.rows: list[_Row] = []
        self.replace(range(len(params)), params, prompts)

    def select(self, keep) -> None:
        """Keep only rows `keep` (the others finished), each with its own state."""
        self.rows = [self.rows[i] for i in keep]
        self._rows_changed()

    def _rows_changed(self) -> None:
        # whether every row is plain argmax: then a step is one argmax for the whole micro-batch
        self._plain = all(r.params.greedy and not r.params.penalized for r in self.rows)

    def replace(self, places, params: list[SamplingParams], prompts: list[list[int]] | None = None) -> None:
        """Rows `places` are taken over by new requests (`places` may extend the rows by one each)."""
        import torch

        for j, (i, p) in enumerate(zip(places, params)):
            row = _Row(p, None if p.greedy else torch.Generator().manual_seed(p.seed),
                       list(prompts[j]) if prompts and p.needs_prompt else [], [])
            if i == len(self.rows):
                self.rows.append(row)
            else:
                self.rows[i] = row
        self._rows_changed()

    def logprobs(self, logits: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """For rows that ask (`logprobs` >= 0): (B, 1 + K) fp32, each chosen token's logprob then the K
        likeliest tokens', and (B, K) int64 their ids, K the most any row asks for (at least 1; a row
        keeps its own k of them); None when none asks."""
        import torch

        k = max((r.params.logprobs for r in self.rows), default=-1)
        if k < 0:
            return None
        lp = torch.log_softmax(logits.float(), dim=-1).cpu()
        top = torch.topk(lp, max(k, 1), dim=-1)  # at least one: no empty buffer on the wire
        return torch.cat([lp.gather(1, tokens.view(-1, 1)), top.values], dim=1), top.indices

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """logits: (B, V) fp32 -> token ids (B,) int64 on the CPU."""
        tokens = logits.argmax(dim=-1).cpu()
        if not self._plain:
            for i, row in enumerate(self.rows):
                p = row.params
                if p.greedy and not p.penalized:
                    continue
                x = _process(logits[i].float().cpu(), row, self.eos) if p.penalized else logits[i].float().cpu()
                tokens[i] = int(x.argmax()) if p.greedy else _sample(x, p, row.generator)
        for row, t in zip(self.rows, tokens.tolist()):
            row.made.append(t)
        return tokens


def _process(x: torch.Tensor, row: _Row, eos: tuple[int, ...]) -> torch.Tensor:
    """The penalties and min_tokens on one row's logits (V,), as transformers and vLLM define them."""
    import torch

    p, V = row.params, x.numel()
    x = x.clone()
    if p.repetition_penalty != 1 and (row.seen or row.made):
        ids = torch.tensor(sorted({t for t in row.seen + row.made if t < V}), dtype=torch.long)
        s = x[ids]
        x[ids] = torch.where(s < 0, s * p.repetition_penalty, s / p.repetition_penalty)
    if (p.presence_penalty or p.frequency_penalty) and row.made:
        counts = torch.bincount(torch.tensor(row.made, dtype=torch.long), minlength=V)[:V].to(x.dtype)
        x -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(x.dtype)
    if len(row.made) < p.min_tokens:
        banned = [t for t in (*eos, *p.stop_token_ids) if t < V]
        if banned:
            x[torch.tensor(banned, dtype=torch.long)] = float("-inf")
    return x


def _sample(logits: torch.Tensor, p: SamplingParams, gen: torch.Generator) -> int:
    import torch

    logits = logits / p.temperature  # (V,)
    if p.top_k and p.top_k < logits.numel():
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token once the tokens before it already reach top_p; the first always stays
        drop = probs.cumsum(-1) - probs >= p.top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    if p.min_p > 0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < p.min_p * probs.max(), float("-inf"))  # the likeliest stays
    probs = logits.softmax(-1)
    return int(torch.multinomial(probs, 1, generator=gen))
