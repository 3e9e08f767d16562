from __future__ import annotations

import math

import h5py
import pytest

from edgeshard_mpi.results import Record, ResultsError, ResultWriter, read_attrs, read_results


def _rec(i):
    return Record(f"r{i}", f"p.jsonl:{i}", f"prompt {i} é", f"text {i} ✓", list(range(i)), "length", 3, i, 1.5, 0.25)


def test_roundtrip_and_append(tmp_path):
    path = tmp_path / "r.h5"
    w = ResultWriter(path, {"job": "model = 'x'", "plan": {"stages": []}})
    w.append([_rec(1), _rec(2)])
    w.append([_rec(3)])
    # readable while still open for writing: committed rows only
    assert [r.id for r in read_results(path)] == ["r1", "r2", "r3"]
    w.close()
    got = read_results(path)
    assert got == [_rec(1), _rec(2), _rec(3)]
    assert read_attrs(path)["job"] == "model = 'x'"


def test_uncommitted_rows_are_not_read(tmp_path):
    path = tmp_path / "r.h5"
    w = ResultWriter(path, {})
    w.append([_rec(1)])
    w.close()
    with h5py.File(path, "a") as f:  # a crash between growing the columns and raising `count`
        for name in f["requests"]:
            f["requests"][name].resize((2,))
    assert [r.id for r in read_results(path)] == ["r1"]


def test_never_overwrites_silently(tmp_path):
    path = tmp_path / "r.h5"
    path.write_text("keep me")
    with pytest.raises(ResultsError, match="--resume .*--overwrite"):
        ResultWriter(path, {})
    assert path.read_text() == "keep me"
    ResultWriter(path, {}, overwrite=True).close()
    assert read_results(path) == []


def test_nan_time_per_token_for_one_token(tmp_path):
    path = tmp_path / "r.h5"
    w = ResultWriter(path, {})
    w.append([Record("a", "w", "p", "t", [5], "length", 2, 1, 3.0, float("nan"))])
    w.close()
    assert math.isnan(read_results(path)[0].ms_per_token)


def test_resume_keeps_a_journal_that_can_rebuild_the_whole_file(tmp_path):
    path = tmp_path / "r.h5"
    w = ResultWriter(path, {"job": "first"})
    w.append([_rec(1), _rec(2)])
    w.close(complete=True)  # a finished run drops its journal
    assert not (tmp_path / "r.h5.journal").exists()
    w = ResultWriter(path, {"created": "later"}, resume=True)
    w.append([_rec(3)])
    w.close()  # killed: the journal stays
    path.write_bytes(b"not hdf5 any more")  # and the kill left the file unreadable
    assert ResultWriter.check_target(path, resume=True) == {"r1", "r2", "r3"}
    assert read_results(path) == [_rec(1), _rec(2), _rec(3)]
    assert read_attrs(path)["job"] == "first"


def test_a_torn_last_journal_line_loses_nothing_after_it(tmp_path):
    path = tmp_path / "r.h5"
    w = ResultWriter(path, {})
    w.append([_rec(1)])
    w.close()
    with open(tmp_path / "r.h5.journal", "a") as f:
        f.write('{"record": {"id": "r2", "wh')  # a writer killed in the middle of a line
    w = ResultWriter(path, {}, resume=True)
    w.append([_rec(2)])
    w.close()
    path.write_bytes(b"")
    assert ResultWriter.check_target(path, resume=True) == {"r1", "r2"}
    assert read_results(path) == [_rec(1), _rec(2)]


def test_files_that_are_not_our_results_get_a_clear_error(tmp_path):
    from edgeshard_mpi.cli import main

    notes = tmp_path / "notes.h5"
    notes.write_text("not results at all\n")
    with pytest.raises(ResultsError, match="notes.h5: not an HDF5 file"):
        read_results(notes)
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f.create_dataset("x", data=[1, 2])
    with pytest.raises(ResultsError, match="other.h5: an HDF5 file, but not an edgeshard results file"):
        read_attrs(other)
    newer = tmp_path / "newer.h5"
    ResultWriter(newer, {}).close(complete=True)
    with h5py.File(newer, "a") as f:
        f.attrs["format"] = "edgeshard-results/99"
    with pytest.raises(ResultsError, match="newer.h5: written by a newer edgeshard .format edgeshard-results/99."):
        read_results(newer)
    # the command line says so in one line, with no traceback
    for path in (notes, other, newer):
        assert main(["show", str(path)]) != 0


def test_show_into_a_pipe_closed_early_ends_quietly(tmp_path):
    """`edgeshard show F | head`: the reader leaves after a line; show ends with status 0, no traceback."""
    import os
    import subprocess
    import sys

    from conftest import ROOT

    path = tmp_path / "r.h5"
    w = ResultWriter(path, {"job": "model = 'x'"})
    w.append([Record(f"r{i}", f"p.jsonl:{i}", "prompt", "text " * 40, [1, 2], "length", 3, 2, 1.5, 0.25)
              for i in range(2000)])  # far more than a pipe holds
    w.close(complete=True)
    proc = subprocess.Popen([sys.executable, "-m", "edgeshard_mpi", "show", str(path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stdout.readline().startswith(b"--- r0 ")
    proc.stdout.close()
    assert proc.wait(timeout=60) == 0
    assert proc.stderr.read() == b""
