"""Bad input under mpiexec: one clear line naming the file, line or field; non-zero exit; never a hang."""

from __future__ import annotations

import pytest

from conftest import run_mpi, write_job

OK = [{"id": "a", "prompt": "Hello there"}, {"id": "b", "prompt": "General Kenobi"}]


def _fails(proc, *needles):
    assert proc.returncode != 0, proc.stdout + proc.stderr
    err = proc.stderr
    lines = [l for l in err.splitlines() if l.startswith("edgeshard: error")]
    assert lines, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert "Traceback" not in err, err
    return lines[0]


def test_missing_model_folder(tmp_path):
    job = write_job(tmp_path, tmp_path / "no-such-model", OK)
    _fails(run_mpi(["run", str(job)], 2, timeout=60), "no-such-model", "model folder not found")


def test_malformed_hostfile_line(tmp_path, tiny_path):
    hosts = tmp_path / "bad.hosts"
    hosts.write_text("# device: name=a memory=1GiB\nlocalhost:1\n# device: name=b memory=lots\nlocalhost:1\n")
    job = write_job(tmp_path, "tiny-random", OK)
    _fails(run_mpi(["run", str(job), "--hostfile", str(hosts)], 2, timeout=60), "bad.hosts:3", "memory")


def test_more_ranks_than_slots(tmp_path, tiny_path):
    hosts = tmp_path / "two.hosts"
    hosts.write_text("# device: name=a\nlocalhost:1\n# device: name=b\nlocalhost:1\n")
    job = write_job(tmp_path, "tiny-random", OK)
    _fails(run_mpi(["run", str(job), "--hostfile", str(hosts)], 3, timeout=60), "two.hosts", "2 slot(s)", "3 ranks")


def test_prompt_line_not_json(tmp_path, tiny_path):
    job = write_job(tmp_path, "tiny-random", [OK[0], '{"id": "b", "prompt": "unterminated'])
    _fails(run_mpi(["run", str(job)], 2, timeout=60), "job-prompts.jsonl:2", "not valid JSON")


def test_empty_prompt(tmp_path, tiny_path):
    job = write_job(tmp_path, "tiny-random", [OK[0], {"id": "b", "prompt": "   "}])
    _fails(run_mpi(["run", str(job)], 2, timeout=60), "job-prompts.jsonl:2", "'prompt' is empty")


def test_prompt_longer_than_context(tmp_path, tiny_path):
    long = " ".join(["word"] * 400)  # tiny-random's context is 256 tokens
    job = write_job(tmp_path, "tiny-random", [OK[0], {"id": "long", "prompt": long}])
    _fails(run_mpi(["run", str(job)], 2, timeout=60), "job-prompts.jsonl:2", "context of 256")


@pytest.mark.parametrize("stages,needle", [
    ("{rank = 0, first = 0, last = 3}, {rank = 1, first = 5, last = 7}", "misses unit(s) 4"),
    ("{rank = 0, first = 0, last = 4}, {rank = 1, first = 4, last = 7}", "unit 4 is in stage 0 and stage 1"),
])
def test_plan_that_misses_or_repeats_units(tmp_path, tiny_path, stages, needle):
    job = write_job(tmp_path, "tiny-random", OK, plan=f"[plan]\nstages = [{stages}]\n")
    _fails(run_mpi(["run", str(job)], 2, timeout=60), "[plan]", needle)


def test_results_file_is_never_overwritten_silently(tmp_path, tiny_path):
    job = write_job(tmp_path, "tiny-random", OK)
    (tmp_path / "job.h5").write_text("precious")
    _fails(run_mpi(["run", str(job)], 1, timeout=60), "job.h5", "--overwrite")
    assert (tmp_path / "job.h5").read_text() == "precious"


def test_exception_on_rank_2_of_3_ends_the_job(tmp_path, tiny_path):
    job = write_job(tmp_path, "tiny-random", OK)
    line = _fails(run_mpi(["run", str(job), "--no-progress"], 3, timeout=90, env={"EDGESHARD_FAULT": "2:1"}),
                  "rank 2 of 3", "injected fault")
    assert "step 1" in line


def test_shard_larger_than_its_device_memory(tmp_path, tiny_path):
    hosts = tmp_path / "small.hosts"
    hosts.write_text("# device: name=big memory=1GiB\nlocalhost:1\n# device: name=tiny-board memory=1MiB\nlocalhost:1\n")
    job = write_job(tmp_path, "tiny-random", OK)
    _fails(run_mpi(["run", str(job), "--hostfile", str(hosts)], 2, timeout=60), "tiny-board", "1.00 MiB", "need")
