"""HDF5 results: written by rank 0 alone, appended as requests finish, read back by `edgeshard show`.

Layout (`h5ls -r results/demo.h5`):

    /                    attrs: format, job (TOML text), plan, model, cluster (JSON), versions, created
    /requests            group; attr `count` = records committed
    /requests/id             (n,) utf-8     request id from the prompt file
    /requests/where          (n,) utf-8     file:line it came from
    /requests/prompt         (n,) utf-8     the prompt, or the chat messages as JSON
    /requests/text           (n,) utf-8     generated text (ends before a stop string)
    /requests/token_ids      (n,) vlen int32 generated token ids
    /requests/finish_reason  (n,) utf-8     eos | stop | length
    /requests/prompt_tokens  (n,) int32
    /requests/output_tokens  (n,) int32
    /requests/ttft_ms        (n,) float64   time to first token
    /requests/ms_per_token   (n,) float64   mean time per token after the first
    /requests/status         (n,) utf-8     ok | error (format 2 on; a format-1 file reads as all ok)
    /requests/error          (n,) utf-8     why a request could not run (file:line and the reason), else ""
    /requests/endpoint       (n,) utf-8     /v1/chat/completions | /v1/completions (format 2 on)
    /requests/choice         (n,) int32     which of the request's `n` choices (format 2 on)
    /requests/logprobs       (n,) vlen float32  each token's logprob, when asked (format 2 on)
    /requests/top_ids        (n,) vlen int32    the top k tokens of each step, flattened, when asked
    /requests/top_logprobs   (n,) vlen float32  their logprobs

A request that cannot run (a line that is not a request, a prompt longer than the context) is a
record too: status `error`, finish_reason `error`, no tokens, so every line of the prompt file has
its record and a resume skips it like any other.

Every column grows together; `count` is raised only after a batch of rows is written and is
flushed with them, so a reader (or a resume) trusts exactly the first `count` rows.

HDF5 is not crash-safe on its own: a process killed in the middle of a metadata write can leave
the file unreadable. So each finished batch is first appended to `<file>.journal` (JSON lines,
fsync'ed), then to the HDF5 file. `--resume` recovers: it rebuilds an unreadable file from the
journal and adds any records the journal has beyond `count`. A run that ends normally deletes the
journal.

A failed write (a full disk, a lost mount) ends the run with a ResultsError naming the file and
the error; every batch committed before it stays readable, and `--resume` continues. The folder
is probed with a real write before any compute starts, so an unwritable or full target fails
at once. `EDGESHARD_FAULT=write:N` makes the N-th batch's HDF5 write fail with ENOSPC after its
journal line is on disk, as a disk that fills up between the two would (tests use it).
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import tempfile
from pathlib import Path

import h5py
import numpy as np

__all__ = ["Record", "ResultWriter", "read_results", "read_attrs", "ResultsError", "done_key"]

FORMAT = "edgeshard-results/2"


class ResultsError(ValueError):
    pass


@dataclasses.dataclass
class Record:
    id: str
    where: str
    prompt: str
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    output_tokens: int
    ttft_ms: float
    ms_per_token: float
    status: str = "ok"  # ok | error
    error: str = ""
    endpoint: str = ""  # /v1/chat/completions | /v1/completions: how `export --format openai` answers it
    choice: int = 0  # which of the request's n choices
    # when the request asked for them (`logprobs`): each token's logprob, and the top k per token
    # (ids and logprobs, flattened: k = len(top_ids) // len(logprobs))
    logprobs: list[float] = dataclasses.field(default_factory=list)
    top_ids: list[int] = dataclasses.field(default_factory=list)
    top_logprobs: list[float] = dataclasses.field(default_factory=list)

    @property
    def key(self) -> str:
        return done_key(self.id, self.choice)


def done_key(rid: str, choice: int) -> str:
    """What a resume skips: a request's id, or, for its choices after the first, the id and the choice."""
    return rid if choice == 0 else f"{rid}\x1f{choice}"  # a unit separator: never part of a prompt file's id


