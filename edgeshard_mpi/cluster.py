"""Hostfiles, devices and clusters.

A hostfile is an MPICH hostfile that `mpiexec -f` reads unchanged: `host:slots` lines. MPICH
accepts whole-line `#` comments but rejects trailing ones, so each slot's device is declared in a
comment line of its own just above its host line:

    # device: name=orin-nx memory=8GiB
    10.0.0.5:1
    # device: name=cloud memory=24GiB torch=cuda:0
    10.0.0.9:1

`threads=8` sets the rank's intra-op threads; by default a rank takes its host's cores shared
among the ranks on that host (an emulated device: one).

`dtype=bfloat16` and `quantize=int8` (or `quantize=none`) hold this device's shard in its own dtype
and weight quantization instead of the job's: a GPU in float16 beside CPUs in bfloat16. A stage
receives activations in its sender's dtype and casts them to its own.

Ranks fill the slots in order (rank 0 takes the first slot). A host line with several slots takes
either one declaration (shared by all its slots) or one per slot. A slot with no declaration is a
plain local device named after its host.

Heterogeneity can be emulated on one machine, visibly and without burning CPU:
    # device: name=slow-board memory=2GiB slowdown=3.5 link=50Mbit latency=2ms
`slowdown=3.5` stretches each forward to 3.5x the CPU time of its compute (on one thread) by
sleeping afterwards; with `clock=work` as well, to 3.5x what that work cost this host when the profile
measured it (simulate.StageLine: a fixed function of the tokens it computes), whatever else the host
runs at that moment;
`link=50Mbit latency=2ms` is the device's network attachment: a message from device a to device b
arrives no earlier than latency_a + latency_b + bytes / min(bw_a, bw_b) after it was sent.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

__all__ = ["Device", "Cluster", "HostfileError", "parse_bytes", "parse_hostfile", "format_bytes", "default_threads",
           "boot_id", "DTYPES", "QUANTIZE"]

_UNITS = {
    "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_BYTES_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z/]*)\s*$")
# link speeds: bits (Mbit, Mbps) or bytes (MB/s, MiB/s) per second -> bytes per second
_RATE_UNITS = {
    "bit": 1 / 8, "kbit": 1e3 / 8, "mbit": 1e6 / 8, "gbit": 1e9 / 8,
    "bps": 1 / 8, "kbps": 1e3 / 8, "mbps": 1e6 / 8, "gbps": 1e9 / 8,
    "b/s": 1, "kb/s": 1e3, "mb/s": 1e6, "gb/s": 1e9, "kib/s": 2**10, "mib/s": 2**20, "gib/s": 2**30,
}
_TIME_UNITS = {"s": 1.0, "ms": 1e-3, "us": 1e-6}
_TORCH_RE = re.compile(r"cpu|cuda(:[0-9]+)?|mps")  # used with fullmatch: "$" would accept a trailing newline
_SLOTS_RE = re.compile(r"[0-9]+")  # ASCII digits only: str.isdigit() also accepts "²", which int() rejects
# More slots than any pipeline of an LLM's units could use; the limit keeps a typo like `host:99999999`
# from building millions of devices before the rank count is checked.
MAX_SLOTS = 65536
_BOM = "\ufeff"
# What a device may declare of its own (models.DTYPE_BYTES and models.QUANTIZE hold the same choices;
# this module imports no torch). quantize=none keeps full-precision weights when the job quantizes.
DTYPES = ("float32", "bfloat16", "float16")
QUANTIZE = ("int8", "none")
CLOCKS = ("cpu", "work")  # an emulated device's compute time: its CPU time x slowdown, or its work's (simulate.StageLine)


class HostfileError(ValueError):
    """A hostfile that cannot be used; the message names the file, line and field."""


def _short(text: str, limit: int = 40) -> str:
    """repr of a field value, cut so that an error stays one readable line."""
    return repr(text) if len(text) <= limit else repr(text[:limit]) + "..."


def parse_bytes(text: str) -> int:
    """'8GiB' -> 8589934592, '8GB' -> 8000000000, '512MiB', '1024' (bytes)."""
    m = _BYTES_RE.match(text)
    if not m or (m.group(2).lower() or "b") not in _UNITS:
        raise ValueError(f"{_short(text)} is not a size (use e.g. 512MiB, 8GiB, 8GB)")
    value = float(m.group(1)) * _UNITS[m.group(2).lower() or "b"]
    if not math.isfinite(value):  # "9" * 400 parses to inf, which int() cannot hold
        raise ValueError(f"{_short(text)} is too large a size")
    return int(value)


def _number_with_unit(text: str, units: dict, what: str, example: str) -> float:
    m = _BYTES_RE.match(text)
    if not m or m.group(2).lower() not in units:
        raise ValueError(f"{_short(text)} is not a {what} (use e.g. {example})")
    value = float(m.group(1)) * units[m.group(2).lower()]
    if not math.isfinite(value):
        raise ValueError(f"{_short(text)} is too large a {what}")
    return value


def parse_rate(text: str) -> float:
    """'50Mbit' or '50Mbps' -> 6250000.0 bytes/s; '10MB/s' -> 1e7; '1GiB/s'."""
    return _number_with_unit(text, _RATE_UNITS, "link speed", "50Mbit, 1Gbit, 10MB/s")


def parse_duration(text: str) -> float:
    """'2ms' -> 0.002 s; '500us'; '0.1s'."""
    return _number_with_unit(text, _TIME_UNITS, "duration", "2ms, 500us, 0.1s")


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


@dataclasses.dataclass(frozen=True)
class Device:
    """One slot of the cluster: the device a rank runs on."""

    name: str
    host: str = "localhost"
    memory: int | None = None  # usable bytes for weights + KV cache; None = not limited
    torch: str = "cpu"  # torch device string the rank computes on
    slowdown: float = 1.0  # emulation: compute stretched to this many times its measured time
    bandwidth: float | None = None  # emulation: bytes/s of the device's link; None = not shaped
    latency: float = 0.0  # emulation: seconds the device's link adds to every message
    threads: int | None = None  # intra-op threads; None = decided at start (see default_threads)
    dtype: str | None = None  # the dtype this device holds its shard in; None = the job's
    quantize: str | None = None  # "int8" or "none" for this device's weights; None = the job's
    clock: str = "cpu"  # emulation: "cpu" stretches a forward's CPU time, "work" times its work (CLOCKS)

    def __post_init__(self):
        if not self.name:
            raise ValueError("device name must not be empty")
        if self.memory is not None and self.memory <= 0:
            raise ValueError(f"device {self.name}: memory must be positive, got {self.memory}")
        if not isinstance(self.torch, str) or not _TORCH_RE.fullmatch(self.torch):
            raise ValueError(f"device {self.name}: torch={self.torch!r} is not cpu, cuda, cuda:N or mps")
        if not 1.0 <= self.slowdown < math.inf:  # an infinite slowdown would sleep forever
            raise ValueError(f"device {self.name}: slowdown must be a finite number >= 1 (a device cannot "
                             f"be made faster), got {self.slowdown}")
        if self.bandwidth is not None and not 0 < self.bandwidth < math.inf:
            raise ValueError(f"device {self.name}: link bandwidth must be positive and finite, got {self.bandwidth}")
        if not 0 <= self.latency < math.inf:
            raise ValueError(f"device {self.name}: latency must be finite and >= 0, got {self.latency}")
        if self.threads is not None:
            if not isinstance(self.threads, int) or isinstance(self.threads, bool) or self.threads < 1:
                raise ValueError(f"device {self.name}: threads must be a positive integer, got {self.threads!r}")
            if self.threads > 1 and self.slowdown != 1.0:
                raise ValueError(f"device {self.name}: an emulated device (slowdown={self.slowdown}) computes on one "
                                 f"thread, got threads={self.threads}")
        if self.clock not in CLOCKS:
            raise ValueError(f"device {self.name}: clock={self.clock!r} is not one of {', '.join(CLOCKS)}")
        if self.clock == "work" and self.slowdown == 1.0:
            raise ValueError(f"device {self.name}: clock=work times an emulated device's work; this one is not "
                             f"emulated (slowdown=1)")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"device {self.name}: dtype={self.dtype!r} is not one of {', '.join(DTYPES)}")
        if self.quantize is not None and self.quantize not in QUANTIZE:
            raise ValueError(f"device {self.name}: quantize={self.quantize!r} is not one of {', '.join(QUANTIZE)}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        # not decided yet, or not declared: left out, so the dict (and the fingerprint) of older files stays
        for key in ("threads", "dtype", "quantize"):
            if d[key] is None:
                del d[key]
        if d["clock"] == "cpu":
            del d["clock"]
        return d

    def precision(self, dtype: str, quantize: str | None) -> tuple[str, str | None]:
        """(dtype, quantize) this device holds its shard in: its own where declared, else the job's."""
        own = self.quantize if self.quantize is not None else quantize
        return self.dtype or dtype, None if own == "none" else own


