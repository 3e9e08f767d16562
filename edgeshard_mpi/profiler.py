"""Profiles: what each unit costs on each device, and what each link between ranks costs.

    mpiexec -f hostfiles/hetero4.hosts -n 4 edgeshard profile jobs/hetero4.toml [--out FILE]

Every rank measures, on its own device with its emulation applied and in its own dtype and
quantization, every unit's prefill time at the job's prompt length and decode time at the job's
micro-batch size and context (median of repeated runs, with their spread), one unit loaded at a
time and within the device's memory. Ranks on one machine take turns, so that they do not slow each
other's measurements; ranks on different machines measure at once. Links are measured by
ping-pong between every pair of ranks at growing sizes (latency and bandwidth from the smallest and
the largest), pairs on disjoint machines at once. Rank 0 gathers it all into a `Profile`, saved as
JSON with the cluster, model, dtype, shapes, versions and date.

The `Profile` dataclass is pure Python, so `edgeshard plan` reads profiles without MPI or torch;
the measuring functions import torch and MPI only when called.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import statistics
import time
from pathlib import Path

from .jsonfile import read_object
from .models import kv_unit_bytes
from .planner import Costs

__all__ = ["Profile", "ProfileError", "compare", "profile_shapes", "profiles_dir", "find_profile", "model_fingerprint",
           "cluster_fingerprint", "device_bytes", "link_rounds", "machine_turns", "measure_profile", "peak_rss",
           "reset_peak_rss"]

FORMAT = "edgeshard-profile/1"


def peak_rss() -> int:
    """This process's peak resident bytes since it began, or since reset_peak_rss (Linux's VmHWM)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # not Linux: since the process began


def reset_peak_rss() -> None:
    """Start the peak over from the present resident bytes: each job of a launch reports its own."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Linux: resets VmHWM
    except OSError:
        pass


class ProfileError(ValueError):
    pass


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def model_fingerprint(spec) -> str:
    """A content hash of the model: its config, dtype, quantization and every unit's tensors and bytes."""
    return _digest({"config": spec.config, "dtype": spec.dtype,
                    **({"quantize": spec.quantize} if spec.quantize else {}),  # unquantized: as before it existed
                    "units": [[u.name, list(u.tensors), u.param_bytes] for u in spec.units]})


def cluster_fingerprint(devices: list[dict]) -> str:
    """A content hash of the devices in rank order (names, memory, torch device, emulation, threads, and
    a device's own dtype and quantization where declared)."""
    return _digest(devices)


def _pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, n))))


LOADS = ("turns", "together")  # how ranks take their measurements: see measure_profile


