"""A hostfile with device declarations for the nodes SLURM gave a job.

    python -m edgeshard_mpi.slurm --devices launch/devices.example.toml --out job.hosts
    python -m edgeshard_mpi.slurm --devices D.toml --nodelist 'edge[01-03],gpu-a1' --out -

The node list comes from `--nodelist`, else `$SLURM_JOB_NODELIST`, in SLURM's compressed form
(`edge[01-03,07],gpu-a[1-2]`); `scontrol show hostnames` expands it where SLURM is installed,
`expand_nodelist` where it is not (or fails). A devices file (TOML) declares the device of each
kind of node, chosen by shell-style patterns on the node name:

    [types.orin]
    nodes = ["edge*"]        # fnmatch patterns; the first type with a matching pattern wins
    memory = "8GiB"          # the hostfile's device fields: memory, torch, slowdown, link, latency,
                             # dtype, quantize, clock
    [types.a100]
    nodes = ["gpu-a*"]
    slots = 2                # ranks per node (default 1); each gets its own declaration
    memory = "38GiB"
    torch = "cuda:{slot}"    # {slot} = the slot on its node: one GPU per rank
    dtype = "float16"        # this type's shards in float16, whatever the job's dtype

Device names are `{node}` (one slot) or `{node}-{slot}` unless the type gives `name` (a template
with {node}, {slot}, {type}). Ranks follow the node list's order, so rank 0, which reads the prompts
and writes the results, is on the first node. A node that matches no type is an error naming the
node and the devices file. The hostfile is checked with `cluster.parse_hostfile` before it is used.

Pure Python (stdlib + cluster), no MPI.
"""

from __future__ import annotations

import argparse
import fnmatch
import itertools
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

from .cluster import Cluster, HostfileError, parse_hostfile

__all__ = ["SlurmError", "expand_nodelist", "hostnames", "DeviceType", "load_device_types", "build_hostfile",
           "main"]

# passed through to `# device:` lines
_FIELDS = ("memory", "torch", "slowdown", "link", "latency", "dtype", "quantize", "clock")
_KEYS = {"nodes", "slots", "name", *_FIELDS}


class SlurmError(ValueError):
    """A node list, devices file or node that cannot be turned into a hostfile; says which and why."""


# -- node lists -------------------------------------------------------------------------------
def _split_top(text: str) -> list[str]:
    """Split on commas outside brackets: 'a[1,3],b' -> ['a[1,3]', 'b']."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
            if depth > 1:
                raise SlurmError(f"node list {text!r}: nested '[' at position {i}")
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise SlurmError(f"node list {text!r}: ']' without '[' at position {i}")
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth:
        raise SlurmError(f"node list {text!r}: '[' is not closed")
    parts.append(text[start:])
    return parts


def _expand_range(body: str, whole: str) -> list[str]:
    """'01-03,07' -> ['01', '02', '03', '07']; a range keeps its lower bound's zero padding."""
    out = []
    for item in body.split(","):
        m = re.fullmatch(r"([0-9]+)(?:-([0-9]+))?", item.strip())
        if not m:
            raise SlurmError(f"node list {whole!r}: {item!r} in [{body}] is not N or N-M")
        lo, hi = m.group(1), m.group(2)
        if hi is None:
            out.append(lo)
            continue
        if int(hi) < int(lo):
            raise SlurmError(f"node list {whole!r}: range {item} runs backwards")
        width = len(lo) if lo.startswith("0") else 1
        out.extend(str(n).zfill(width) for n in range(int(lo), int(hi) + 1))
    return out


def expand_nodelist(text: str) -> list[str]:
    """SLURM's compressed host list to host names, in order: 'n[1-2]-[a]' style groups multiply out."""
    text = text.strip()
    if not text:
        raise SlurmError("node list is empty (is this running inside a SLURM allocation?)")
    hosts: list[str] = []
    for part in _split_top(text):
        if not part:
            raise SlurmError(f"node list {text!r}: empty name between commas")
        pieces: list[list[str]] = []
        # alternating literal text and bracket groups: 'rack[1-2]-n[01-02]' -> rack, 1-2, -n, 01-02
        for k, piece in enumerate(re.split(r"\[([^\]]*)\]", part)):
            if k % 2 == 0:
                if piece:
                    pieces.append([piece])
            elif not piece.strip():
                raise SlurmError(f"node list {text!r}: empty brackets in {part!r}")
            else:
                pieces.append(_expand_range(piece, text))
        hosts.extend("".join(p) for p in itertools.product(*pieces))
    dup = sorted({h for h in hosts if hosts.count(h) > 1})
    if dup:
        raise SlurmError(f"node list {text!r}: node(s) {', '.join(dup)} listed more than once")
    return hosts


def hostnames(nodelist: str) -> list[str]:
    """The node list expanded by `scontrol show hostnames` if SLURM is here, else by expand_nodelist."""
    scontrol = shutil.which("scontrol")
    if scontrol:
        try:
            out = subprocess.run([scontrol, "show", "hostnames", nodelist], capture_output=True, text=True,
                                 timeout=30, check=True).stdout.split()
            if out:
                return out
        except (subprocess.SubprocessError, OSError):
            pass  # a broken or foreign scontrol: the list's syntax is simple enough to expand here
    return expand_nodelist(nodelist)


