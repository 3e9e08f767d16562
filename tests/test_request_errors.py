"""A request that cannot run is recorded as an error and the job goes on; --strict stops at the first."""

from __future__ import annotations

import json

import h5py
import pytest
from conftest import run_mpi, write_job

from edgeshard_mpi.jobs import MAX_LINE_BYTES, JobError, read_prompts
from edgeshard_mpi.results import Record, ResultWriter, read_attrs, read_results


def test_bad_lines_come_as_errors_with_their_ids_and_the_reading_goes_on(tmp_path):
    p = tmp_path / "p.jsonl"
    lines = [b'{"id": "a", "prompt": "fine"}',
             b'{"id": "b", "prompt": ',  # cut short
             b'{"id": "c", "prompt": "x", "frobnicate": 1}',  # an unknown field
             b'{"id": "d", "prompt": "' + b"y" * (MAX_LINE_BYTES + 10) + b'"}',  # too long: skipped whole
             b'{"id": "a", "prompt": "again"}',  # a repeated id
             b'{"prompt": "\xff"}',  # not UTF-8
             b'{"id": "e", "prompt": "also fine", "min_p": 2}',  # out of range
             b'{"id": "f", "prompt": "last"}']
    p.write_bytes(b"\n".join(lines) + b"\n")
    got = [(r.id, r.prompt, r.error) for r in read_prompts(p, strict=False)]
    assert [(i, prompt) for i, prompt, e in got if not e] == [("a", "fine"), ("f", "last")]
    errors = {i: e for i, _, e in got if e}
    # its own id if it parses to one that is free, else its line number
    assert list(errors) == ["2", "c", "4", "5", "6", "e"]
    assert errors["2"].startswith(f"{p}:2: not valid JSON")
    assert "frobnicate" in errors["c"] and f"{p}:4: line longer than" in errors["4"]
    assert "appears twice" in errors["5"] and "not UTF-8" in errors["6"] and "min_p must be in [0, 1]" in errors["e"]
    with pytest.raises(JobError, match=":2: not valid JSON"):
        list(read_prompts(p))  # strict, as before


def test_a_format_1_file_reads_as_all_ok_and_resumes_in_the_current_format(tmp_path):
    path = tmp_path / "old.h5"
    rec = Record("r1", "p.jsonl:1", "hi", "there", [5, 6], "length", 1, 2, 1.0, 2.0)
    with h5py.File(path, "w") as f:  # what format 1 wrote: no status or error columns
        f.attrs["format"] = "edgeshard-results/1"
        f.attrs["job"] = "model = 'x'"
        g = f.create_group("requests")
        format_1 = ("id", "where", "prompt", "text", "token_ids", "finish_reason", "prompt_tokens", "output_tokens",
                    "ttft_ms", "ms_per_token")
        for name in format_1:
            value = getattr(rec, name)
            dtype = h5py.vlen_dtype("int32") if name == "token_ids" else (
                h5py.string_dtype() if isinstance(value, str) else type(value))
            ds = g.create_dataset(name, shape=(1,), maxshape=(None,), dtype=dtype)
            ds[0] = value
        g.attrs["count"] = 1
    assert read_results(path) == [rec]
    w = ResultWriter(path, {}, resume=True)
    err = Record("r2", "p.jsonl:2", "", "", [], "error", 0, 0, float("nan"), float("nan"), "error", "p.jsonl:2: bad")
    w.append([err])
    w.close(complete=True)
    assert read_attrs(path)["format"] == "edgeshard-results/2" and read_attrs(path)["job"] == "model = 'x'"
    got = read_results(path)
    assert got[0] == rec and (got[1].id, got[1].status, got[1].error) == ("r2", "error", "p.jsonl:2: bad")


def test_a_job_with_a_bad_line_after_the_read_ahead_and_an_overlong_prompt_finishes_every_other(tmp_path, tiny_path):
    lines = [{"id": f"q{i}", "prompt": f"question number {i}"} for i in range(262)]
    lines[4] = {"id": "long", "prompt": "word " * 300}  # beyond tiny-random's 256-token context
    lines[259] = '{"id": "broken", "prompt": "no end'  # line 260, after the 256 read ahead
    job = write_job(tmp_path, "tiny-random", lines, generation="max_new_tokens = 2",
                    extra="micro_batch_size = 8")
    proc = run_mpi(["run", str(job), "--no-progress"], 2)
    assert proc.returncode == 0, proc.stderr
    assert "260 requests (2 could not run" in proc.stdout
    records = read_results(tmp_path / "job.h5")
    assert len(records) == 262 and len({r.id for r in records}) == 262
    errors = {r.id: r for r in records if r.status == "error"}
    assert set(errors) == {"long", "260"}  # a line that does not parse is known by its number
    assert "exceeds the model's context of 256 tokens" in errors["long"].error and ":5:" in errors["long"].error
    assert ":260: not valid JSON" in errors["260"].error
    assert all(r.finish_reason == "error" and not r.token_ids for r in errors.values())
    assert all(r.output_tokens >= 1 and r.finish_reason != "error" for r in records if r.id not in errors)
    assert json.loads(read_attrs(tmp_path / "job.h5")["summary"])["errors"] == 2
    # a resume keeps the error records as they are: nothing is left to run
    again = run_mpi(["run", str(job), "--no-progress", "--resume"], 2)
    assert again.returncode == 0, again.stderr
    key = lambda rs: [(r.id, r.status, r.error, r.token_ids) for r in rs]  # noqa: E731 (error records hold NaN times)
    assert key(read_results(tmp_path / "job.h5")) == key(records)
    # --retry-errors runs them again: the line fixed now runs, the prompt still too long fails again
    prompts = tmp_path / "job-prompts.jsonl"
    prompts.write_text(prompts.read_text().replace('"no end\n', '"no end"}\n'))
    retry = run_mpi(["run", str(job), "--no-progress", "--resume", "--retry-errors"], 2)
    assert retry.returncode == 0, retry.stderr
    after = {r.id: r for r in read_results(tmp_path / "job.h5")}
    assert len(after) == 262 == len(read_results(tmp_path / "job.h5"))  # one record an id
    assert after["broken"].status == "ok" and after["broken"].output_tokens >= 1 and "260" not in after
    assert after["long"].status == "error"
    # --strict stops at the first request that cannot run, naming it
    strict = run_mpi(["run", str(job), "--no-progress", "--overwrite", "--strict"], 2)
    assert strict.returncode != 0 and ":5: prompt of" in strict.stderr


def test_a_file_that_is_not_a_prompt_file_stops_at_once(tmp_path, tiny_path):
    job = write_job(tmp_path, "tiny-random", ["def main():", "    return 1", "", "main()"])
    proc = run_mpi(["run", str(job), "--no-progress"], 1)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "none of the first 3 requests can run; the first: " in proc.stderr and ":1: not valid JSON" in proc.stderr
    assert not (tmp_path / "job.h5").exists()