_STR = h5py.string_dtype("utf-8")
_COLUMNS = {
    "id": _STR, "where": _STR, "prompt": _STR, "text": _STR, "token_ids": h5py.vlen_dtype(np.int32),
    "finish_reason": _STR, "prompt_tokens": np.int32, "output_tokens": np.int32,
    "ttft_ms": np.float64, "ms_per_token": np.float64, "status": _STR, "error": _STR, "endpoint": _STR,
    "choice": np.int32, "logprobs": h5py.vlen_dtype(np.float32), "top_ids": h5py.vlen_dtype(np.int32),
    "top_logprobs": h5py.vlen_dtype(np.float32),
}
_LISTS = {"token_ids": (np.int32, int), "top_ids": (np.int32, int), "logprobs": (np.float32, float),
          "top_logprobs": (np.float32, float)}  # vlen columns: their dtype on disk and in a Record
_ADDED = {"status": "ok", "error": "", "endpoint": "", "choice": 0, "logprobs": [], "top_ids": [],
          "top_logprobs": []}  # columns format 1 did not have, and what its records hold there


def _journal(path: Path) -> Path:
    return path.with_name(path.name + ".journal")


def _why(e: OSError) -> str:
    code = errno.errorcode.get(e.errno or 0)
    return f"{e.strerror or e}" + (f" ({code})" if code else "")


_PROBE_BYTES = 64 * 1024  # a write this size must reach the disk, or the target is full


def _probe(path: Path) -> None:
    """Write, sync and remove a small file beside `path`, and open an existing `path` for writing.

    Permission bits alone do not tell (root ignores them; a read-only mount or a full disk does
    not show in them), so this asks the file system itself, before any compute starts.
    """
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=f".{path.name}.probe-") as f:
            f.write(b"\0" * _PROBE_BYTES)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise ResultsError(f"{path}: cannot write results in {folder}: {_why(e)}") from None
    for existing in (path, _journal(path)):
        if existing.exists():
            try:
                open(existing, "r+b").close()
            except OSError as e:
                raise ResultsError(f"{existing}: cannot write to it: {_why(e)}") from None


def _write_fault() -> int | None:
    """EDGESHARD_FAULT=write:N: the batch number whose HDF5 write fails (tests use it)."""
    text = os.environ.get("EDGESHARD_FAULT", "")
    if not text.startswith("write:"):
        return None
    try:
        return int(text[len("write:"):])
    except ValueError:
        raise ValueError(f"EDGESHARD_FAULT={text!r} is not RANK, RANK:STEP or write:N") from None