# -- device types --------------------------------------------------------------------------------
class DeviceType:
    """One [types.X] table: which nodes it covers and the device declared for each of their slots."""

    def __init__(self, name: str, table: dict, source: str):
        where = f"{source}: [types.{name}]"
        unknown = sorted(set(table) - _KEYS)
        if unknown:
            raise SlurmError(f"{where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(_KEYS))})")
        nodes = table.get("nodes")
        if isinstance(nodes, str):
            nodes = [nodes]
        if not nodes or not all(isinstance(p, str) and p for p in nodes):
            raise SlurmError(f"{where}: nodes must be a non-empty list of name patterns, e.g. [\"gpu-a*\"]")
        slots = table.get("slots", 1)
        if not isinstance(slots, int) or isinstance(slots, bool) or slots < 1:
            raise SlurmError(f"{where}: slots must be a positive integer, got {slots!r}")
        fields = {}
        for key in _FIELDS:
            if key in table:
                value = table[key]
                if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                    raise SlurmError(f"{where}: {key} must be a string or number, got {value!r}")
                value = str(value)
                if not value or any(c.isspace() for c in value):
                    raise SlurmError(f"{where}: {key} = {value!r} must be one word (it goes into a "
                                     "'key=value' hostfile field)")
                fields[key] = value
        self.name, self.source, self.nodes, self.slots, self.fields = name, source, list(nodes), slots, fields
        self.name_template = table.get("name", "{node}" if slots == 1 else "{node}-{slot}")
        if not isinstance(self.name_template, str) or (slots > 1 and "{slot}" not in self.name_template):
            raise SlurmError(f"{where}: name must be a template string, with {{slot}} when slots > 1 "
                             "(device names must be unique)")

    def matches(self, node: str) -> bool:
        return any(fnmatch.fnmatchcase(node, p) for p in self.nodes)

    def declarations(self, node: str) -> list[str]:
        """The `# device:` line of each slot of this node."""
        lines = []
        for slot in range(self.slots):
            subst = {"node": node, "slot": slot, "type": self.name}
            try:
                name = self.name_template.format(**subst)
                values = {k: v.format(**subst) for k, v in self.fields.items()}
            except (KeyError, IndexError, ValueError) as e:
                raise SlurmError(f"{self.source}: [types.{self.name}]: bad template ({e}); "
                                 "templates may use {node}, {slot} and {type}") from None
            lines.append("# device: " + " ".join([f"name={name}"] + [f"{k}={v}" for k, v in values.items()]))
        return lines


def load_device_types(path: str | Path) -> list[DeviceType]:
    """The [types.*] tables of a devices file, in file order (the order patterns are tried in)."""
    path = Path(path)
    if not path.is_file():
        raise SlurmError(f"{path}: devices file not found")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise SlurmError(f"{path}: not TOML ({e})") from None
    extra = sorted(set(data) - {"types"})
    if extra:
        raise SlurmError(f"{path}: unknown top-level key(s) {', '.join(extra)}; device types go in [types.NAME]")
    types = data.get("types")
    if not isinstance(types, dict) or not types:
        raise SlurmError(f"{path}: no device types; add a [types.NAME] table with nodes = [...]")
    out = []
    for name, table in types.items():
        if not isinstance(table, dict):
            raise SlurmError(f"{path}: types.{name} must be a table")
        out.append(DeviceType(name, table, str(path)))
    return out


def build_hostfile(nodes: list[str], types: list[DeviceType]) -> str:
    """The MPICH hostfile text: per node, one declaration per slot, then `node:slots`."""
    if not nodes:
        raise SlurmError("no nodes to write a hostfile for")
    lines = []
    for node in nodes:
        t = next((t for t in types if t.matches(node)), None)
        if t is None:
            source = types[0].source if types else "<no devices file>"
            patterns = "; ".join(f"{x.name}: {', '.join(x.nodes)}" for x in types)
            raise SlurmError(f"{source}: node {node!r} matches no device type ({patterns}); "
                             "add its name pattern to a type's nodes")
        lines.append(f"# node {node}: type {t.name}")
        lines.extend(t.declarations(node))
        lines.append(f"{node}:{t.slots}")
    return "\n".join(lines) + "\n"


def check_hostfile(text: str) -> Cluster:
    """Parse the generated text as `run` will, so a bad field fails here, before mpiexec starts."""
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "generated.hosts"
        p.write_text(text)
        try:
            return parse_hostfile(p)
        except HostfileError as e:
            raise SlurmError(f"the devices file gives a hostfile edgeshard rejects: {e}") from None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m edgeshard_mpi.slurm",
                                description="write an MPICH hostfile with device declarations for SLURM's nodes")
    p.add_argument("--devices", required=True, help="devices file (TOML): [types.NAME] with nodes = [patterns]")
    p.add_argument("--nodelist", help="compressed node list (default: $SLURM_JOB_NODELIST)")
    p.add_argument("--out", required=True, help="hostfile to write ('-' for standard output)")
    args = p.parse_args(argv)
    try:
        nodelist = args.nodelist if args.nodelist is not None else os.environ.get("SLURM_JOB_NODELIST", "")
        if not nodelist.strip():
            raise SlurmError("no node list: give --nodelist or run inside a SLURM job (SLURM_JOB_NODELIST)")
        nodes = hostnames(nodelist)
        text = build_hostfile(nodes, load_device_types(args.devices))
        cluster = check_hostfile(text)
    except SlurmError as e:
        print(f"edgeshard slurm: error: {e}", file=sys.stderr)
        return 1
    if args.out == "-":
        sys.stdout.write(text)
    else:
        Path(args.out).write_text(text)
        print(f"edgeshard slurm: {args.out}: {len(nodes)} node(s), {cluster.size} slot(s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
