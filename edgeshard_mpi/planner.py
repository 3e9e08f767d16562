"""Plans: which rank holds which contiguous range of units.

Units are numbered 0..N-1: unit 0 is the embedding, units 1..N-2 the decoder blocks, unit N-1 the
final norm + LM head. A plan lists stages in pipeline order; stage 0 runs on rank 0 (the source,
which holds the prompts) and starts at unit 0. Ranks that appear in no stage take no part.

Pure Python and numpy: no MPI, no torch.
"""

from __future__ import annotations

import dataclasses
import json
import math
from fractions import Fraction
from pathlib import Path
from typing import Sequence

import numpy as np

from .jsonfile import read_object

__all__ = [
    "Stage", "Plan", "PlanError", "even_plan",
    "Costs", "plan_latency", "plan_throughput", "predict",
    "edge_solo", "cloud_device", "cloud_edge_even", "cloud_edge_opt", "even_split", "memory_proportional",
    "OBJECTIVES", "plan_for",
]


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
    # content hashes of the model and cluster of the profile it was planned from ("" = not recorded:
    # hand-written, even split); a run refuses a plan recorded for another model or cluster
    model: str = ""
    cluster: str = ""

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

    def check_for(self, model_fp: str, cluster_fp: str) -> None:
        """Refuse a plan made from a profile of another model or cluster, naming both content hashes."""
        for what, planned, running in (("model", self.model, model_fp), ("cluster", self.cluster, cluster_fp)):
            if planned and planned != running:
                raise PlanError(f"{self.source}: plan was made for {what} {planned}, not this {what} ({running}); "
                                f"plan again from a profile of this {what}")

    def to_dict(self) -> dict:
        d = {
            "objective": self.objective,
            "num_units": self.num_units,
            "stages": [dataclasses.asdict(s) for s in self.stages],
        }
        d.update({k: v for k, v in (("model", self.model), ("cluster", self.cluster)) if v})
        return d

    @classmethod
    def from_dict(cls, d: dict, num_units: int | None = None, source: str = "<plan>") -> "Plan":
        try:
            stages = tuple(Stage(int(s["rank"]), int(s["first"]), int(s["last"])) for s in d["stages"])
        except (KeyError, TypeError, ValueError) as e:
            raise PlanError(f"{source}: stages must be a list of {{rank, first, last}} ({e})") from None
        for i, s in enumerate(d["stages"]):  # a misspelt key (say "frist") must not pass unseen
            extra = sorted(set(s) - {"rank", "first", "last"})
            if extra:
                raise PlanError(f"{source}: stage {i} has unknown key(s) {', '.join(extra)} "
                                f"(a stage is {{rank, first, last}})")
        n = num_units if num_units is not None else int(d["num_units"])
        if "num_units" in d and num_units is not None and int(d["num_units"]) != num_units:
            raise PlanError(f"{source}: plan is for {d['num_units']} units, the model has {num_units}")
        hashes = {k: d.get(k, "") for k in ("model", "cluster")}
        if not all(isinstance(v, str) for v in hashes.values()):
            raise PlanError(f"{source}: model and cluster must be content hashes (strings)")
        return cls(stages, n, d.get("objective", "manual"), source, **hashes)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path, num_units: int | None = None) -> "Plan":
        path = Path(path)
        if not path.is_file():
            raise PlanError(f"{path}: plan file not found")
        return cls.from_dict(read_object(path, PlanError, "a JSON object with stages"), num_units, str(path))


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


# ------------------------------------------------------------------------------------------------
# Planning: the costs of one problem, the exact DPs (latency, throughput), baselines, prediction.
# Notation follows PAPER.md: units i = 0..N-1, devices j = 0..M-1, device 0 is the source.
# ------------------------------------------------------------------------------------------------

_INF = math.inf


