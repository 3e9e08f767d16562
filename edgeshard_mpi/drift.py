"""Each stage's measured compute against its profile's, during a run; and whether moving to a new plan pays.

Every step message comes back to the source with each stage's compute time for it (messages.Step.times).
The source knows what the step carried (Step.forwards), so it knows what the profile said that step
would take on each stage (simulate.StageLine, the line the simulator costs it with). `DriftWatch`
keeps both over each stage's last `window` steps; a stage whose sum is off the prediction's by more
than `threshold` is drifting (until it is back within half of that): a device throttled, a new tenant, a battery saver, or a profile taken
while the host ran faster or slower. A window of steps, not one, so that a single slow step (a page
fault, a neighbour's burst) never counts.

`worth_moving` is the rule for `--replan` (runner.py): a new plan is taken only if the time it saves
on the work left is more than the move costs, which is the reload of every shard plus the drain (the
pipeline runs partly empty while the last micro-batches of the old plan finish).

Pure Python: no torch, no MPI.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Sequence

from .simulate import StageLine

__all__ = ["DEFAULT_THRESHOLD", "DEFAULT_WINDOW", "DriftWatch", "Drift", "worth_moving"]

DEFAULT_THRESHOLD = 0.25  # a stage off its profile by more than this is drifting
DEFAULT_WINDOW = 32  # steps of a stage the comparison sums over


@dataclasses.dataclass(frozen=True)
class Drift:
    """A stage's figures over its window when it crossed the threshold (or came back within it)."""

    at_s: float  # seconds into the run
    stage: int
    device: str
    ratio: float  # measured / predicted
    measured_s: float
    predicted_s: float
    steps: int
    drifting: bool  # False: it came back within the threshold

    def describe(self) -> str:
        if not self.drifting:
            return f"{self.device} back within its profile ({self.ratio:.2f}x)"
        return f"{self.device} computes {self.ratio:.2f}x its profile's time"


class DriftWatch:
    """Measured against predicted compute per stage, over the last `window` steps of each."""

    def __init__(self, lines: Sequence[StageLine], devices: Sequence[str], *, threshold: float = DEFAULT_THRESHOLD,
                 window: int = DEFAULT_WINDOW):
        if threshold <= 0:
            raise ValueError(f"drift threshold must be > 0, got {threshold}")
        if window < 1:
            raise ValueError(f"drift window must be >= 1 step, got {window}")
        self.lines, self.devices = list(lines), list(devices)
        self.threshold, self.window = threshold, window
        self._measured = [collections.deque(maxlen=window) for _ in self.lines]
        self._predicted = [collections.deque(maxlen=window) for _ in self.lines]
        self._returns: collections.deque = collections.deque(maxlen=4 * window)  # (time, rows) of returned steps
        self.drifting: set[int] = set()
        self.events: list[Drift] = []
        self.steps = 0
        self.last_s = 0.0  # when the last step came back, seconds into the run
        self._asked = -window

    def observe(self, times: Sequence[float], forwards: Sequence[tuple[int, int, int]], rows: int,
                now: float) -> list[Drift]:
        """One step back at the source (at `now`, seconds into the run): each stage's compute `times`,
        the step's `forwards` ((tokens, columns, width) each), and the `rows` (tokens) it made. Returns the
        stages that crossed the threshold with it, either way."""
        self.steps += 1
        self.last_s = now
        self._returns.append((now, rows))
        changed = []
        for i, (t, line) in enumerate(zip(times, self.lines)):
            self._measured[i].append(t)
            self._predicted[i].append(sum(line.seconds(*f) for f in forwards))
            r = self.ratio(i)
            if r is None:
                continue
            # in past the threshold, out only within half of it: a stage near the edge does not flap
            off = abs(r - 1) > (self.threshold / 2 if i in self.drifting else self.threshold)
            if off != (i in self.drifting):
                (self.drifting.add if off else self.drifting.discard)(i)
                if off:  # ask only once a whole window has passed at the new pace
                    self._asked = self.steps
                d = Drift(now, i, self.devices[i], r, sum(self._measured[i]), sum(self._predicted[i]),
                          len(self._measured[i]), off)
                self.events.append(d)
                changed.append(d)
        return changed

    def ratio(self, stage: int) -> float | None:
        """Measured / predicted compute over the stage's window; None until the window is full."""
        if len(self._measured[stage]) < self.window:
            return None
        predicted = sum(self._predicted[stage])
        return sum(self._measured[stage]) / predicted if predicted > 0 else None

    def ratios(self) -> list[float | None]:
        return [self.ratio(i) for i in range(len(self.lines))]

    def pace(self) -> tuple[float, float]:
        """(tokens/s, seconds between returned steps) over the recent returns; (0, 0) before two."""
        if len(self._returns) < 2:
            return 0.0, 0.0
        span = self._returns[-1][0] - self._returns[0][0]
        if span <= 0:
            return 0.0, 0.0
        rows = sum(n for _, n in list(self._returns)[1:])
        return rows / span, span / (len(self._returns) - 1)

    def postfix(self) -> str:
        """For the progress line: the drifting stages and their ratios."""
        if not self.drifting:
            return ""
        return "drift: " + ", ".join(f"{self.devices[i]} {self.ratio(i):.2f}x" for i in sorted(self.drifting))

    def due(self) -> bool:
        """Whether to ask if a new plan pays: a stage drifts, and a whole window of steps has passed since
        it began to, and since the last time asked: its window then holds only steps at its new pace,
        and the answer cannot change much sooner."""
        if not self.drifting or self.steps - self._asked < self.window:
            return False
        self._asked = self.steps
        return True


def worth_moving(now_s: float, new_s: float, remaining_s: float, reload_s: float, drain_s: float) -> tuple[bool, float]:
    """(move?, seconds saved): the plans' predicted times for the same work (a step's, either objective),
    the run's predicted time left on the current plan, and what the move costs."""
    if now_s <= 0 or new_s >= now_s:
        return False, 0.0
    saved = remaining_s * (1 - new_s / now_s)
    return saved > reload_s + drain_s, saved