def boot_id() -> str:
    """This machine's boot id (Linux; "" elsewhere): processes with the same one run on one machine,
    whatever their hosts are called (edge boards all named "raspberrypi")."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def default_threads(device: Device, cores: int, host_ranks: int) -> int:
    """Intra-op threads of a rank: the hostfile's threads=N, else its host's cores shared among the
    ranks placed on that host. torch alone would pick 1 under mpiexec (it reads MPI_LOCALNRANKS).

    An emulated device (slowdown > 1) keeps one thread: its compute time is slowdown x the CPU time
    of its compute, which one thread makes all the calling thread's own, and CPU time does not grow
    when ranks sharing a host compete for its cores (wall time does, and stretching wall time would
    multiply that contention by the slowdown)."""
    if device.threads is not None:
        return device.threads
    if device.slowdown != 1.0:
        return 1
    return max(1, cores // max(1, host_ranks))


@dataclasses.dataclass(frozen=True)
class Cluster:
    """The devices, in rank order, and where they were declared."""

    devices: tuple[Device, ...]
    source: str = "<default>"

    @property
    def size(self) -> int:
        return len(self.devices)

    def for_world(self, world_size: int) -> "Cluster":
        """The first `world_size` slots; more ranks than slots is an error, never a wrap-around."""
        if world_size > self.size:
            raise HostfileError(
                f"{self.source}: declares {self.size} slot(s) but {world_size} ranks were started "
                f"(mpiexec -n {world_size}); add slots or start at most {self.size} ranks"
            )
        return Cluster(self.devices[:world_size], self.source)

    @classmethod
    def local(cls, world_size: int) -> "Cluster":
        """No hostfile: every rank is a plain CPU device on this host."""
        return cls(tuple(Device(name=f"local{r}") for r in range(world_size)), "<no hostfile>")

    def with_threads(self, hosts: list[tuple[int, int]]) -> "Cluster":
        """Every device's thread count decided; hosts[rank] = (cores of its host, ranks on that host)."""
        return Cluster(tuple(dataclasses.replace(d, threads=default_threads(d, *h))
                             for d, h in zip(self.devices, hosts)), self.source)

    def to_dict(self) -> dict:
        return {"source": self.source, "devices": [d.to_dict() for d in self.devices]}

    @classmethod
    def from_dict(cls, d: dict) -> "Cluster":
        return cls(tuple(Device(**x) for x in d["devices"]), d.get("source", "<dict>"))