@dataclasses.dataclass(frozen=True)
class Costs:
    """One planning problem: what each unit costs on each device, and what the links cost.

    Validated on construction; sequences are stored as tuples of floats, None memory as inf.
    A device index is also the MPI rank that runs it, so plans use it as `Stage.rank`.
    """

    compute: Sequence[Sequence[float]]
    """compute[i][j]: seconds unit i takes on device j, for one step of the schedule being planned
    (a decode step, a prefill, a micro-batch). Finite and >= 0; shape (N, M)."""

    unit_bytes: Sequence[float] | Sequence[Sequence[float]]
    """unit_bytes[i]: bytes unit i occupies on its device (weights plus its KV cache for the job);
    shape (N,). Or unit_bytes[i][j], shape (N, M): unit i on device j, where devices hold their
    shards in dtypes or quantizations of their own. Read it through bytes_on(j) / stage_bytes."""

    device_memory: Sequence[float | None]
    """device_memory[j]: usable bytes of device j; None or inf means unlimited; shape (M,)."""

    out_bytes: Sequence[float] | Sequence[Sequence[float]]
    """out_bytes[i]: bytes unit i sends to unit i+1; out_bytes[N-1] goes back to the source for the
    next token; shape (N,). Or out_bytes[i][j], shape (N, M): what unit i sends from device j, in
    its dtype. Read it through out_bytes_on(j)."""

    bandwidth: Sequence[Sequence[float]]
    """bandwidth[k][j]: bytes/s of the link k->j, > 0 (inf allowed); the diagonal is not used;
    shape (M, M)."""

    latency: Sequence[Sequence[float]]
    """latency[k][j]: seconds of the link k->j, finite and >= 0; the diagonal is not used;
    shape (M, M)."""

    device_names: Sequence[str] | None = None
    """device_names[j]: a name for messages; defaults to "device j"."""

    stage_s: Sequence[float] | None = None
    """stage_s[j]: seconds a stage on device j costs per step beyond its units' compute[i][j] (the
    cold start of a step, paid once however many units the stage holds); finite and >= 0; shape
    (M,); None: 0 on every device."""

    def __post_init__(self):
        def table(name, rows, n_rows, n_cols):
            rows = [list(r) for r in rows]
            if len(rows) != n_rows:
                raise PlanError(f"costs: {name} has {len(rows)} row(s), expected {n_rows}")
            for r, row in enumerate(rows):
                if len(row) != n_cols:
                    raise PlanError(f"costs: {name}[{r}] has {len(row)} entries, expected {n_cols}")
            return tuple(tuple(float(x) for x in row) for row in rows)

        def vector(name, values, n):
            values = list(values)
            if len(values) != n:
                raise PlanError(f"costs: {name} has {len(values)} entries, expected {n}")
            return tuple(_INF if x is None else float(x) for x in values)

        def per_unit(name, values):
            """(N,) or, per device, (N, M): the table as given, its columns [j][i], and its cells."""
            rows = list(values)
            nested = [hasattr(r, "__len__") for r in rows]
            if rows and all(nested):
                t = table(name, rows, n, m)
                return t, tuple(tuple(row[j] for row in t) for j in range(m)), [
                    (f"[{i}][{j}]", t[i][j]) for i in range(n) for j in range(m)]
            if any(nested):
                raise PlanError(f"costs: {name} must be {n} numbers or {n} rows of {m} numbers, not a mix")
            v = vector(name, rows, n)
            return v, (v,) * m, [(f"[{i}]", x) for i, x in enumerate(v)]

        def check(name, values, ok, what):
            for idx, x in values:
                if not ok(x):
                    raise PlanError(f"costs: {name}{idx} = {x}, must be {what}")

        if len(self.compute) == 0 or len(self.compute[0]) == 0:
            raise PlanError("costs: compute must have at least one unit (row) and one device (column)")
        n, m = len(self.compute), len(self.compute[0])
        compute = table("compute", self.compute, n, m)
        unit_bytes, by_device, byte_cells = per_unit("unit_bytes", self.unit_bytes)
        memory = vector("device_memory", self.device_memory, m)
        out_bytes, out_by_device, out_cells = per_unit("out_bytes", self.out_bytes)
        bandwidth = table("bandwidth", self.bandwidth, m, m)
        latency = table("latency", self.latency, m, m)
        off_diag = lambda t: [(f"[{k}][{j}]", t[k][j]) for k in range(m) for j in range(m) if k != j]
        finite_nonneg = lambda x: math.isfinite(x) and x >= 0
        check("compute", [(f"[{i}][{j}]", compute[i][j]) for i in range(n) for j in range(m)],
              finite_nonneg, "finite and >= 0 seconds")
        check("unit_bytes", byte_cells, finite_nonneg, "finite and >= 0")
        check("out_bytes", out_cells, finite_nonneg, "finite and >= 0")
        check("device_memory", [(f"[{j}]", x) for j, x in enumerate(memory)], lambda x: x >= 0,
              ">= 0 bytes (None or inf for unlimited)")
        check("bandwidth", off_diag(bandwidth), lambda x: x > 0, "> 0 bytes/s (inf allowed)")
        check("latency", off_diag(latency), finite_nonneg, "finite and >= 0 seconds")
        stage_s = vector("stage_s", [0.0] * m if self.stage_s is None else self.stage_s, m)
        check("stage_s", [(f"[{j}]", x) for j, x in enumerate(stage_s)], finite_nonneg, "finite and >= 0 seconds")
        if self.device_names is None:
            names = tuple(f"device {j}" for j in range(m))
        else:
            names = tuple(str(x) for x in self.device_names)
            if len(names) != m:
                raise PlanError(f"costs: device_names has {len(names)} entries, expected {m}")
        for field, value in [("compute", compute), ("unit_bytes", unit_bytes), ("device_memory", memory),
                             ("out_bytes", out_bytes), ("bandwidth", bandwidth), ("latency", latency),
                             ("device_names", names), ("stage_s", stage_s)]:
            object.__setattr__(self, field, value)
        object.__setattr__(self, "_by_device", by_device)  # [j][i]: either form, read one way
        object.__setattr__(self, "_out_by_device", out_by_device)

    @property
    def num_units(self) -> int:
        return len(self.compute)

    @property
    def num_devices(self) -> int:
        return len(self.compute[0])

    def name(self, j: int) -> str:
        """Device j for messages: its name and index."""
        default = f"device {j}"
        return default if self.device_names[j] == default else f"{self.device_names[j]!r} (device {j})"

    @property
    def per_device_bytes(self) -> bool:
        """Whether unit_bytes was given per device, shape (N, M)."""
        return bool(self.unit_bytes) and isinstance(self.unit_bytes[0], tuple)

    def bytes_on(self, j: int) -> tuple[float, ...]:
        """Every unit's bytes as device j holds them, shape (N,), whichever form unit_bytes has."""
        return self._by_device[j]

    def out_bytes_on(self, j: int) -> tuple[float, ...]:
        """What every unit sends on from device j, shape (N,), whichever form out_bytes has."""
        return self._out_by_device[j]

    def stage_bytes(self, j: int, first: int, last: int) -> float:
        """Bytes of units first..last on device j, added left to right (as the DPs add them)."""
        return _fold(self._by_device[j][first:last + 1])

    def least_bytes(self) -> list[float]:
        """Each unit's bytes on the device that holds it smallest: what the model needs at least."""
        return [min(col[i] for col in self._by_device) for i in range(self.num_units)]

    def stage_compute(self, j: int, first: int, last: int) -> float:
        """Seconds of one step of a stage holding units first..last on device j: its step cost,
        then each unit's, added left to right (the order the DPs add them in)."""
        return _fold([self.stage_s[j]] + [self.compute[i][j] for i in range(first, last + 1)])

    def transfer(self, k: int, j: int, nbytes: float) -> float:
        """Seconds to send nbytes over the link k->j: latency + bytes / bandwidth; 0 on one device."""
        if k == j:
            return 0.0
        return self.latency[k][j] + nbytes / self.bandwidth[k][j]