def profile_shapes(prompt_lengths: list[int], max_new_tokens: int, micro_batch_size: int, load: str = "turns") -> dict:
    """The shapes a job is profiled at, rounded up to powers of two so that similar jobs share them.

    prompt_tokens: the median prompt length; context: the mean context seen while decoding
    (prompt + half the new tokens). load: "together" (measure_profile) is kept with them, so that
    a profile measured that way is found only by runs that ask for it.
    """
    if load not in LOADS:
        raise ValueError(f"profile load {load!r}: choose one of {', '.join(LOADS)}")
    p = _pow2(int(statistics.median(prompt_lengths)))
    return {"prompt_tokens": p, "context": _pow2(p + max(1, max_new_tokens // 2)),
            "micro_batch_size": micro_batch_size, **({"load": load} if load != "turns" else {})}


def profiles_dir() -> Path:
    return Path(os.environ.get("EDGESHARD_PROFILES", "profiles/measured")).resolve()


@dataclasses.dataclass
class Profile:
    """Measured (or derived) costs of one model on one cluster at one set of shapes."""

    model: dict  # name, fingerprint, dtype, num_units
    units: list[dict]  # per unit: name, param_bytes, kv_bytes_per_token, out_bytes_per_token
    # per rank: the Device fields + prefill_s[unit], decode_s[unit]; a device that holds its units in a
    # dtype or quantization other than the model's also param_bytes, kv_bytes_per_token and
    # out_bytes_per_token per unit
    devices: list[dict]
    bandwidth: list[list[float | None]]  # bytes/s of the link rank k -> rank j; None on the diagonal
    latency: list[list[float]]  # seconds of the link rank k -> rank j; 0 on the diagonal
    shapes: dict  # prompt_tokens, context, micro_batch_size
    cluster: str = ""  # cluster fingerprint
    versions: dict = dataclasses.field(default_factory=dict)
    created: str = ""
    notes: str = ""
    source: str = "<profile>"

    def __post_init__(self):
        n, m = len(self.units), len(self.devices)
        where = self.source
        if self.model.get("num_units") != n:
            raise ProfileError(f"{where}: model.num_units {self.model.get('num_units')} but {n} units listed")
        for j, d in enumerate(self.devices):
            for key in ("prefill_s", "decode_s") + (_OWN_BYTES if any(k in d for k in _OWN_BYTES) else ()):
                if len(d.get(key, [])) != n:
                    raise ProfileError(f"{where}: devices[{j}].{key} has {len(d.get(key, []))} entries, expected {n}")
            for key in ("prefill_spread", "decode_spread", "decode_one_s"):
                if key in d and len(d[key]) != n:
                    raise ProfileError(f"{where}: devices[{j}].{key} has {len(d[key])} entries, expected {n}")
            rows = d.get("decode_rows_s")
            if rows is not None and len(rows) != self.shapes.get("micro_batch_size"):
                raise ProfileError(f"{where}: devices[{j}].decode_rows_s has {len(rows)} entries, expected "
                                   f"micro_batch_size {self.shapes.get('micro_batch_size')}")
        for name, table in (("bandwidth", self.bandwidth), ("latency", self.latency)):
            if len(table) != m or any(len(row) != m for row in table):
                raise ProfileError(f"{where}: {name} must be {m} x {m}")

    def spreads(self, phase: str = "decode") -> list[float | None]:
        """Per device, how far its figures scatter over repeats (spread_of): the median of its units';
        None for a device profiled before spreads were recorded."""
        key = f"{phase}_spread"
        return [statistics.median(d[key]) if d.get(key) else None for d in self.devices]

    def scattered(self) -> list[str]:
        """A line for each device with units whose spread stayed over SPREAD_BOUND."""
        out = []
        for d in self.devices:
            wide = [max(a, b) for a, b in zip(d.get("prefill_spread", []), d.get("decode_spread", []))
                    if max(a, b) > SPREAD_BOUND]
            if wide:
                out.append(f"device {d['name']}: {len(wide)} of {self.num_units} units scatter more than "
                           f"{SPREAD_BOUND:.0%} over repeats or against the devices emulated beside it "
                           f"(up to {max(wide):.0%})")
        return out

    @property
    def num_units(self) -> int:
        return len(self.units)

    def total_s(self, j: int, phase: str = "decode") -> float:
        """Device j's time for every unit it could hold, one after another (units over its memory,
        recorded as None, left out)."""
        return sum(t for t in self.devices[j][f"{phase}_s"] if t is not None)

    def scaled(self, factors: dict[int, float]) -> "Profile":
        """This profile with device j's times x factors[j] (a run's measured drift, drift.py); the
        copy says so in its notes and is not saved over the measured one."""
        devices = [dict(d) for d in self.devices]
        for j, f in factors.items():
            for key in _TIMES:
                if key in devices[j]:
                    v = devices[j][key]
                    devices[j][key] = [None if x is None else x * f for x in v] if isinstance(v, list) else v * f
        notes = "; ".join(f"{self.devices[j]['name']} x{f:.2f}" for j, f in sorted(factors.items()))
        return dataclasses.replace(self, devices=devices, notes=f"{self.notes} scaled by a run: {notes}".strip(),
                                   source=f"{self.source} (scaled by a run)")

    def subset(self, names: list[str]) -> "Profile":
        """This profile for the named devices alone, in that order: their columns and the links between
        them, each as measured. A run on the devices left after one was lost plans from it without
        measuring again (find_profile)."""
        idx = [self.device_names.index(n) for n in names]
        devices = [dict(self.devices[j]) for j in idx]
        return dataclasses.replace(
            self, devices=devices, bandwidth=[[self.bandwidth[k][j] for j in idx] for k in idx],
            latency=[[self.latency[k][j] for j in idx] for k in idx],
            cluster=cluster_fingerprint([_declared(d) for d in devices]),
            source=f"{self.source} (devices {', '.join(names)} of {len(self.devices)})")

    @property
    def device_names(self) -> list[str]:
        return [d["name"] for d in self.devices]

    def unit_bytes(self, kv_tokens: int | None = None, row_tokens: int | None = None) -> list:
        """Weights plus the KV cache for `kv_tokens` cached tokens in sequences of `row_tokens` (a sliding
        layer holds at most its window of each); default: a micro-batch at the context.

        Shape (N,) when every device holds the model's bytes; else (N, M), unit i as device j holds
        it (planner.Costs takes either)."""
        if kv_tokens is None:
            kv_tokens, row_tokens = self.shapes["micro_batch_size"] * self.shapes["context"], self.shapes["context"]

        def column(params, kv_per_token) -> list[float]:
            return [p + kv_unit_bytes(k, u.get("kv_window"), kv_tokens, row_tokens)
                    for p, k, u in zip(params, kv_per_token, self.units)]

        model = column([u["param_bytes"] for u in self.units], [u["kv_bytes_per_token"] for u in self.units])
        if not any("param_bytes" in d for d in self.devices):
            return model
        columns = [column(d["param_bytes"], d["kv_bytes_per_token"]) if "param_bytes" in d else model
                   for d in self.devices]
        return [list(row) for row in zip(*columns)]

    def context_costs(self, j: int, first: int, last: int,
                      key: str = "decode_kv_s") -> tuple[tuple[int | None, float], ...]:
        """What a decode step of units first..last on device j costs more per row for each KV column
        past the profile's context (less before it), as (sliding window or None, seconds per column)
        by window: the units' KV bytes per token in the device's dtype x its measured seconds per
        byte read (`decode_kv_s`). With key "prefill_kv_s", what a prefill costs more per token for
        each column of its rows' width past the profile's prompt. Empty for a profile that did not
        measure it."""
        per_byte = self.devices[j].get(key) or 0.0
        kv = self.devices[j].get("kv_bytes_per_token") or [u["kv_bytes_per_token"] for u in self.units]
        out: dict[int | None, float] = {}
        for u in range(first, last + 1):
            if per_byte and kv[u]:
                w = self.units[u].get("kv_window")
                out[w] = out.get(w, 0.0) + kv[u] * per_byte
        return tuple(out.items())

    def one_row_s(self, j: int, first: int, last: int) -> float | None:
        """Device j's decode step of one row through units first..last, its step cost paid once (as
        Costs.stage_compute); None where not measured (a profile at one row, or an older one)."""
        d = self.devices[j]
        one = d.get("decode_one_s")
        if not one or any(one[u] is None for u in range(first, last + 1)):
            return None
        step = float(d.get("decode_one_step_s", d.get("decode_step_s", 0.0)))
        return step + sum(max(0.0, one[u] - step) for u in range(first, last + 1))

    def row_shape(self, j: int) -> tuple[float, ...] | None:
        """How device j's decode step runs from one row to the profile's micro-batch b: for 1..b rows,
        the share of the way from the one-row step's cost to the b-row step's (0 at one row, 1 at b),
        from its blocks' step timed at each count (`decode_rows_s`); None where not timed (a profile of
        two rows or fewer, or an older one), and the way is then a straight line."""
        g = self.devices[j].get("decode_rows_s")
        if not g or len(g) < 3 or any(t is None for t in g) or g[-1] <= g[0]:
            return None
        return tuple(max(0.0, (t - g[0]) / (g[-1] - g[0])) for t in g)

    def out_bytes_per_token(self, j: int) -> list[int]:
        """What each unit sends on from device j, per token and row, in that device's dtype."""
        return self.devices[j].get("out_bytes_per_token") or [u["out_bytes_per_token"] for u in self.units]

    def costs(self, phase: str = "decode", kv_tokens: int | None = None, row_tokens: int | None = None) -> Costs:
        """The planning problem of one step: a decode step (default) or a prefill.

        kv_tokens: tokens of KV cache each unit must hold (micro-batch x longest request), in
        sequences of row_tokens (the longest request); memory
        is checked with it, so a plan fits the job's longest request, not only the average.

        Each unit was timed alone from a cold start, so its time includes the cold start of a step
        (`decode_step_s` / `prefill_step_s` of its device, when measured), which a stage pays once
        whatever its units: the costs take it out of every unit and charge it per stage.
        """
        key = {"decode": "decode_s", "prefill": "prefill_s"}[phase]
        step = [float(d.get(f"{phase}_step_s", 0.0)) for d in self.devices]
        tokens = self.shapes["micro_batch_size"] * (1 if phase == "decode" else self.shapes["prompt_tokens"])
        m = len(self.devices)

        def sent(j: int) -> list[float]:
            out = [b * tokens for b in self.out_bytes_per_token(j)]
            out[-1] = 8 * self.shapes["micro_batch_size"]  # the head returns one token id per row
            return out

        # (N,) when every device sends in the model's dtype, else (N, M)
        own = any("out_bytes_per_token" in d for d in self.devices)
        out = [list(row) for row in zip(*(sent(j) for j in range(m)))] if own else sent(0)
        bw = [[math.inf if (k == j or self.bandwidth[k][j] is None) else self.bandwidth[k][j] for j in range(m)]
              for k in range(m)]
        # a unit its device cannot hold was not timed (None): its bytes keep it off that device
        return Costs(compute=[[max(0.0, d[key][i] - step[j]) if d[key][i] is not None else 0.0
                               for j, d in enumerate(self.devices)] for i in range(self.num_units)],
                     unit_bytes=self.unit_bytes(kv_tokens, row_tokens), device_memory=[d.get("memory") for d in self.devices],
                     out_bytes=out, bandwidth=bw, latency=self.latency, device_names=self.device_names, stage_s=step)

    @property
    def file_name(self) -> str:
        """Where `run` looks for a saved profile of this model, cluster and shapes."""
        return _file_name(self.model["fingerprint"], self.cluster, self.shapes)

    def matches(self, model_fp: str, cluster_fp: str, shapes: dict) -> bool:
        return self.model.get("fingerprint") == model_fp and self.cluster == cluster_fp and self.shapes == shapes

    def check_for(self, model_name: str, model_fp: str, cluster_fp: str, devices: list[dict],
                  cluster_source: str = "this cluster") -> None:
        """Refuse a profile made for another model or another cluster, naming both content hashes.

        Its times would plan shards for units or devices that are not the ones running; shapes may
        differ (a profile at other shapes is still this model on these devices).
        """
        if self.model.get("fingerprint") != model_fp:
            raise ProfileError(f"{self.source}: profile is for model {self.model.get('name')!r} "
                               f"({self.model.get('fingerprint')}), not {model_name} ({model_fp})")
        if self.cluster != cluster_fp:
            raise ProfileError(f"{self.source}: profile is for cluster {self.cluster or '(none)'}, not "
                               f"{cluster_source} ({cluster_fp}){_device_difference(self.devices, devices)}; "
                               "profile this cluster, or leave out --profile")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("source")
        return {"format": FORMAT, **d}

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        os.replace(tmp, path)  # a reader never sees half a profile
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Profile":
        path = Path(path)
        if not path.is_file():
            raise ProfileError(f"{path}: profile not found")
        d = read_object(path, ProfileError, "an edgeshard profile (a JSON object)")
        if d.pop("format", None) != FORMAT:
            raise ProfileError(f"{path}: not an edgeshard profile (no format {FORMAT!r})")
        try:
            return cls(**d, source=str(path))
        except ProfileError:
            raise
        except (TypeError, KeyError, AttributeError, ValueError) as e:  # a field of the wrong shape
            raise ProfileError(f"{path}: not a valid profile ({type(e).__name__}: {e})") from None


_TIMES = ("prefill_s", "decode_s", "prefill_step_s", "decode_step_s", "decode_kv_s", "decode_one_s",
          "decode_one_step_s", "prefill_kv_s", "decode_rows_s")
# a profile's own device fields: its times, each unit's spread (spread_of), the memory the measuring
# took beyond what the rank held before (a high-water mark: 0 if it stayed below one), and the
# rank's peak RSS, and the forms its products took (fewrows.forms), which a run on it takes too
_MEASURED = _TIMES + ("prefill_spread", "decode_spread", "peak_bytes", "peak_rss", "products")
# per unit, of a device that holds its units in its own dtype or quantization
_OWN_BYTES = ("param_bytes", "kv_bytes_per_token", "out_bytes_per_token")


def compare(old: Profile, new: Profile) -> list[tuple[str, float | None, float | None]]:
    """What moved between two profiles of one cluster: (what, old, new) for each device's total
    decode and prefill time (seconds, units that fit) and each link's latency (s) and bandwidth
    (bytes/s), devices matched by rank."""
    if len(old.devices) != len(new.devices):
        raise ProfileError(f"{new.source}: {len(new.devices)} devices, {old.source}: {len(old.devices)}; "
                           f"compare profiles of one cluster")
    rows = []
    for j, (a, b) in enumerate(zip(old.devices, new.devices)):
        name = a["name"] if a["name"] == b["name"] else f"{a['name']} -> {b['name']}"
        for phase in ("decode", "prefill"):
            rows.append((f"rank {j} {name} {phase}", old.total_s(j, phase), new.total_s(j, phase)))
    for k in range(len(old.devices)):
        for j in range(k + 1, len(old.devices)):
            link = f"link {old.devices[k]['name']} - {old.devices[j]['name']}"
            rows.append((f"{link} latency", old.latency[k][j], new.latency[k][j]))
            rows.append((f"{link} bandwidth", old.bandwidth[k][j], new.bandwidth[k][j]))  # None: unlimited
    return rows


def _device_difference(profiled: list[dict], running: list[dict]) -> str:
    """The first way the profiled devices differ from the running ones, for the error message."""
    if len(profiled) != len(running):
        return f": {len(profiled)} devices profiled, {len(running)} running"
    for rank, (a, b) in enumerate(zip(profiled, running)):
        for key in sorted(set(a) | set(b)):
            if key not in _MEASURED + _OWN_BYTES and a.get(key) != b.get(key):
                return f": rank {rank} {key} was {_shown(a.get(key))}, is {_shown(b.get(key))}"
    return ""


def _shown(value) -> str:
    return "not set" if value is None else repr(value)  # a field left out of the device's dict


def device_bytes(spec, own) -> dict:
    """A device's own unit bytes for its profile entry: {} when it holds the model as `spec` counts
    it, else its param_bytes, kv_bytes_per_token and out_bytes_per_token per unit (`own`: the spec in
    its dtype)."""
    if own is spec:
        return {}
    return {key: [getattr(u, key) for u in own.units] for key in _OWN_BYTES}


def find_profile(model_fp: str, cluster_fp: str, shapes: dict, folder: Path | None = None,
                 devices: list[dict] | None = None) -> Profile | None:
    """A saved profile for this model, cluster and shapes, if there is one.

    Else, given the running `devices` (Device.to_dict(), in rank order): the newest saved profile of
    this model at these shapes that measured every one of them as declared now, cut to them
    (Profile.subset). That is the profile of a cluster that lost devices: each unit's time on a
    device and each link between two devices do not change when another device leaves."""
    folder = folder or profiles_dir()
    path = folder / _file_name(model_fp, cluster_fp, shapes)
    if path.is_file():
        prof = Profile.load(path)
        if prof.matches(model_fp, cluster_fp, shapes):
            return prof
    if not devices:
        return None
    names = [d["name"] for d in devices]
    tail = _file_name(model_fp, "*", shapes)
    for other in sorted(folder.glob(tail), key=lambda p: p.stat().st_mtime, reverse=True):
        try:
            prof = Profile.load(other)
        except ProfileError:
            continue  # a damaged or foreign file in the folder is not this run's problem
        held = {d["name"]: _declared(d) for d in prof.devices}
        if (prof.model.get("fingerprint") == model_fp and prof.shapes == shapes
                and all(held.get(d["name"]) == d for d in devices)):
            sub = prof.subset(names)
            if sub.cluster == cluster_fp:
                return sub
    return None


def _declared(device: dict) -> dict:
    """A profile's device entry without what was measured: the Device.to_dict() it was made for."""
    return {k: v for k, v in device.items() if k not in _MEASURED + _OWN_BYTES}


def _file_name(model_fp: str, cluster_fp: str, shapes: dict) -> str:
    load = "-together" if shapes.get("load") == "together" else ""
    return (f"{model_fp[:8]}-{cluster_fp[:8]}-b{shapes['micro_batch_size']}-p{shapes['prompt_tokens']}"
            f"-c{shapes['context']}{load}.json")


# -- measuring (under mpiexec) -----------------------------------------------------------------
def _cache_bytes() -> int:
    """The last-level cache of this host's CPU (Linux sysfs), 64 MiB when it cannot be read."""
    from .cluster import parse_bytes

    sizes = []
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        try:
            sizes.append(parse_bytes(f.read_text().strip().replace("K", "KiB").replace("M", "MiB")))
        except (OSError, ValueError):
            pass
    return max(sizes, default=64 * 2**20)


class _Evictor:
    """Writes a buffer twice the last-level cache, so the next timed step finds no weights in cache.

    In a run a stage's units (tens of MB and more) stream from memory at every step, and between
    steps the rank waits while others run; a unit timed over and over would stay in cache and time
    out too fast (on a 2-core host with 32 MiB of L3, smollm2's decode blocks 1.8-2x too fast).
    """

    def __init__(self, most: int | None = None):
        """most: bytes it may take at most (what the device's budget leaves beside the unit timed)."""
        import torch

        self.buf = torch.zeros(min(2 * _cache_bytes(), most if most is not None else math.inf) // 4)

    def __call__(self) -> None:
        self.buf.add_(1.0)


SPREAD_BOUND = 0.1  # a figure's spread the profiler repeats for, up to SPREAD_REPEATS x the repeats
SPREAD_REPEATS = 2
STEP_ROUNDS = 4  # x the repeats: alternations of one block and several for a decode step's own cost


def spread_of(times: list[float]) -> float:
    """How far repeats of one measurement scatter: their interquartile range over their median (0
    for fewer than 2 repeats)."""
    if len(times) < 2:
        return 0.0
    q1, _, q3 = statistics.quantiles(times, n=4, method="inclusive")
    return (q3 - q1) / statistics.median(times)


def _timed(fn, repeats: int, slowdown: float = 1.0, before=None) -> tuple[float, float]:
    """Time of fn(), and its spread (spread_of): on a real device the median wall time of the repeats;
    on an emulated one, slowdown x its least CPU time, which is what the device's shard stretches
    each forward to in a run. before() runs untimed ahead of each repeat. While the spread is over
    SPREAD_BOUND, it repeats, up to SPREAD_REPEATS x `repeats` in all; the spread then says how far it
    got.

    The least, not the median, on an emulated device: its CPU time swells with whatever else the
    shared host runs at that moment (2-4x for a few ms on a 2-core VM while another rank is up),
    which the machine it stands for would not see. The least of the repeats is its own cost."""
    emulated = slowdown != 1.0
    clock = time.thread_time if emulated else time.perf_counter
    times = []
    while len(times) < repeats or (spread_of(times) > SPREAD_BOUND and len(times) < SPREAD_REPEATS * repeats):
        if before is not None:
            before()
        t0 = clock()
        fn()
        times.append(clock() - t0)
    return (min(times) if emulated else statistics.median(times)) * slowdown, spread_of(times)


def _measure_units(spec, device, shapes: dict, repeats: int, turn=lambda fn: fn()) -> dict:
    """Each unit alone on this rank's device: prefill and decode step time (see _timed),
    and the step cost a stage pays once however many units it holds.

    `turn(fn)` runs each measurement when it is this rank's turn (see measure_profile).

    Returns {"prefill_s": [per unit], "decode_s": [per unit], "prefill_step_s": s, "decode_step_s": s,
    "decode_kv_s": s per byte, "prefill_kv_s": s per token per byte}, each unit's spreads and, at more
    than one row, "decode_one_s": [per unit], each unit's decode step of one row (a step of fewer rows
    costs its line from there), and "decode_one_step_s", the step cost at one row; at more than two,
    "decode_rows_s": [per row count 1..b], the blocks' decode step at each (the line's shape).
    Every unit is timed from a cold start (see _Evictor), so each unit's time holds the cold start of
    a step; a stage of several units pays it once. k blocks against one, timed in alternation, give
    it, for a prefill and for a decode step (step_cost). The same blocks' decode step at four times
    the context gives what a step pays for each byte of KV cache it reads (a row's columns grow as it
    decodes, and row admission lets a slot's axis reach past its longest request): (time there -
    time at the context) / the bytes it read more (Profile.context_costs). Their prefill
    at four times the prompt gives what a prefill's token pays per KV byte of its row's width: (a
    token's time there - a token's time at the prompt) / the width's KV bytes more.

    A slowed-down device is measured at full speed, by CPU time on one thread, and its times
    multiplied by its slowdown: what its shard stretches them to in a run (on one thread:
    cluster.default_threads).
    Sleeping between timed repeats would instead let the caches go cold and time something else.
    """
    import torch

    from .shard import Shard

    # within the device's budget, as a run: one unit at a time (four blocks, and the first of them
    # alone, for the step cost), none the budget cannot hold, and the cache-clearing buffer in what
    # the largest of those leaves
    fits = [device.memory is None or spec.bytes_of(u, u) <= device.memory for u in range(spec.num_units)]
    first, last = 1, min(4, spec.num_units - 2)  # up to four blocks (neither embedding nor head)
    pair = lambda: spec.bytes_of(first, last) + spec.bytes_of(first, first)
    while last > first and device.memory is not None and pair() > device.memory:
        last -= 1
    held = max([spec.bytes_of(u, u) for u in range(spec.num_units) if fits[u]] + [pair()])
    evict = None
    if torch.device(device.torch).type == "cpu":  # GPU memory has no such cache
        evict = _Evictor(None if device.memory is None else max(0, device.memory - held))
    b, p, c = shapes["micro_batch_size"], shapes["prompt_tokens"], shapes["context"]
    hidden = int(spec.config["hidden_size"])
    vocab = int(spec.config["vocab_size"])
    gen = torch.Generator().manual_seed(0)
    prefill, decode, decode_one = [], [], []

    def measure(first: int, last: int, long: int = 0, long_prompt: int = 0) -> tuple:
        """(prefill, decode at the context[, decode at `long` columns[, prefill of `long_prompt` tokens a
        row]]), each (time, spread)."""
        shard = Shard(spec, first, last, device.torch, rows=b)  # the products in the run's form
        u = first

        def inputs(t):
            if u == 0:
                return torch.randint(vocab, (b, t), generator=gen)
            return torch.randn(b, t, hidden, generator=gen).to(shard.dtype)

        def run(x, pads):
            shard.forward(0, x, pads)
            shard.sync()  # on a GPU, time the kernels, not their launch

        x_p, x_c, x_d = inputs(p), inputs(c), inputs(1)
        run(x_p, [0] * b)  # warm-up
        t_prefill = _timed(lambda: run(x_p, [0] * b), repeats, device.slowdown, evict)
        run(x_c, [0] * b)  # a cache holding `context` tokens, then single-token steps
        t_decode = _timed(lambda: run(x_d, None), repeats, device.slowdown, evict)
        if not long:
            return t_prefill, t_decode
        run(inputs(long), [0] * b)
        t_long = _timed(lambda: run(x_d, None), repeats, device.slowdown, evict)
        if not long_prompt:
            return t_prefill, t_decode, t_long
        x_l = inputs(long_prompt)
        run(x_l, [0] * b)  # warm-up: a longer prompt's buffers
        return t_prefill, t_decode, t_long, _timed(lambda: run(x_l, [0] * b), repeats, device.slowdown, evict)

    def one_row(u: int) -> float:
        """Unit u's decode step of one row at the context."""
        shard = Shard(spec, u, u, device.torch, rows=b)
        x_c = torch.randint(vocab, (1, c), generator=gen) if u == 0 else \
            torch.randn(1, c, hidden, generator=gen).to(shard.dtype)
        x_d = x_c[:, :1]

        def run(x, pads):
            shard.forward(0, x, pads)
            shard.sync()

        run(x_c, [0])
        return _timed(lambda: run(x_d, None), repeats, device.slowdown, evict)[0]

    def step_cost(rows: int, width: int = 1) -> float:
        """What a step of `rows` rows costs a stage once, however many units it holds: a decode at the
        context, or with `width` > 1 a prefill of that many tokens a row. Blocks first..last together
        against block `first` alone, timed in alternation so that the host's drift falls on both
        alike. A model's decoder blocks have the same shapes, so k of them cost k times one, plus the
        stage's step once. Timed apart, as the units are, the difference came out anywhere from 0 to
        1 ms on a 2-core VM, and a one-rank stage of smollm2 pays it 31 times: a third of its decode
        step either way, and all of a short prompt's prefill (a profile's prefill line then fell below
        its decode)."""
        both = (Shard(spec, first, first, device.torch, rows=b), Shard(spec, first, last, device.torch, rows=b))
        x_c = torch.randn(rows, c, hidden, generator=gen).to(both[0].dtype)
        for shard in both:
            shard.forward(0, x_c, [0] * rows)
        times: tuple[list, list] = ([], [])
        x, pads = (x_c[:, :1], None) if width == 1 else (torch.randn(rows, width, hidden, generator=gen).to(
            both[0].dtype), [0] * rows)

        def run(shard):
            shard.forward(0, x, pads)  # a prefill (pads) starts the slot's rows over, as each repeat of measure's
            shard.sync()

        # a prefill's blocks are long against its step, and its spread small beside them: fewer rounds
        for _ in range(STEP_ROUNDS * repeats if width == 1 else repeats):
            for shard, t in zip(both, times):
                t.append(_timed(lambda: run(shard), 1, device.slowdown, evict)[0])
        pick = min if device.slowdown != 1.0 else statistics.median  # as _timed's repeats
        one, together = pick(times[0]), pick(times[1])
        k = last - first + 1
        return max(0.0, (k * one - together) / (k - 1))

    def row_curve() -> list[float]:
        """Blocks first..last's decode step at each row count 1..b, at the context: how a decode's
        cost runs from one row to the micro-batch (Profile.row_shape). Not a straight line: its
        products take the form fewrows chose for each count, and at one thread on a 2-core AMD EPYC
        a step of 2-3 rows cost 1.1-1.4x the line from one row to 4 (3 rows more than 4)."""
        shard = Shard(spec, first, last, device.torch, rows=b)
        times = []
        for r in range(1, b + 1):
            x_c = torch.randn(r, c, hidden, generator=gen).to(shard.dtype)
            shard.release(0)
            shard.forward(0, x_c, [0] * r)

            def run(x=x_c[:, :1]):
                shard.forward(0, x, None)
                shard.sync()

            times.append(_timed(run, repeats, device.slowdown, evict)[0])
        return times

    spreads = {"prefill_spread": [], "decode_spread": []}
    for u in range(spec.num_units):
        if not fits[u]:  # recorded as not fitting (None), not loaded; the planner keeps it off this device
            turn(lambda: None)
            (t_prefill, s_prefill), (t_decode, s_decode) = (None, 0.0), (None, 0.0)
        else:
            (t_prefill, s_prefill), (t_decode, s_decode) = turn(lambda: measure(u, u))
        prefill.append(t_prefill)
        decode.append(t_decode)
        if b > 1:  # a step of fewer rows: the simulator's decode line runs from here to b rows
            # every rank takes every turn, a unit it cannot hold included: turns are barriers
            decode_one.append(turn(lambda: one_row(u) if fits[u] else None))
        spreads["prefill_spread"].append(s_prefill)
        spreads["decode_spread"].append(s_decode)
    out = {"prefill_s": prefill, "decode_s": decode, "prefill_step_s": 0.0, "decode_step_s": 0.0,
           "decode_kv_s": 0.0, **spreads, **({"decode_one_s": decode_one} if b > 1 else {})}
    if last > first and all(fits[first:last + 1]):
        # the blocks' decode again at `long` columns: what a step pays per byte of KV it reads
        long = min(4 * c, int(spec.config.get("max_position_embeddings") or 4 * c))
        kv_bytes = sum(u.kv_bytes_per_token * (min(long, u.kv_window or long) - min(c, u.kv_window or c))
                       for u in spec.units[first:last + 1])
        # and their prefill at four times the prompt: what each token pays per column of its row's width
        long_p = min(4 * p, int(spec.config.get("max_position_embeddings") or 4 * p))
        width_bytes = sum(u.kv_bytes_per_token * (min(long_p, u.kv_window or long_p) - min(p, u.kv_window or p))
                          for u in spec.units[first:last + 1])
        wide = kv_bytes > 0 and width_bytes > 0 and p > 1
        together = [t for t, _ in turn(lambda: measure(first, last, long if kv_bytes > 0 else 0,
                                                       long_p if wide else 0))]
        out["decode_step_s"] = turn(lambda: step_cost(b))
        # a prompt of one token is a decode's width: its step is the decode's
        out["prefill_step_s"] = turn(lambda: step_cost(b, p)) if p > 1 else out["decode_step_s"]
        if b > 1:
            out["decode_one_step_s"] = turn(lambda: step_cost(1))
        if b > 2:
            out["decode_rows_s"] = turn(row_curve)
        if kv_bytes > 0:
            out["decode_kv_s"] = max(0.0, (together[2] - together[1]) / (b * kv_bytes))
        if wide:  # a token's cost at the long prompt over its cost at the profile's
            per_token = together[3] / (b * long_p) - together[0] / (b * p)
            out["prefill_kv_s"] = max(0.0, per_token / width_bytes)
    else:
        for _ in range(2 + (p > 1) + (b > 1) + (b > 2)):
            turn(lambda: None)  # the others' turns at their blocks together, their step costs and row curve
    return out


def _ping_pong(comm, peer: int, initiator: bool, repeats: int) -> tuple[float, float] | None:
    """One-way time at growing sizes to `peer`; the initiator returns (latency s, bytes/s)."""
    import torch

    from .comm import ACT

    sizes = [256]
    results = {}
    size = 256
    while True:
        x = torch.zeros(size // 4, dtype=torch.float32)
        times = []
        for _ in range(repeats):
            if initiator:
                t0 = time.perf_counter()
                comm.send(peer, ACT, buffers=[x])
                comm.recv(peer)
                times.append((time.perf_counter() - t0) / 2)
            else:
                comm.recv(peer)
                comm.send(peer, ACT, buffers=[x])
        # the initiator decides whether to grow; it tells the peer with a one-element message
        if initiator:
            results[size] = statistics.median(times)
            # grow until the transfer itself (time beyond the smallest message's) is well above the
            # polling jitter, whatever the latency: then (large - small) / time gives the bandwidth
            grow = size < 16 * 2**20 and (len(results) < 2 or results[size] - results[256] < 0.01)
            comm.send(peer, ACT, fields=[int(grow)])
        else:
            grow = bool(comm.recv(peer).fields[0])
        if not grow:
            break
        size *= 16
        sizes.append(size)
    if not initiator:
        return None
    small, large = sizes[0], sizes[-1]
    dt = results[large] - results[small]
    bandwidth = (large - small) / dt if dt > 0 else math.inf
    latency = max(0.0, results[small] - small / bandwidth)
    return latency, bandwidth


def _machine(boots: list[str] | None, g: dict) -> str:
    """The machine (boot id) of the rank that measured `g`: devices emulated on different machines time
    different CPUs, and are compared only with their own machine's."""
    return boots[g["rank"]] if boots else ""


def _one_host_disagreement(gathered: list[dict], devices: list, spec,
                           boots: list[str] | None = None) -> None:
    """Devices emulated on one host by CPU time (slowdown > 1, clock=cpu) all time one CPU: each unit's
    time per unit of slowdown should be the same on every one of them on one machine (`boots`, by rank;
    None: one machine) and of one dtype and quantization. How far a device's is from the group's
    median is noise of that emulation (the host ran faster or slower during its turn), which repeats
    taken moments apart cannot see, and it is the noise that hands another plan the lead between two
    profiles (one device measured as fast as a faster one). Each unit's spread becomes the larger of
    the two, so that `edgeshard plan`'s confidence (confidence.py) weighs it."""
    groups: dict[tuple, list[dict]] = {}
    for g in gathered:
        d = devices[g["rank"]]
        if d.clock == "cpu" and d.slowdown != 1.0:
            groups.setdefault((_machine(boots, g), d.precision(spec.dtype, spec.quantize)), []).append(g)
    for group in groups.values():
        if len(group) < 2:
            continue
        slow = {g["rank"]: devices[g["rank"]].slowdown for g in group}
        for phase in ("decode", "prefill"):
            key = f"{phase}_s"
            for u in range(len(group[0][key])):
                per = {g["rank"]: g[key][u] / slow[g["rank"]] for g in group if g[key][u] is not None}
                if len(per) < 2:
                    continue
                mid = statistics.median(per.values())
                for g in group:
                    if g["rank"] in per and mid > 0:
                        g[f"{phase}_spread"][u] = max(g[f"{phase}_spread"][u], abs(per[g["rank"]] / mid - 1))


def _one_host_calibration(gathered: list[dict], devices: list, spec, boots: list[str] | None = None) -> None:
    """Devices that time their work (clock=work) take one calibration of their host between them: each
    unit's least time per unit of slowdown over all of them on one machine (`boots`, by rank; None: one
    machine) and of one dtype and quantization, times its own slowdown. Their speeds then stand to each
    other exactly as the hostfile declares, and the noise of timing each device apart (tens of percent
    on a shared host, enough to flip a plan) is gone; what is left is the host's own cost of each unit
    at its quietest."""
    groups: dict[tuple, list[dict]] = {}
    for g in gathered:
        d = devices[g["rank"]]
        if d.clock == "work":
            groups.setdefault((_machine(boots, g), d.precision(spec.dtype, spec.quantize)), []).append(g)
    for group in groups.values():
        slow = {g["rank"]: devices[g["rank"]].slowdown for g in group}
        for key in _TIMES:  # not the spreads: a share of each figure, whatever its slowdown
            if key not in group[0]:  # decode_one_s, measured only at more than one row
                continue
            if isinstance(group[0][key], list):
                base = [min((g[key][u] / slow[g["rank"]] for g in group if g[key][u] is not None), default=None)
                        for u in range(len(group[0][key]))]
                for g in group:
                    g[key] = [None if t is None or b is None else b * slow[g["rank"]] for t, b in zip(g[key], base)]
            else:
                base = min(g[key] / slow[g["rank"]] for g in group)
                for g in group:
                    g[key] = base * slow[g["rank"]]
        for g in group:  # a run on these devices takes exactly what their figures say
            g["prefill_spread"] = g["decode_spread"] = [0.0] * len(g["decode_s"])


def machine_turns(boots: list[str]) -> list[int]:
    """Each rank's turn at timing, from every rank's machine (its boot id, `cluster.boot_id`): the ranks
    of one machine take turns 0, 1, 2, ... in rank order, whatever their hosts are called (network
    namespaces or containers on one machine share its cores and its boot id); each machine's first rank
    takes turn 0. An unknown boot id ("", not Linux) is one machine: its ranks take turns, as they would
    have to if they shared one."""
    seen: dict[str, int] = {}
    turns = []
    for b in boots:
        turns.append(seen.get(b, 0))
        seen[b] = turns[-1] + 1
    return turns


def link_rounds(boots: list[str]) -> list[list[tuple[int, int]]]:
    """Every pair of ranks (a, b), a < b, in rounds whose pairs are timed at once: no machine (boot id, as
    `machine_turns`) is in two pairs of a round, so no two ping-pongs share a machine's cores, memory or
    network card. The pairs come in the order of a round-robin tournament (`_round_robin`), each put in
    the first round its machines are free in: n machines of one rank each take n - 1 rounds (n even) or
    n (odd), instead of n(n-1)/2; on one machine each round holds one pair, as when they went one by one."""
    rounds: list[list[tuple[int, int]]] = []
    busy: list[set[str]] = []  # the machines each round's pairs hold
    for a, b in _round_robin(len(boots)):
        both = {boots[a], boots[b]}
        i = next((i for i, held in enumerate(busy) if not held & both), len(rounds))
        if i == len(rounds):
            rounds.append([])
            busy.append(set())
        rounds[i].append((a, b))
        busy[i] |= both
    return rounds


def _round_robin(n: int):
    """The pairs of 0..n-1, round by round of the circle method: 0 stays, the others turn one place a round
    (an odd n gets a stand-in that pairs with no one)."""
    ids = list(range(n)) + ([None] if n % 2 else [])
    m = len(ids)
    for _ in range(m - 1):
        for i in range(m // 2):
            a, b = ids[i], ids[m - 1 - i]
            if a is not None and b is not None:
                yield min(a, b), max(a, b)
        ids = [ids[0], ids[-1], *ids[1:-1]]


def _turn_taker(comm, together: bool):
    """The turn(fn) that `_measure_units` times each unit in: collective, every rank calls it alike."""
    turns = machine_turns(comm.boots)
    mine, count = turns[comm.rank], max(turns) + 1

    def turn(fn):
        """Run fn on each machine's ranks in turn (`machine_turns`). Ranks on one machine must not share
        cores while timed, and taking turns unit by unit (not rank by rank) times every device's unit u
        within moments of the others': this VM's speed drifts by tens of percent over a minute, and the
        planner needs the devices' relative speeds right above all. Ranks on different machines share
        nothing, so they time unit u at the same moment: a cluster of one rank a machine profiles in the
        time of one device, not of all of them one after the other.

        With shapes' load "together", every rank measures unit u at once instead: the load a run
        puts on ranks that share a host (their CPU time swells while the others compute)."""
        if together:
            comm.barrier()
            out = fn()
            comm.barrier()
            return out
        out = None
        for t in range(count):
            if t == mine:
                out = fn()
            comm.barrier()
        return out

    return turn


def measure_profile(comm, spec, devices: list, shapes: dict, *, repeats: int = 5, notes: str = "") -> Profile | None:
    """Collective: every rank measures its units, every pair its link; rank 0 returns the Profile.

    Each rank measures and reports its units in its device's own dtype and quantization."""
    me = devices[comm.rank]
    own = spec.with_precision(*me.precision(spec.dtype, spec.quantize))
    turn = _turn_taker(comm, together=shapes.get("load") == "together")

    import torch

    from .attention import form
    from .fewrows import forms
    from .shard import TORCH_DTYPES

    # the products' form is measured before the memory baseline: its probe matrix is freed before
    # any unit loads, and a device's budget is for its units
    where, dtype, rows = torch.device(me.torch), TORCH_DTYPES[own.dtype], shapes["micro_batch_size"]
    products = {**forms(own, where, dtype, rows), "attention": form(own, where, dtype, rows=rows)}
    reset_peak_rss()  # an earlier job of this launch may have peaked higher
    try:
        held = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: the peak since the process began
        held = 0
    measured = _measure_units(own, me, shapes, repeats, turn)
    peak = peak_rss()
    measured["peak_bytes"], measured["peak_rss"] = max(0, peak - held), peak
    measured["products"] = products
    links = {}
    for pairs in link_rounds(comm.boots):
        for a, b in pairs:
            if comm.rank in (a, b):
                res = _ping_pong(comm, b if comm.rank == a else a, comm.rank == a, repeats)
                if res is not None:
                    links[(a, b)] = res
        comm.barrier()
    gathered = comm.gather({"rank": comm.rank, **measured, "links": links, "bytes": device_bytes(spec, own)})
    if comm.rank != 0:
        return None
    gathered = sorted(gathered, key=lambda g: g["rank"])
    _one_host_calibration(gathered, devices, spec, comm.boots)
    _one_host_disagreement(gathered, devices, spec, comm.boots)
    m = comm.size
    bandwidth = [[None] * m for _ in range(m)]
    latency = [[0.0] * m for _ in range(m)]
    dev_dicts = []
    for g in gathered:
        dev_dicts.append({**devices[g["rank"]].to_dict(),
                          **{k: g[k] for k in _MEASURED if k in g}, **g["bytes"]})
        for (a, b), (lat, bw) in g["links"].items():
            for k, j in ((a, b), (b, a)):  # ping-pong measures both directions together
                latency[k][j] = lat
                bandwidth[k][j] = bw if math.isfinite(bw) else None
    from .comm import versions

    return Profile(
        model={"name": spec.name, "fingerprint": model_fingerprint(spec), "dtype": spec.dtype,
               **({"quantize": spec.quantize} if spec.quantize else {}), "num_units": spec.num_units},
        units=[{"name": u.name, "param_bytes": u.param_bytes, "kv_bytes_per_token": u.kv_bytes_per_token,
                "out_bytes_per_token": u.out_bytes_per_token,
                **({"kv_window": u.kv_window} if u.kv_window is not None else {})} for u in spec.units],
        devices=dev_dicts, bandwidth=bandwidth, latency=latency, shapes=shapes,
        cluster=cluster_fingerprint([d.to_dict() for d in devices]), versions=versions(),
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"), notes=notes)