_DEVICE_FIELDS = {"name", "memory", "torch", "slowdown", "link", "latency", "threads", "dtype", "quantize", "clock"}


def _parse_declaration(text: str, where: str) -> dict:
    fields: dict = {}
    for item in text.split():
        key, eq, value = item.partition("=")
        if not eq or not key or not value:
            raise HostfileError(f"{where}: device field {_short(item)} is not key=value")
        if key not in _DEVICE_FIELDS:
            raise HostfileError(
                f"{where}: unknown device field {_short(key)} (known: {', '.join(sorted(_DEVICE_FIELDS))})")
        if key in fields:
            raise HostfileError(f"{where}: device field {key!r} given twice")
        if key == "memory":
            try:
                value = parse_bytes(value)
            except ValueError as e:
                raise HostfileError(f"{where}: field memory: {e}") from None
            if value <= 0:
                raise HostfileError(f"{where}: field memory must be positive")
        elif key == "torch" and not _TORCH_RE.fullmatch(value):
            raise HostfileError(f"{where}: field torch={_short(value)} is not cpu, cuda, cuda:N or mps")
        elif key == "dtype" and value not in DTYPES:
            raise HostfileError(f"{where}: field dtype={_short(value)} is not one of {', '.join(DTYPES)}")
        elif key == "quantize" and value not in QUANTIZE:
            raise HostfileError(f"{where}: field quantize={_short(value)} is not one of {', '.join(QUANTIZE)}")
        elif key == "clock" and value not in CLOCKS:
            raise HostfileError(f"{where}: field clock={_short(value)} is not one of {', '.join(CLOCKS)}")
        elif key == "threads":
            if not value.isdigit() or int(value) < 1:
                raise HostfileError(f"{where}: field threads={_short(value)} is not a positive integer")
            value = int(value)
        elif key in ("slowdown", "link", "latency"):
            try:
                value = {"slowdown": float, "link": parse_rate, "latency": parse_duration}[key](value)
            except ValueError as e:
                raise HostfileError(f"{where}: field {key}: {e}") from None
            if key == "link":
                key = "bandwidth"
        fields[key] = value
    if "name" not in fields:
        raise HostfileError(f"{where}: device declaration has no name= field")
    return fields