def _fold(values) -> float:
    """Left-to-right sum, the order np.cumsum uses, so DP values and predictions agree to the bit."""
    acc = 0.0
    for x in values:
        acc += x
    return acc


def _fmt_bytes(b: float) -> str:
    if math.isinf(b):
        return "unlimited"
    if b < 2**20:
        return f"{b:,.0f} bytes"
    return f"{b:,.0f} bytes ({b / 2**30:.3g} GiB)"


def _infeasible(costs: Costs, what: str) -> PlanError:
    """Why no plan fits in memory, with the numbers: what is needed, what is offered, by whom."""
    n, m = costs.num_units, costs.num_devices
    least = costs.least_bytes()  # with per-device bytes, each unit in its smallest form
    need = _fold(least)
    offer = _fold(costs.device_memory)
    per_device = ", ".join(f"{costs.name(j)}: {_fmt_bytes(costs.device_memory[j])}" for j in range(m))
    reasons = []
    if costs.bytes_on(0)[0] > costs.device_memory[0]:
        reasons.append(f"unit 0 ({_fmt_bytes(costs.bytes_on(0)[0])}) must stay on the source "
                       f"{costs.name(0)}, which offers {_fmt_bytes(costs.device_memory[0])}")
    biggest = max(range(m), key=lambda j: costs.device_memory[j])
    for i, b in enumerate(least):
        if all(costs.bytes_on(j)[i] > costs.device_memory[j] for j in range(m)):
            reasons.append(f"unit {i} ({_fmt_bytes(b)}) fits on no device (the largest is "
                           f"{costs.name(biggest)} with {_fmt_bytes(costs.device_memory[biggest])})")
    if need > offer:
        reasons.append(f"{_fmt_bytes(need - offer)} short in total")
    if not reasons:
        largest = max(range(n), key=lambda i: least[i])
        reasons.append(f"the units cannot be cut into contiguous shards, one per device, that each fit "
                       f"(largest unit: {largest} with {_fmt_bytes(least[largest])})")
    needs = "at least " if costs.per_device_bytes else ""
    return PlanError(f"{what}: the model does not fit: it needs {needs}{_fmt_bytes(need)} over {n} unit(s), "
                     f"the {m} device(s) offer {_fmt_bytes(offer)} ({per_device}); " + "; ".join(reasons))


