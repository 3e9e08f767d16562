"""Choosing the next token: greedy, temperature, top-k, top-p, with a seeded generator per request.

Sampling happens on the stage that holds the LM head, so only token ids travel back to the source.
Each request owns a `torch.Generator` seeded from its seed and draws exactly one number per
token, so its tokens do not depend on the partition, the micro-batch it shares, or the schedule.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["SamplingParams", "Sampler"]


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = no top-k filter
    top_p: float = 1.0  # 1 = no nucleus filter
    seed: int = 0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.seed < 2**53:  # travels as a float64 in the prefill header
            raise ValueError(f"seed must be in [0, 2**53), got {self.seed}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def to_row(self) -> list[float]:
        return [self.temperature, float(self.top_k), self.top_p, float(self.seed)]

    @classmethod
    def from_row(cls, row) -> "SamplingParams":
        return cls(float(row[0]), int(row[1]), float(row[2]), int(row[3]))


class Sampler:
    """The sampling state of one micro-batch: its rows' parameters and generators."""

    def __init__(self, params: list[SamplingParams]):
        import torch  # imported here so that job files validate without torch

        self.params = list(params)
        self.all_greedy = all(p.greedy for p in params)
        self.generators = [None if p.greedy else torch.Generator().manual_seed(p.seed) for p in params]

    def select(self, keep) -> None:
        """Keep only rows `keep` (the others finished), each with its own generator."""
        self.params = [self.params[i] for i in keep]
        self.generators = [self.generators[i] for i in keep]
        self.all_greedy = all(p.greedy for p in self.params)

    def replace(self, places: list[int], params: list[SamplingParams]) -> None:
        """Rows `places` are taken over by new requests, each with its own parameters and generator."""
        import torch

        for i, p in zip(places, params):
            self.params[i] = p
            self.generators[i] = None if p.greedy else torch.Generator().manual_seed(p.seed)
        self.all_greedy = all(p.greedy for p in self.params)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """logits: (B, V) fp32 -> token ids (B,) int64 on the CPU."""
        tokens = logits.argmax(dim=-1).cpu()
        if self.all_greedy:
            return tokens
        for row, (p, gen) in enumerate(zip(self.params, self.generators)):
            if gen is not None:
                tokens[row] = _sample(logits[row].float().cpu(), p, gen)
        return tokens


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
    probs = logits.softmax(-1)
    return int(torch.multinomial(probs, 1, generator=gen))