def _hostfile_lines(path: Path):
    """(lineno, text) of each line; a UTF-8 byte-order mark is dropped, other undecodable bytes are an error.

    Lines end at "\n" only (as mpiexec reads them), so line numbers match what an editor shows.
    """
    try:
        data = path.read_bytes()
    except OSError as e:
        raise HostfileError(f"{path}: cannot read the hostfile ({e.strerror})") from None
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise HostfileError(f"{path}:{lineno}: not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})") \
                from None
        if lineno == 1 and line.startswith(_BOM):
            line = line[1:]
        yield lineno, line


def parse_hostfile(path: str | Path) -> Cluster:
    """Read an MPICH hostfile with `# device:` declarations into a Cluster (one Device per slot)."""
    path = Path(path)
    if not path.is_file():
        raise HostfileError(f"{path}: hostfile not found")
    devices: list[Device] = []
    declared_at: dict[str, str] = {}  # device name -> the line that declared it (or its host line)
    pending: list[tuple[dict, str]] = []  # declarations waiting for their host line
    for lineno, raw in _hostfile_lines(path):
        where = f"{path}:{lineno}"
        line = raw.strip()
        if not line:
            continue
        if line.startswith("#"):
            body = line[1:].strip()
            if body.startswith("device:"):
                pending.append((_parse_declaration(body[len("device:"):], where), where))
            continue
        if "#" in line:
            raise HostfileError(f"{where}: trailing comments are not allowed (MPICH rejects them); "
                                "put '# device: ...' on its own line above the host")
        host, colon, slots_text = line.partition(":")
        host, slots_text = host.strip(), slots_text.strip()
        if not host or len(host.split()) != 1:
            raise HostfileError(f"{where}: {_short(line)} is not 'host' or 'host:slots'")
        if colon:
            if not _SLOTS_RE.fullmatch(slots_text) or not 1 <= int(slots_text) <= MAX_SLOTS:
                raise HostfileError(f"{where}: slots {_short(slots_text)} is not a positive integer "
                                    f"(1 to {MAX_SLOTS})")
            slots = int(slots_text)
        else:
            slots = 1
        if len(devices) + slots > MAX_SLOTS:
            raise HostfileError(f"{where}: the hostfile declares more than {MAX_SLOTS} slots")
        if len(pending) not in (0, 1, slots):
            lines = ", ".join(w.rsplit(":", 1)[1] for _, w in pending)
            raise HostfileError(f"{where}: host {host} has {slots} slot(s) but {len(pending)} "
                                f"device declarations above it, on lines {lines} (give one, or one per slot)")
        for s in range(slots):
            if pending:
                fields, decl_where = pending[s] if len(pending) == slots else pending[0]
                name = fields["name"] if len(pending) == slots or slots == 1 else f"{fields['name']}-{s}"
                try:
                    devices.append(Device(host=host, **{**fields, "name": name}))
                except ValueError as e:
                    raise HostfileError(f"{decl_where}: {e}") from None
            else:
                decl_where = where
                name = host if slots == 1 else f"{host}-{s}"
                devices.append(Device(name=name, host=host))
            if name in declared_at:
                # each device is one slot; the same name twice would make profiles and plans ambiguous
                raise HostfileError(f"{decl_where}: device name {name} declared more than once "
                                    f"(also at line {declared_at[name].rsplit(':', 1)[1]})")
            declared_at[name] = decl_where
        pending = []
    if pending:
        raise HostfileError(f"{pending[0][1]}: device declaration is not followed by a host line")
    if not devices:
        raise HostfileError(f"{path}: no host lines")
    return Cluster(tuple(devices), str(path))