def _make_plan(costs: Costs, stages: list[tuple[int, int, int]], objective: str) -> Plan:
    """A Plan from (device, first, last) triples, refused with the numbers if a device is over-full."""
    full = []
    for j, first, last in stages:
        used = costs.stage_bytes(j, first, last)
        if used > costs.device_memory[j]:
            full.append(f"{costs.name(j)} would hold units {first}..{last} = {_fmt_bytes(used)} "
                        f"but offers {_fmt_bytes(costs.device_memory[j])}")
    if full:
        raise PlanError(f"{objective}: does not fit: " + "; ".join(full) +
                        f" (the model needs {_fmt_bytes(_fold(costs.least_bytes()))} in total, "
                        f"the devices offer {_fmt_bytes(_fold(costs.device_memory))})")
    return Plan(tuple(Stage(j, a, b) for j, a, b in stages), costs.num_units, objective, f"<{objective}>")


def predict(costs: Costs, plan: Plan) -> dict:
    """What the cost model predicts for a plan, to compare plans made any way.

    Returns a dict:
      latency_s: seconds per step when one request flows through the stages one after another:
        every stage's compute, every hop between stages, and the return of the last unit's output
        to the source (0 when the last stage is the source itself).
      bottleneck_s: seconds per step of the pipeline: the slowest stage, where a stage costs
        max(its compute, its outgoing transfer); the last stage's outgoing transfer is the return.
        Steady-state throughput is 1 / bottleneck_s steps per second.
      stage_compute_s, stage_send_s, stage_bytes: per stage, in pipeline order.
      fits: whether every stage fits in its device's memory.
    """
    n, m = costs.num_units, costs.num_devices
    if plan.num_units != n:
        raise PlanError(f"{plan.source}: plan is for {plan.num_units} units, the costs for {n}")
    bad = [s.rank for s in plan.stages if s.rank >= m]
    if bad:
        raise PlanError(f"{plan.source}: plan uses rank(s) {bad}, the costs have {m} device(s)")
    compute, send, used = [], [], []
    for s, nxt in zip(plan.stages, list(plan.stages[1:]) + [None]):
        compute.append(costs.stage_compute(s.rank, s.first, s.last))
        send.append(costs.transfer(s.rank, nxt.rank if nxt else 0, costs.out_bytes_on(s.rank)[s.last]))
        used.append(costs.stage_bytes(s.rank, s.first, s.last))
    latency = 0.0
    for c, t in zip(compute, send):  # same order of additions as the latency DP
        latency += c
        latency += t
    return {
        "latency_s": latency,
        "bottleneck_s": max(max(c, t) for c, t in zip(compute, send)),
        "stage_compute_s": compute,
        "stage_send_s": send,
        "stage_bytes": used,
        "fits": all(b <= costs.device_memory[s.rank] for b, s in zip(used, plan.stages)),
    }


# --- exact DPs ----------------------------------------------------------------------------------

def _interchangeable(costs: Costs, a: int, b: int) -> bool:
    """Whether swapping devices a and b maps the problem onto itself (same compute column, memory,
    unit and out bytes, links to and from every other device, and the same link both ways between them)."""
    if costs.device_memory[a] != costs.device_memory[b] or costs.stage_s[a] != costs.stage_s[b]:
        return False
    if costs.bytes_on(a) != costs.bytes_on(b) or costs.out_bytes_on(a) != costs.out_bytes_on(b):
        return False  # one holds its shard, and sends its activations, in another dtype
    if any(row[a] != row[b] for row in costs.compute):
        return False
    for links in (costs.bandwidth, costs.latency):
        if links[a][b] != links[b][a]:
            return False
        for other in range(costs.num_devices):
            if other in (a, b):
                continue
            if links[a][other] != links[b][other] or links[other][a] != links[other][b]:
                return False
    return True


