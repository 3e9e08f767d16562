"""Fuzzing the hostfile and prompt parsers: on any bytes they return a valid result or raise the
project's own error (HostfileError, JobError), never another exception and never a hang."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgeshard_mpi.cluster import DTYPES, MAX_SLOTS, QUANTIZE, Cluster, HostfileError, parse_hostfile
from edgeshard_mpi.jobs import MAX_LINE_BYTES, JobError, count_prompts, read_prompts

# Each example writes a file; a per-test temporary folder (not pytest's function-scoped tmp_path,
# which Hypothesis would share across examples anyway) keeps them apart from the repository.
_DIR = Path(tempfile.mkdtemp(prefix="edgeshard-fuzz-"))
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Pieces of real hostfiles, so that generated files reach past the first check more often than random bytes do
_HOST_PIECES = st.sampled_from([
    "# device: ", "name=", "memory=", "torch=", "slowdown=", "link=", "latency=", "dtype=", "quantize=", "speed=",
    "a", "b", "node1",
    "localhost", ":", "1", "2", "0", "-1", "x", "8GiB", "8GB", "512MiB", "1.5", "inf", "nan", "1e9", "cuda:0",
    "cpu", "50Mbit", "2ms", "=", " ", "\t", "#", "\r", "\n", "\n", "\n", "\ufeff", "\u00b2", "\xa0", "é",
    "99999999999", "9" * 400, "bfloat16", "float16", "int8", "none",
])
_host_text = st.lists(_HOST_PIECES, max_size=40).map("".join)


def _check_hostfile(data: bytes) -> None:
    path = _DIR / "fuzz.hosts"
    path.write_bytes(data)
    try:
        cluster = parse_hostfile(path)
    except HostfileError as e:
        assert str(e).startswith(str(path)), e  # every error names the file
        assert "\n" not in str(e), e
        return
    assert isinstance(cluster, Cluster) and 1 <= cluster.size <= MAX_SLOTS
    names = [d.name for d in cluster.devices]
    assert len(set(names)) == len(names)
    for d in cluster.devices:
        assert d.name and d.host and not any(c.isspace() for c in d.host)
        assert d.memory is None or d.memory > 0
        assert math.isfinite(d.slowdown) and d.slowdown >= 1
        assert d.bandwidth is None or 0 < d.bandwidth < math.inf
        assert 0 <= d.latency < math.inf
        assert d.dtype in (None, *DTYPES) and d.quantize in (None, *QUANTIZE)


@FUZZ
@given(st.binary(max_size=400))
def test_hostfile_on_any_bytes(data):
    _check_hostfile(data)


@FUZZ
@given(_host_text)
def test_hostfile_on_hostfile_like_text(text):
    _check_hostfile(text.encode("utf-8", "surrogatepass"))


# JSON-ish pieces for prompt lines
_PROMPT_PIECES = st.sampled_from([
    '{"id": ', '{"prompt": ', '"prompt": ', '"messages": ', '[{"role": "user", "content": "hi"}]', '"id": ',
    '"a"', '"b"', "1", "2", "-1", "true", "null", "NaN", "Infinity", '"max_new_tokens": ', '"temperature": ',
    '"top_k": ', '"top_p": ', '"seed": ', '"hello"', '""', '"\\ud800"', '"\\u0000"', ", ", "}", "{", "[", "]",
    "\n", "\n", "\r\n", "\ufeff", " ", "é", "1" * 5000, "[" * 3000,
])
_prompt_text = st.lists(_PROMPT_PIECES, max_size=30).map("".join)


def _check_prompts(data: bytes, suffix: str) -> None:
    path = _DIR / f"fuzz{suffix}"
    path.write_bytes(data)
    got = []
    try:
        for req in read_prompts(path):
            got.append(req)
    except JobError as e:
        assert str(e).startswith(f"{path}:"), e  # every error names the file and line
        assert "\n" not in str(e), e
    ids = [r.id for r in got]
    assert len(set(ids)) == len(ids)
    for r in got:
        assert r.where.startswith(f"{path}:") and r.id
        assert (r.prompt is None) != (r.messages is None)
        text = r.prompt if r.prompt is not None else "".join(m["content"] for m in r.messages)
        text.encode("utf-8")  # writable to the results file: no lone surrogates
        assert len(text.encode("utf-8")) <= MAX_LINE_BYTES
        assert r.generation.max_new_tokens >= 1 and math.isfinite(r.generation.sampling.temperature)
    # the progress count (chunked, bytes) never counts fewer prompts than the reader yields
    assert len(got) <= count_prompts(path)

@FUZZ
@given(st.binary(max_size=400), st.sampled_from([".jsonl", ".txt"]))
def test_prompt_reader_on_any_bytes(data, suffix):
    _check_prompts(data, suffix)


@FUZZ
@given(_prompt_text)
def test_prompt_reader_on_jsonl_like_text(text):
    _check_prompts(text.encode("utf-8", "surrogatepass"), ".jsonl")
