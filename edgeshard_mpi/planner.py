"""Plans: which rank holds which contiguous range of units.

Units are numbered 0..N-1: unit 0 is the embedding, units 1..N-2 the decoder blocks, unit N-1 the
final norm + LM head. A plan lists stages in pipeline order; stage 0 runs on rank 0 (the source,
which holds the prompts) and starts at unit 0. Ranks that appear in no stage take no part.

Pure Python: no MPI, no torch.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

__all__ = ["Stage", "Plan", "PlanError", "even_plan"]


class PlanError(ValueError):
    """A plan that does not cover the model exactly once, or does not fit the cluster."""


@dataclasses.dataclass(frozen=True)
class Stage:
    rank: int
    first: int  # first unit, inclusive
    last: int  # last unit, inclusive

    @property
    def units(self) -> range:
        return range(self.first, self.last + 1)


@dataclasses.dataclass(frozen=True)
class Plan:
    """Stages in pipeline order. Validated on construction against the unit count."""

    stages: tuple[Stage, ...]
    num_units: int
    objective: str = "manual"  # how the plan was made: manual, even, latency, throughput, ...
    source: str = "<plan>"  # file or job field it came from, for error messages

    def __post_init__(self):
        where = self.source
        if not self.stages:
            raise PlanError(f"{where}: plan has no stages")
        covered: dict[int, int] = {}
        for i, s in enumerate(self.stages):
            if s.rank < 0:
                raise PlanError(f"{where}: stage {i} has negative rank {s.rank}")
            if s.first > s.last:
                raise PlanError(f"{where}: stage {i} (rank {s.rank}) has first unit {s.first} > last unit {s.last}")
            if s.first < 0 or s.last >= self.num_units:
                raise PlanError(f"{where}: stage {i} (rank {s.rank}) holds units {s.first}..{s.last}, "
                                f"but the model has units 0..{self.num_units - 1}")
            for u in s.units:
                if u in covered:
                    raise PlanError(f"{where}: unit {u} is in stage {covered[u]} and stage {i}")
                covered[u] = i
        missing = [u for u in range(self.num_units) if u not in covered]
        if missing:
            raise PlanError(f"{where}: plan misses unit(s) {_ranges(missing)} of 0..{self.num_units - 1}")
        ranks = [s.rank for s in self.stages]
        if len(set(ranks)) != len(ranks):
            raise PlanError(f"{where}: a rank appears in more than one stage: {ranks}")
        for a, b in zip(self.stages, self.stages[1:]):
            if b.first != a.last + 1:
                raise PlanError(f"{where}: stages are not in unit order: units {a.first}..{a.last} "
                                f"then {b.first}..{b.last}")
        if self.stages[0].rank != 0 or self.stages[0].first != 0:
            raise PlanError(f"{where}: the first stage must be rank 0 holding unit 0 (the source), "
                            f"got rank {self.stages[0].rank} from unit {self.stages[0].first}")

    @property
    def ranks(self) -> list[int]:
        return [s.rank for s in self.stages]

    def stage_of(self, rank: int) -> int | None:
        for i, s in enumerate(self.stages):
            if s.rank == rank:
                return i
        return None

    def check_world(self, world_size: int) -> None:
        bad = [s.rank for s in self.stages if s.rank >= world_size]
        if bad:
            raise PlanError(f"{self.source}: plan uses rank(s) {bad} but only {world_size} rank(s) run")

    def to_dict(self) -> dict:
        return {
            "objective": self.objective,
            "num_units": self.num_units,
            "stages": [dataclasses.asdict(s) for s in self.stages],
        }

    @classmethod
    def from_dict(cls, d: dict, num_units: int | None = None, source: str = "<plan>") -> "Plan":
        try:
            stages = tuple(Stage(int(s["rank"]), int(s["first"]), int(s["last"])) for s in d["stages"])
        except (KeyError, TypeError, ValueError) as e:
            raise PlanError(f"{source}: stages must be a list of {{rank, first, last}} ({e})") from None
        n = num_units if num_units is not None else int(d["num_units"])
        if "num_units" in d and num_units is not None and int(d["num_units"]) != num_units:
            raise PlanError(f"{source}: plan is for {d['num_units']} units, the model has {num_units}")
        return cls(stages, n, d.get("objective", "manual"), source)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path, num_units: int | None = None) -> "Plan":
        path = Path(path)
        if not path.is_file():
            raise PlanError(f"{path}: plan file not found")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise PlanError(f"{path}: not JSON ({e})") from None
        return cls.from_dict(d, num_units, str(path))


def even_plan(num_units: int, ranks: int) -> Plan:
    """Units split as evenly as possible over ranks 0..ranks-1 (earlier ranks take the remainder)."""
    ranks = min(ranks, num_units)
    base, extra = divmod(num_units, ranks)
    stages, first = [], 0
    for r in range(ranks):
        n = base + (1 if r < extra else 0)
        stages.append(Stage(r, first, first + n - 1))
        first += n
    return Plan(tuple(stages), num_units, "even", "<even split>")


def _ranges(units: list[int]) -> str:
    out, start = [], units[0]
    for a, b in zip(units, units[1:] + [None]):
        if b != a + 1:
            out.append(f"{start}" if start == a else f"{start}..{a}")
            start = b
    return ", ".join(out)