def _device_types(costs: Costs) -> list[list[int]]:
    """Devices grouped into types of interchangeable devices; type 0 is the source alone.

    "Swapping a and b is a symmetry of the problem" is an equivalence relation (the product of
    swaps (a b)(b c)(a b) is the swap (a c)), so comparing each device with one representative per
    type finds exactly its classes, and any permutation inside a type is a symmetry too. The source
    never joins a type: it has a role no other device has.
    """
    types = [[0]]
    for j in range(1, costs.num_devices):
        for members in types[1:]:
            if _interchangeable(costs, members[0], j):
                members.append(j)
                break
        else:
            types.append([j])
    return types


def _shift(flat: np.ndarray, dims: tuple[int, ...], axis: int) -> np.ndarray:
    """Count vectors c -> c + e_axis on a flat row-major array; entries that would exceed the
    count of the type drop out, entries with c[axis] == 0 become inf."""
    out = np.full(dims, _INF)
    lead = (slice(None),) * axis
    out[lead + (slice(1, None),)] = flat.reshape(dims)[lead + (slice(None, -1),)]
    return out.reshape(-1)


# The DP keeps one float64 table of types x (units + 1) x count vectors; past this many cells
# (1.2 GB) refuse with the numbers instead of running the machine out of memory.
_MAX_DP_CELLS = 150_000_000