class ResultWriter:
    """Appends records to an HDF5 results file (new, replaced with `overwrite`, or continued with `resume`)."""

    @staticmethod
    def check_target(path: str | Path, *, overwrite: bool = False, resume: bool = False,
                     retry_errors: bool = False) -> set[str]:
        """Before any compute: may this path be written? Returns the ids a resume skips.

        retry_errors: the file's error records are dropped now, so that their requests run again."""
        path = Path(path)
        if overwrite and resume:
            raise ResultsError(f"{path}: pass --resume or --overwrite, not both")
        if retry_errors and not resume:
            raise ResultsError(f"{path}: --retry-errors runs a results file's errors again: pass --resume with it")
        if not (path.exists() or _journal(path).exists()):
            _probe(path)
            return set()
        if not (overwrite or resume):
            raise ResultsError(f"{path}: results file exists; pass --resume to skip the requests it holds, "
                               "or --overwrite to replace it")
        _probe(path)
        if overwrite:
            return set()
        records = _recover(path)
        kept = [r for r in records if r.status != "error"] if retry_errors else records
        if _format_of(path) != FORMAT or len(kept) < len(records):  # continued in this format, without
            # the errors to run again; the records kept stay as they are
            _rebuild(path, {k: v for k, v in read_attrs(path).items() if k != "format"}, kept)
        return {r.key for r in kept}

    def __init__(self, path: str | Path, attrs: dict, *, overwrite: bool = False, resume: bool = False):
        path = Path(path)
        ResultWriter.check_target(path, overwrite=overwrite, resume=resume)  # recovers the file on resume
        self.path = path
        self._batches = 0
        self._fail_at = _write_fault()
        if resume and path.exists():
            self.f = h5py.File(path, "a")
            self.group = self.f["requests"]
            self.count = int(self.group.attrs["count"])
            for name in _COLUMNS:  # rows beyond `count` were half-written before a crash
                self.group[name].resize((self.count,))
            # a resumed run may run on other devices (one was lost) under another plan: keep each
            resumed = json.loads(self.f.attrs.get("resumed", "[]"))
            self.f.attrs["resumed"] = json.dumps(resumed + [{k: attrs[k] for k in ("created", "cluster", "plan", "ranks")
                                                             if k in attrs}])
            # The journal restarts as a full copy of the file (its attributes and every committed
            # record), so that it can rebuild the file alone whatever came before: a finished run
            # deleted its journal, and a killed one may have left a torn last line.
            file_attrs = {k: (v.decode() if isinstance(v, bytes) else str(v)) for k, v in self.f.attrs.items()
                          if k != "format"}
            tmp = _journal(path).with_suffix(".tmp")
            self.journal = open(tmp, "w", encoding="utf-8")
            self._journal_write({"attrs": file_attrs},
                                *({"record": dataclasses.asdict(r)} for r in read_results(path, self.f)))
            os.replace(tmp, _journal(path))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.f = h5py.File(path, "w")
            self.f.attrs["format"] = FORMAT
            for k, v in attrs.items():
                self.f.attrs[k] = v if isinstance(v, str) else json.dumps(v)
            self.group = self.f.create_group("requests")
            for name, dtype in _COLUMNS.items():
                self.group.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dtype, chunks=(256,))
            self.count = 0
            self.group.attrs["count"] = 0
            self.journal = open(_journal(path), "w", encoding="utf-8")
            self._journal_write({"attrs": {k: v if isinstance(v, str) else json.dumps(v) for k, v in attrs.items()}})
        self.f.flush()

    def _journal_write(self, *objs) -> None:
        for obj in objs:
            self.journal.write(json.dumps(obj, ensure_ascii=False) + "\n")
        self.journal.flush()
        os.fsync(self.journal.fileno())

    def append(self, records: list[Record]) -> None:
        """Journal the batch, then add it to the HDF5 file; a failed write raises ResultsError."""
        if not records:
            return
        try:
            self._journal_write(*({"record": dataclasses.asdict(r)} for r in records))
        except OSError as e:
            raise self._failed(_journal(self.path), e) from None
        self._batches += 1
        try:
            if self._batches == self._fail_at:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path))
            _append(self.group, self.count, records)
            self.count += len(records)
            self.group.attrs["count"] = self.count
            self.f.flush()
        except OSError as e:
            raise self._failed(self.path, e) from None

    def _failed(self, path: Path, e: OSError) -> ResultsError:
        return ResultsError(f"{path}: writing results failed: {_why(e)}. The {self.count} requests written "
                            "before are kept; make room, then run again with --resume")

    def attr(self, key: str, default: str | None = None) -> str | None:
        """A file attribute as written (JSON text for anything but a string), or `default`."""
        value = self.f.attrs.get(key, default)
        return value.decode() if isinstance(value, bytes) else value

    def set_attr(self, key: str, value) -> None:
        value = value if isinstance(value, str) else json.dumps(value)
        self._journal_write({"attrs": {key: value}})
        self.f.attrs[key] = value
        self.f.flush()

    def close(self, complete: bool = False) -> None:
        """Close the file; `complete` (the run ended normally) also drops the journal.

        Without `complete` this runs on the way out of a failed run: on a full disk closing fails
        too, and that must not hide the error that ended the run (the journal has every batch).
        """
        if self.f:
            f, self.f = self.f, None
            failed = None
            for part, close in ((self.path, f.close), (_journal(self.path), self.journal.close)):
                try:
                    close()
                except OSError as e:
                    failed = failed or self._failed(part, e)
            if failed and complete:
                raise failed
            if complete:
                _journal(self.path).unlink(missing_ok=True)


def _append(group, n: int, records: list[Record]) -> None:
    k = len(records)
    for name in _COLUMNS:
        ds = group[name]
        ds.resize((n + k,))
        if name in _LISTS:
            for i, r in enumerate(records):
                ds[n + i] = np.asarray(getattr(r, name), dtype=_LISTS[name][0])
        else:
            ds[n:n + k] = [getattr(r, name) for r in records]


def _read_journal(path: Path) -> tuple[dict, list[Record]]:
    attrs, records = {}, []
    journal = _journal(path)
    lines = journal.read_text(encoding="utf-8").splitlines()
    for lineno, line in enumerate(lines, start=1):
        try:
            obj = json.loads(line)
            if "attrs" in obj:
                attrs.update(obj["attrs"])
            elif "record" in obj:
                records.append(Record(**obj["record"]))
        except (json.JSONDecodeError, TypeError) as e:
            if lineno == len(lines):
                break  # the last line of a killed writer may be cut short
            raise ResultsError(f"{journal}:{lineno}: damaged journal line ({e})") from None
    return attrs, records


