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

Every column grows together; `count` is raised only after a batch of rows is written and is
flushed with them, so a reader (or a resume) trusts exactly the first `count` rows.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import h5py
import numpy as np

__all__ = ["Record", "ResultWriter", "read_results", "read_attrs", "ResultsError"]

FORMAT = "edgeshard-results/1"


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


_STR = h5py.string_dtype("utf-8")
_COLUMNS = {
    "id": _STR, "where": _STR, "prompt": _STR, "text": _STR, "token_ids": h5py.vlen_dtype(np.int32),
    "finish_reason": _STR, "prompt_tokens": np.int32, "output_tokens": np.int32,
    "ttft_ms": np.float64, "ms_per_token": np.float64,
}


class ResultWriter:
    """Appends records to a new HDF5 file; `overwrite` must be explicit to replace one."""

    def __init__(self, path: str | Path, attrs: dict, overwrite: bool = False):
        path = Path(path)
        if path.exists() and not overwrite:
            raise ResultsError(f"{path}: results file exists; pass --overwrite to replace it")
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.f = h5py.File(path, "w")
        self.f.attrs["format"] = FORMAT
        for k, v in attrs.items():
            self.f.attrs[k] = v if isinstance(v, str) else json.dumps(v)
        self.group = self.f.create_group("requests")
        for name, dtype in _COLUMNS.items():
            self.group.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dtype, chunks=(256,))
        self.count = 0
        self.group.attrs["count"] = 0
        self.f.flush()

    def append(self, records: list[Record]) -> None:
        if not records:
            return
        n, k = self.count, len(records)
        for name in _COLUMNS:
            ds = self.group[name]
            ds.resize((n + k,))
            if name == "token_ids":
                for i, r in enumerate(records):
                    ds[n + i] = np.asarray(r.token_ids, dtype=np.int32)
            else:
                ds[n:n + k] = [getattr(r, name) for r in records]
        self.count = n + k
        self.group.attrs["count"] = self.count
        self.f.flush()

    def set_attr(self, key: str, value) -> None:
        self.f.attrs[key] = value if isinstance(value, str) else json.dumps(value)
        self.f.flush()

    def close(self) -> None:
        if self.f:
            self.f.close()
            self.f = None


def read_attrs(path: str | Path) -> dict:
    with h5py.File(_existing(path), "r") as f:
        return {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}


def read_results(path: str | Path) -> list[Record]:
    """The committed records, in the order they finished."""
    with h5py.File(_existing(path), "r") as f:
        if f.attrs.get("format") != FORMAT or "requests" not in f:
            raise ResultsError(f"{path}: not an edgeshard results file")
        g = f["requests"]
        n = int(g.attrs["count"])
        cols = {name: g[name][:n] for name in _COLUMNS}
    out = []
    for i in range(n):
        row = {}
        for name, dtype in _COLUMNS.items():
            v = cols[name][i]
            if dtype is _STR:
                v = v.decode() if isinstance(v, bytes) else str(v)
            elif name == "token_ids":
                v = [int(x) for x in v]
            elif name in ("prompt_tokens", "output_tokens"):
                v = int(v)
            else:
                v = float(v)
            row[name] = v
        out.append(Record(**row))
    return out


def _existing(path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise ResultsError(f"{path}: results file not found")
    return path