def _shard_dp(costs: Costs, objective: str) -> Plan:
    """The exact DP shared by plan_latency (combine = +) and plan_throughput (combine = max).

    Devices are merged into types (see _device_types); type 0 is the source, types 1..T the others,
    type t has cap[t] devices. A state is (i, c, k): units 0..i-1 are placed, c[t] devices of type t
    took part so far (c is a count vector, c[t] <= cap[t], stored as one flat index of a
    mixed-radix array), and the shard that ends at unit i-1 runs on a device of type k.

      G(i, c, k) = min over the start i' of that last shard, and over the type k' before it, of
                   combine( G(i', c - e_k, k'), T(k', k, O_k'[i'-1]), S_k(i', i-1) )
                   where S_k(i', i-1) = stage_s[k] + sum t[i'..i-1] on type k, bytes_k(i'..i-1) <= Mem[k]
                   (bytes_k: the units as type k holds them, in its own dtype);
      the source shard: G(i, 0, source) = S_source(0, i-1) if bytes_source(0..i-1) <= Mem[source];
      the end: min over (c, k) of combine( G(N, c, k), T(k, source, O_k[N-1]) ), and G(N, 0, source);
      O_k: what each unit sends from type k (in its dtype).

    combine is + for the latency objective and max for the throughput (bottleneck) objective; both
    are monotone, which is what makes the principle of optimality hold.

    Why it is exact: every feasible plan is one path through these states, since each stage is one
    fresh device holding one contiguous range and memory is checked for the whole shard at once (not
    tracked greedily along a path as in the paper's reimplementation), and the cap on c stops a
    device from being used twice. The cost of the rest of a plan depends only on (i, c, k): which
    members of a type were used does not matter, because swapping interchangeable devices maps
    plans onto plans of the same cost. So the minimum over paths is the minimum over plans.

    Cost: C = prod(cap[t] + 1) count vectors; time O(N^2 T C + N T^2 C) in numpy, memory N T C
    floats (one table H below). The plan is rebuilt by recomputing the few cells on its path.
    """
    latency_objective = objective == "latency"
    combine = np.add if latency_objective else np.maximum  # works on floats and arrays alike
    n_units = costs.num_units
    types = _device_types(costs)
    reps = [members[0] for members in types]
    n_types = len(types) - 1  # non-source types 1..n_types live at array index t - 1
    dims = tuple(len(members) + 1 for members in types[1:])
    strides = [int(np.prod(dims[a + 1:], dtype=np.int64)) for a in range(n_types)]
    size = int(np.prod(dims, dtype=np.int64))  # C; 1 when the source is alone
    cells = n_types * (n_units + 1) * size
    if cells > _MAX_DP_CELLS:
        raise PlanError(f"plan_{objective}: the exact search over {costs.num_devices} devices in "
                        f"{len(types)} types of sizes {[len(members) for members in types]} needs "
                        f"{cells:,} table cells ({cells * 8 / 2**30:.1f} GiB), over the limit of "
                        f"{_MAX_DP_CELLS:,}: give nearly identical devices one profile, or plan on fewer")

    def link(a: int, b: int, nbytes: float) -> float:
        """Transfer between devices of types a and b (two distinct devices when a == b)."""
        if a != b:
            return costs.transfer(reps[a], reps[b], nbytes)
        if len(types[a]) < 2:
            return _INF  # unreachable: the cap already forbids a second device of this type
        return costs.transfer(types[a][0], types[a][1], nbytes)

    def sent(t: int, i: int) -> float:
        """Bytes unit i sends on from a device of type t."""
        return costs.out_bytes_on(reps[t])[i]

    # S[t, i, j]: compute of units i..j on type t; lo[t][j]: the first start i such that units i..j
    # fit on type t (j + 1 when unit j alone does not fit), in type t's own bytes. Sums are left
    # folds from each start i, the order predict and the memory check in _make_plan use, so all
    # three agree to the bit.
    S = np.full((n_types + 1, n_units, n_units), _INF)
    lo = [[0] * n_units for _ in types]
    for t, rep in enumerate(reps):
        shard_bytes = np.full((n_units, n_units), _INF)
        unit_bytes = np.array(costs.bytes_on(rep))
        for i in range(n_units):
            shard_bytes[i, i:] = np.cumsum(unit_bytes[i:])
        column = np.array([row[rep] for row in costs.compute])
        for i in range(n_units):  # each shard's sum starts from its device's step cost
            S[t, i, i:] = np.cumsum(np.concatenate(([costs.stage_s[rep]], column[i:])))[1:]
        for j in range(n_units):
            i = j + 1
            while i > 0 and shard_bytes[i - 1, j] <= costs.device_memory[rep]:
                i -= 1
            lo[t][j] = i

    # g_src[i]: the source holds units 0..i-1 (the first shard always starts at unit 0 on it).
    g_src = np.full(n_units + 1, _INF)
    for i in range(1, n_units + 1):
        if lo[0][i - 1] == 0:
            g_src[i] = S[0, 0, i - 1]

    # H[t-1, i, c]: best value when units 0..i-1 are placed and a fresh device of type t starts at
    # unit i, c counting that device: min over k of combine(G(i, c - e_t, k), T(k, t, O[i-1])).
    H = np.full((n_types, n_units + 1, size), _INF)

    def enter(i: int, g: np.ndarray) -> None:
        for t in range(1, n_types + 1):
            best = np.full(size, _INF)
            for k in range(1, n_types + 1):
                np.minimum(best, combine(g[k - 1], link(k, t, sent(k, i - 1))), out=best)
            best[0] = min(best[0], combine(g_src[i], link(0, t, sent(0, i - 1))))  # c = 0: after the source
            H[t - 1, i] = _shift(best, dims, t - 1)

    def window(t: int, j: int) -> tuple[int, np.ndarray]:
        """Starts i' of a shard ending at unit j on type t (never unit 0: that is the source's),
        and the compute S_t(i', j) of each."""
        first = max(lo[t][j], 1)
        return first, S[t, first:j + 1, j]

    g = np.full((n_types, size), _INF)  # G(i, ., k) for the current i; none end before unit 1
    if n_units > 1:
        enter(1, g)
    for j in range(1, n_units):  # shards ending at unit j give G(j + 1, ., .)
        g = np.full((n_types, size), _INF)
        for t in range(1, n_types + 1):
            first, s = window(t, j)
            if first <= j:
                g[t - 1] = combine(H[t - 1, first:j + 1], s[:, None]).min(axis=0)
        if j + 1 < n_units:
            enter(j + 1, g)

    # The end: the output of unit N-1 goes back to the source.
    best_value, best_state = g_src[n_units], None
    for k in range(1, n_types + 1):
        values = combine(g[k - 1], link(k, 0, sent(k, n_units - 1)))
        c = int(np.argmin(values))
        if values[c] < best_value:
            best_value, best_state = float(values[c]), (k, c)
    if math.isinf(best_value):
        raise _infeasible(costs, f"plan_{objective}")

    def cell(i: int, k: int, c: int) -> tuple[float, int]:
        """G(i, c, k) recomputed exactly as the forward pass did, with the start of its shard."""
        first, s = window(k, i - 1)
        if first > i - 1:
            return _INF, -1
        values = combine(H[k - 1, first:i, c], s)
        a = int(np.argmin(values))
        return float(values[a]), first + a

    # Walk back from the end; at each shard pick a predecessor that gives the same value.
    typed = []  # (type, first, last), last shard first
    if best_state is None:
        typed.append((0, 0, n_units - 1))
    else:
        end, (k, c) = n_units, best_state
        while True:
            _, start = cell(end, k, c)
            typed.append((k, start, end - 1))
            c -= strides[k - 1]
            options = [(combine(g_src[start], link(0, k, sent(0, start - 1))), 0)] if c == 0 else []
            options += [(combine(cell(start, k2, c)[0], link(k2, k, sent(k2, start - 1))), k2)
                        for k2 in range(1, n_types + 1)]
            _, k_prev = min(options, key=lambda o: o[0])
            if k_prev == 0:
                typed.append((0, 0, start - 1))
                break
            end, k = start, k_prev
    typed.reverse()

    # Types back to devices: the members of a type in index order.
    taken = [0] * len(types)
    stages = []
    for t, first, last in typed:
        stages.append((types[t][taken[t]], first, last))
        taken[t] += 1
    return _make_plan(costs, stages, objective)