def _recover(path: Path) -> list[Record]:
    """Make the results file hold every record the journal has; returns the committed records.

    A journal left behind means the writer did not close: it was killed, or a write failed. Its
    file may then be readable yet damaged inside (a kill in the middle of a write once left a
    heap that reads but cannot be written to again), so it is never appended to: the records
    (the journal's, or the file's if it holds more) go into a new file that replaces it.
    """
    try:
        records = read_results(path)
    except Exception:
        if not _journal(path).exists():
            raise ResultsError(f"{path}: results file is unreadable and has no journal to rebuild it from") from None
        records = None
    if not _journal(path).exists():
        return records
    attrs, keep = _read_journal(path)
    if records is not None and len(records) > len(keep):  # a journal cut short: the file has more
        attrs, keep = {k: v for k, v in read_attrs(path).items() if k != "format"}, records
    _rebuild(path, attrs, keep)
    return keep


def _rebuild(path: Path, attrs: dict, records: list[Record]) -> None:
    """Replace `path` with a file in this format holding `attrs` and `records`."""
    tmp = path.with_name(path.name + ".rebuild")
    with h5py.File(tmp, "w") as f:
        f.attrs["format"] = FORMAT
        for k, v in attrs.items():
            f.attrs[k] = v if isinstance(v, str) else json.dumps(v)
        g = f.create_group("requests")
        for name, dtype in _COLUMNS.items():
            g.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dtype, chunks=(256,))
        _append(g, 0, records)
        g.attrs["count"] = len(records)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)  # a reader sees the old file or the whole new one


def _format_of(path: Path) -> str:
    with _open(path) as f:
        fmt = f.attrs.get("format")
        return fmt.decode() if isinstance(fmt, bytes) else str(fmt)


def read_attrs(path: str | Path) -> dict:
    with _open(path) as f:
        return {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}


def read_results(path: str | Path, f: h5py.File | None = None) -> list[Record]:
    """The committed records, in the order they finished (from `f` if the file is already open)."""
    if f is None:
        with _open(path) as f:
            return read_results(path, f)
    _check_format(path, f)
    g = f["requests"]
    n = int(g.attrs["count"])
    cols = {name: g[name][:n] if name in g else [_ADDED[name]] * n for name in _COLUMNS}
    out = []
    for i in range(n):
        row = {}
        for name, dtype in _COLUMNS.items():
            v = cols[name][i]
            if dtype is _STR:
                v = v.decode() if isinstance(v, bytes) else str(v)
            elif name in _LISTS:
                v = [_LISTS[name][1](x) for x in v]
            elif name in ("prompt_tokens", "output_tokens", "choice"):
                v = int(v)
            else:
                v = float(v)
            row[name] = v
        out.append(Record(**row))
    return out


def _open(path) -> h5py.File:
    """A results file opened for reading, or a ResultsError that says what it is instead."""
    path = Path(path)
    if not path.is_file():
        raise ResultsError(f"{path}: results file not found")
    if not h5py.is_hdf5(path):
        raise ResultsError(f"{path}: not an HDF5 file (an edgeshard results file is one)")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise ResultsError(f"{path}: cannot read this HDF5 file: {e}") from None
    try:
        _check_format(path, f)
    except ResultsError:
        f.close()
        raise
    return f


def _check_format(path, f: h5py.File) -> None:
    fmt = f.attrs.get("format")
    fmt = fmt.decode() if isinstance(fmt, bytes) else fmt
    name, _, version = str(fmt).rpartition("/")
    ours, _, mine = FORMAT.rpartition("/")
    if name != ours or not version.isdigit():
        raise ResultsError(f"{path}: an HDF5 file, but not an edgeshard results file (format attribute: "
                           f"{fmt!r}, expected {FORMAT!r})")
    if int(version) > int(mine):
        raise ResultsError(f"{path}: written by a newer edgeshard (format {fmt}); this one reads {FORMAT}: "
                           "upgrade edgeshard-mpi to read it")
    if "requests" not in f:
        raise ResultsError(f"{path}: an edgeshard results file without its requests group: damaged")
