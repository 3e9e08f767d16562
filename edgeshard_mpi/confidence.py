"""How sure a plan is: does the best plan stay best when every device's figures move within their spread?

    edgeshard plan --profile P --objective throughput      (prints it under the plan)

A profile's figures are measured, so each carries its scatter over repeats (profiler.spread_of). The
plan is exact for the figures as measured; a device a few percent off can hand another plan the
lead. This replans under the cases that favour each device most and least: device j slower by its
spread and every other device faster by theirs, and the reverse. If one of those cases has a better
plan than the one made, that is the runner-up, and what the plan made would lose there against it
is the predicted loss. Links keep their measured figures.

Pure Python: no torch, no MPI.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from .planner import Costs, Plan, PlanError, plan_for, predict

__all__ = ["Confidence", "confidence"]

_MEASURE = {"latency": "latency_s", "throughput": "bottleneck_s"}  # what each objective minimises


@dataclasses.dataclass(frozen=True)
class Confidence:
    spreads: tuple[float | None, ...]  # per device, as used (None: not measured)
    runner_up: Plan | None = None  # the plan that wins where the plan made loses most; None: it stays best
    loss: float = 0.0  # the plan made's extra time per step there, over the runner-up's: 0.07 = 7%
    case: str = ""  # where: "cloud slower by its spread and the others faster by theirs"

    @property
    def known(self) -> bool:
        return all(s is not None for s in self.spreads)

    def describe(self, names: Sequence[str]) -> str:
        if not self.known:
            missing = [n for n, s in zip(names, self.spreads) if s is None]
            which = "records no spreads" if len(missing) == len(names) else f"has no spread for {', '.join(missing)}"
            return f"unknown: the profile {which} (derived, or measured before spreads were recorded)"
        within = ", ".join(f"{n} ±{s:.0%}" for n, s in zip(names, self.spreads))
        if self.runner_up is None:
            return f"sure: the plan stays best with every device within its spread ({within})"
        stages = ", ".join(f"{names[s.rank]} {s.first}..{s.last}" for s in self.runner_up.stages)
        return (f"not sure: with {self.case}, the runner-up ({stages}) is best, and this plan takes "
                f"{self.loss:.1%} longer a step than it (spreads: {within})")


def _scaled(costs: Costs, factors: Sequence[float]) -> Costs:
    """The same problem with device j's compute (its units' and its step cost) times factors[j]."""
    stage = costs.stage_s or [0.0] * costs.num_devices
    return dataclasses.replace(costs, compute=[[c * f for c, f in zip(row, factors)] for row in costs.compute],
                               stage_s=[s * f for s, f in zip(stage, factors)])


def confidence(costs: Costs, plan: Plan, spreads: Sequence[float | None], objective: str) -> Confidence:
    """Replan with each device at the edge of its spread against the others at theirs (module docstring)."""
    spreads = tuple(spreads)
    if any(s is None for s in spreads):
        return Confidence(spreads)
    key = _MEASURE[objective]
    names = costs.device_names or [f"device {j}" for j in range(costs.num_devices)]
    worst = Confidence(spreads)
    for j in range(costs.num_devices):
        for sign in (1, -1):
            factors = [1 + sign * s if k == j else 1 - sign * s for k, s in enumerate(spreads)]
            case = _scaled(costs, factors)
            try:
                best = plan_for(case, objective)
            except PlanError:  # the memory checks do not move with compute: cannot happen, but never fail here
                continue
            mine, theirs = predict(case, plan)[key], predict(case, best)[key]
            loss = mine / theirs - 1 if theirs > 0 else 0.0
            if loss > max(worst.loss, 1e-9):
                worst = Confidence(spreads, best, loss, f"{names[j]} {'slower' if sign > 0 else 'faster'} by its "
                                   f"spread and the others {'faster' if sign > 0 else 'slower'} by theirs")
    return worst
