"""Timelines: each rank's timed events, as a Chrome trace (Perfetto opens it) and as a Gantt chart.

    mpiexec -f hostfiles/hetero4.hosts -n 4 edgeshard run jobs/hetero4.toml --overwrite --trace traces/run.json
    edgeshard show --timeline traces/run.json --out timeline.png      (or the results file of the run)
    edgeshard simulate --profile P --trace traces/sim.json             (the same picture, simulated)

A `Tracer` keeps one rank's events as (name, start, duration, slot, step) tuples, times in seconds
from a common origin (taken when every rank leaves the barrier before the loops). When tracing is
off, `Tracer.add` is one attribute test, so the loops always call it. Names: `prefill` and `decode`
(a stage's units over one micro-batch step), `send` (posting a message), `wait` (blocked in a
receive: for data, or for the link's emulated delivery).

matplotlib is needed only to draw (`pip install -e ".[plot]"`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

__all__ = ["Tracer", "chrome_trace", "write_chrome_trace", "load_trace", "draw_timeline"]

FORMAT = "edgeshard-trace/1"


class Tracer:
    """One rank's events; off by default, and then nearly free."""

    def __init__(self, enabled: bool = False):
        self.enabled = enabled
        self.origin = time.perf_counter()
        self.events: list[tuple] = []

    def start(self) -> None:
        """Set time zero (every rank calls it right after the same barrier)."""
        self.origin = time.perf_counter()

    def add(self, name: str, t0: float, t1: float, slot: int = -1, step: int = -1, forwards=None) -> None:
        """Record an event between perf_counter times t0 and t1; a stage's compute with its step's
        `forwards` ((tokens, columns, width) each: messages.Step.forwards), which the simulator's line
        costs it by (benchmarks/step_kinds.py sets the two side by side)."""
        if self.enabled:
            event = (name, t0 - self.origin, t1 - t0, slot, step)
            self.events.append(event if forwards is None else (*event, [list(f) for f in forwards]))


def chrome_trace(tracks: list[dict], meta: dict | None = None) -> dict:
    """Chrome trace JSON from tracks: {"rank", "label", "events": [(name, start_s, dur_s, slot, step)]},
    an event possibly with its forwards after them (Tracer.add).

    One process per rank (Perfetto draws one track each), times in microseconds.
    """
    out = []
    for tr in tracks:
        r = int(tr["rank"])
        out.append({"name": "process_name", "ph": "M", "pid": r, "tid": 0, "args": {"name": tr["label"]}})
        out.append({"name": "process_sort_index", "ph": "M", "pid": r, "tid": 0, "args": {"sort_index": r}})
        for name, start, dur, slot, step, *forwards in tr["events"]:
            cat = "compute" if name in ("prefill", "decode") else name
            args = {"slot": slot, "step": step, **({"forwards": forwards[0]} if forwards else {})}
            out.append({"name": name if slot < 0 else f"{name} mb{slot}", "cat": cat, "ph": "X", "pid": r,
                        "tid": 0, "ts": round(start * 1e6, 3), "dur": round(dur * 1e6, 3), "args": args})
    return {"traceEvents": out, "displayTimeUnit": "ms",
            "otherData": {"format": FORMAT, **(meta or {}), "tracks": [
                {"rank": tr["rank"], "label": tr["label"]} for tr in tracks]}}


def write_chrome_trace(path: str | Path, tracks: list[dict], meta: dict | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(chrome_trace(tracks, meta)))
    tmp.replace(path)
    return path


def load_trace(path: str | Path) -> tuple[list[dict], dict]:
    """(tracks, meta) from a trace JSON written here, or from a results file that names one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such trace or results file")
    if path.suffix in (".h5", ".hdf5"):
        from .results import read_attrs

        attrs = read_attrs(path)
        if "trace" not in attrs:
            raise ValueError(f"{path}: this run kept no trace (run it with --trace FILE.json)")
        trace = Path(attrs["trace"])
        if not trace.is_absolute():
            trace = path.parent / trace
        return load_trace(trace)
    try:
        d = json.loads(path.read_text())
        other = d["otherData"]
        if other.get("format") != FORMAT:
            raise KeyError("format")
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not an edgeshard trace ({e})") from None
    labels = {t["rank"]: t["label"] for t in other["tracks"]}
    events: dict[int, list] = {r: [] for r in labels}
    for ev in d["traceEvents"]:
        if ev.get("ph") == "X":
            a = ev.get("args", {})
            event = (ev["name"].split(" ")[0], ev["ts"] / 1e6, ev["dur"] / 1e6, a.get("slot", -1), a.get("step", -1))
            events.setdefault(ev["pid"], []).append((*event, a["forwards"]) if "forwards" in a else event)
    tracks = [{"rank": r, "label": labels.get(r, f"rank {r}"), "events": evs} for r, evs in sorted(events.items())]
    return tracks, {k: v for k, v in other.items() if k not in ("format", "tracks")}


def draw_timeline(tracks: list[dict], out: str | Path, title: str = "", start: float | None = None,
                  end: float | None = None) -> Path:
    """A Gantt chart: one row per rank, compute coloured by micro-batch (prefill hatched); the gaps
    between bars are the stage's bubbles. start/end (seconds) cut a window."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch
    except ImportError:
        raise RuntimeError('drawing a timeline needs matplotlib: pip install -e ".[plot]"') from None
    tracks = [t for t in tracks if any(e[0] in ("prefill", "decode") for e in t["events"])] or tracks
    fig, ax = plt.subplots(figsize=(12, 0.6 * len(tracks) + 1.6))
    cmap = plt.get_cmap("tab20")
    t_max = 0.0
    for row, tr in enumerate(tracks):
        y = len(tracks) - 1 - row
        for name, t0, dur, slot, *_ in tr["events"]:
            if (start is not None and t0 + dur < start) or (end is not None and t0 > end):
                continue
            t_max = max(t_max, t0 + dur)
            if name in ("prefill", "decode"):
                ax.broken_barh([(t0, dur)], (y - 0.38, 0.76), facecolors=cmap(slot % 20),
                               hatch="///" if name == "prefill" else None, edgecolor="black", linewidth=0.2)
            elif name == "send":
                ax.broken_barh([(t0, max(dur, 0.0))], (y - 0.45, 0.1), facecolors="black")
    ax.set_yticks(range(len(tracks)))
    ax.set_yticklabels([t["label"] for t in reversed(tracks)])
    ax.set_xlabel("seconds")
    ax.set_xlim(start or 0.0, end or t_max)
    ax.set_title(title)
    ax.legend(handles=[Patch(facecolor="white", edgecolor="black", hatch="///", label="prefill"),
                       Patch(facecolor=cmap(0), edgecolor="black", label="decode step (colour: micro-batch)"),
                       Patch(facecolor="white", edgecolor="white", label="gap: stage waits (bubble)")],
              loc="upper center", bbox_to_anchor=(0.5, -0.35 / (0.3 * len(tracks) + 0.8)), fontsize=8, ncol=3,
              frameon=False)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