def plan_latency(costs: Costs) -> Plan:
    """The plan with the least sequential time per step (PAPER.md, latency objective), exactly.

    Minimises  sum over stages of (compute of its units + transfer to the next stage), where the
    last stage's transfer is the return of unit N-1's output to the source (0 if it is the source).
    Constraints: each device holds at most one contiguous range of units (a device is a rank, a rank
    runs one stage), a device's units fit in its memory, the source holds unit 0.

    The paper's recurrence is per unit, D(i, j) = t[i][j] + min_k (D(i-1, k) + T(k, j, O[i-1])),
    with memory tracked greedily along the best path; it may return to a device or miss the optimum
    when memory binds. This is the shard-level DP of _shard_dp with combine = +, which carries the
    devices used so far (as counts per type of identical devices) and checks memory per shard, so
    it returns an optimum. Raises PlanError, with the numbers, when nothing fits.
    """
    return _shard_dp(costs, "latency")


def plan_throughput(costs: Costs) -> Plan:
    """The plan with the smallest pipeline bottleneck (PAPER.md, throughput objective), exactly.

    Minimises  max over stages of max(compute of its units, its outgoing transfer), where the last
    stage's outgoing transfer is the return of unit N-1's output to the source (0 if it is the
    source). Same constraints as plan_latency. This is the paper's g(i, S, k) recurrence with the
    device set S replaced by counts per type of identical devices, which loses nothing (see
    _shard_dp, combine = max) and keeps the 15-device testbed (four types) small. Raises PlanError,
    with the numbers, when nothing fits.
    """
    return _shard_dp(costs, "throughput")


# --- baselines (PAPER.md "Baselines", and how exo / llama.cpp split) -------------------------------

def edge_solo(costs: Costs) -> Plan:
    """Edge-Solo: the whole model on the source."""
    return _make_plan(costs, [(0, 0, costs.num_units - 1)], "edge_solo")


def cloud_device(costs: Costs) -> int:
    """The "cloud": the device other than the source with the least total compute (ties: lowest
    index). The source is left out because a cloud-edge split needs two devices."""
    if costs.num_devices < 2:
        raise PlanError(f"cloud-edge baselines need a second device besides the source; "
                        f"the costs have {costs.num_devices} device(s)")
    totals = [_fold(row[j] for row in costs.compute) for j in range(costs.num_devices)]
    return min(range(1, costs.num_devices), key=lambda j: (totals[j], j))


def _two_way(costs: Costs, cloud: int, split: int) -> list[tuple[int, int, int]]:
    """Units 0..split-1 on the source, the rest on the cloud (split == N: all on the source)."""
    n = costs.num_units
    return [(0, 0, split - 1)] + ([(cloud, split, n - 1)] if split < n else [])


def cloud_edge_even(costs: Costs) -> Plan:
    """Cloud-Edge-Even: source and cloud, units split in half, the first half (the larger one when
    N is odd, as even_plan does) on the source."""
    n = costs.num_units
    return _make_plan(costs, _two_way(costs, cloud_device(costs), (n + 1) // 2), "cloud_edge_even")


_OBJECTIVE_KEY = {"latency": "latency_s", "throughput": "bottleneck_s"}


def cloud_edge_opt(costs: Costs, objective: str = "latency") -> Plan:
    """Cloud-Edge-Opt: source and cloud, the split point that is best for the objective ("latency"
    or "throughput") among those that fit. Split N (everything on the source) is allowed, which is
    why the paper reports the same numbers as Edge-Solo when the cloud link is slow. Ties go to the
    split that keeps more units on the source."""
    if objective not in _OBJECTIVE_KEY:
        raise PlanError(f"cloud_edge_opt: objective {objective!r} is not one of {sorted(_OBJECTIVE_KEY)}")
    n, cloud = costs.num_units, cloud_device(costs)
    best = None
    for split in range(n, 0, -1):
        try:
            plan = _make_plan(costs, _two_way(costs, cloud, split), "cloud_edge_opt")
        except PlanError:
            continue
        value = predict(costs, plan)[_OBJECTIVE_KEY[objective]]
        if best is None or value < best[0]:
            best = (value, plan)
    if best is None:
        source_memory, cloud_memory = costs.device_memory[0], costs.device_memory[cloud]
        source_units = max(s for s in range(n + 1) if costs.stage_bytes(0, 0, s - 1) <= source_memory)
        cloud_from = min(s for s in range(n + 1) if costs.stage_bytes(cloud, s, n - 1) <= cloud_memory)
        raise PlanError(f"cloud_edge_opt: no split between the source {costs.name(0)} "
                        f"({_fmt_bytes(source_memory)}) and the cloud {costs.name(cloud)} "
                        f"({_fmt_bytes(cloud_memory)}) fits the model's {_fmt_bytes(_fold(costs.least_bytes()))} "
                        f"over {n} unit(s): the source holds at most the first {source_units} unit(s), "
                        f"the cloud at most the last {n - cloud_from}")
    return best[1]


def even_split(costs: Costs) -> Plan:
    """Units split as evenly as possible over all devices in index order (as even_plan)."""
    stages = [(s.rank, s.first, s.last) for s in even_plan(costs.num_units, costs.num_devices).stages]
    return _make_plan(costs, stages, "even_split")


def memory_proportional(costs: Costs) -> Plan:
    """Units split in proportion to device memory, in device order, as exo and llama.cpp split.

    Device j takes units [b_j, b_{j+1}) with b_j = round(N * (memory of devices 0..j-1) / total),
    halves rounded up, in exact arithmetic. A device whose share rounds to nothing takes no part,
    except the source, which always takes at least unit 0. Every device unlimited: an even share.
    """
    n, m = costs.num_units, costs.num_devices
    memory = costs.device_memory
    unlimited = [j for j in range(m) if math.isinf(memory[j])]
    if unlimited and len(unlimited) < m:
        raise PlanError(f"memory_proportional: device(s) {unlimited} have unlimited memory, so no "
                        f"proportion is defined; give every device a finite memory or none")
    weights = [Fraction(1)] * m if unlimited else [Fraction(x) for x in memory]
    total = sum(weights)
    if total == 0:
        raise _infeasible(costs, "memory_proportional")
    bounds, acc = [0], Fraction(0)
    for w in weights:
        acc += w
        bounds.append(math.floor(n * acc / total + Fraction(1, 2)))
    bounds[1] = max(bounds[1], 1)  # the source keeps unit 0
    for j in range(2, m + 1):
        bounds[j] = min(max(bounds[j], bounds[j - 1]), n)
    bounds[m] = n
    stages = [(j, bounds[j], bounds[j + 1] - 1) for j in range(m) if bounds[j + 1] > bounds[j]]
    return _make_plan(costs, stages, "memory_proportional")


OBJECTIVES = {
    "latency": plan_latency,
    "throughput": plan_throughput,
    "edge-solo": edge_solo,
    "cloud-edge-even": cloud_edge_even,
    "cloud-edge-opt": cloud_edge_opt,  # the split best for latency, as in the paper's latency column
    "cloud-edge-opt-throughput": lambda costs: cloud_edge_opt(costs, "throughput"),
    "even": even_split,
    "memory-proportional": memory_proportional,
}


def plan_for(costs: Costs, objective: str) -> Plan:
    """The plan an objective (the two EdgeShard DPs or a named baseline) makes for these costs."""
    if objective not in OBJECTIVES:
        raise PlanError(f"objective {objective!r} is not one of {', '.join(OBJECTIVES)}")
    return OBJECTIVES[objective](costs)
