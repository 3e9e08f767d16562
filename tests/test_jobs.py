from __future__ import annotations

import json

import pytest

from edgeshard_mpi.jobs import Job, JobError, read_prompts
from edgeshard_mpi.scheduler import DEFAULT_PREFILL_CHUNK, prefill_chunk_for


def _job(tmp_path, text):
    p = tmp_path / "j.toml"
    p.write_text(text)
    return p


def test_job_fields_and_relative_paths(tmp_path):
    job = Job.load(_job(tmp_path, 'model = "smollm2-135m"\nprompts = "p.jsonl"\noutput = "out/r.h5"\n'
                                  'micro_batch_size = 4\n[generation]\nmax_new_tokens = 8\ntemperature = 1\n'
                                  'stop = "\\n\\n"\n[plan]\nsplit = "even"\n'))
    assert job.model == "smollm2-135m"  # a preset stays a name
    assert job.prompts == str(tmp_path / "p.jsonl") and job.output == str(tmp_path / "out" / "r.h5")
    assert job.micro_batch_size == 4 and job.generation.max_new_tokens == 8
    assert job.generation.sampling.temperature == 1.0 and job.generation.stop == ("\n\n",)
    assert job.plan == {"split": "even"}


def test_prefill_chunk_zero_means_whole_prompts_and_unset_the_default_for_the_plan(tmp_path):
    chunk = lambda extra: Job.load(_job(tmp_path, 'model = "m"\nprompts = "p.jsonl"\n' + extra)).prefill_chunk
    assert (chunk("prefill_chunk = 0\n"), chunk("prefill_chunk = 32\n"), chunk("")) == (0, 32, None)
    # unset: chunks on a pipeline, none on one stage; 0: none anywhere; N: N anywhere
    default = DEFAULT_PREFILL_CHUNK
    assert [prefill_chunk_for(stages, None) for stages in (1, 2, 4)] == [None, default, default]
    assert [prefill_chunk_for(stages, 0) for stages in (1, 4)] == [None, None]
    assert [prefill_chunk_for(stages, 32) for stages in (1, 4)] == [32, 32]


@pytest.mark.parametrize("text,needle", [
    ('prompts = "p.jsonl"\n', "field 'model' is required"),
    ('model = "m"\nprompts = "p.jsonl"\nmodle = 1\n', "unknown field(s) 'modle'"),
    ('model = "m"\nprompts = "p.jsonl"\nmicro_batch_size = 0\n', "'micro_batch_size' must be >= 1"),
    ('model = "m"\nprompts = "p.jsonl"\nmicro_batch_size = "4"\n', "'micro_batch_size' must be an integer"),
    ('model = "m"\nprompts = "p.jsonl"\ndtype = "int8"\n', "field 'dtype'"),
    ('model = "m"\nprompts = "p.jsonl"\n[generation]\nmax_new_tokens = -3\n', "'max_new_tokens' must be >= 1"),
    ('model = "m"\nprompts = "p.jsonl"\n[generation]\ntop_p = 0\n', "top_p"),
    ('model = "m"\nprompts = "p.jsonl"\n[generation]\ntemprature = 1\n', "[generation]: unknown field"),
    ('model = "m"\nprompts = "p.jsonl"\n[plan]\nsplit = "fair"\n', "split must be"),
    ('model = "m"\nprompts = "p.jsonl"\nprefill_chunk = -1\n', "'prefill_chunk' must be >= 0 tokens (0: no chunks), got -1"),
    ('model = "m"\nprompts = ', "not valid TOML"),
])
def test_job_errors_name_the_field(tmp_path, text, needle):
    with pytest.raises(JobError) as e:
        Job.load(_job(tmp_path, text))
    assert needle in str(e.value) and "j.toml" in str(e.value)


def test_prompt_files(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text(json.dumps({"id": "a", "prompt": "hi"}) + "\n\n" +
                 json.dumps({"messages": [{"role": "user", "content": "yo"}], "max_new_tokens": 3, "seed": 9}) + "\n")
    reqs = list(read_prompts(p))
    assert [r.id for r in reqs] == ["a", "3"]  # no id: the line number
    assert reqs[1].messages[0]["content"] == "yo" and reqs[1].generation.max_new_tokens == 3
    assert reqs[1].generation.sampling.seed == 9
    t = tmp_path / "p.txt"
    t.write_text("first prompt\n\nsecond prompt\r\n")
    assert [(r.id, r.prompt) for r in read_prompts(t)] == [("1", "first prompt"), ("3", "second prompt")]


@pytest.mark.parametrize("line,needle", [
    ('{"id": "x", "prompt": "unterminated', "p.jsonl:2: not valid JSON"),
    ('{"id": "x", "prompt": ""}', "p.jsonl:2: field 'prompt' is empty"),
    ('{"id": "x"}', "p.jsonl:2: give exactly one of 'prompt' or 'messages'"),
    ('{"id": "x", "prompt": "a", "temperature": -1}', "p.jsonl:2: temperature"),
    ('{"id": "a", "prompt": "again"}', "p.jsonl:2: id 'a' appears twice"),
    ('["a list"]', "p.jsonl:2: expected a JSON object"),
    ('{"id": "x", "prompt": "a", "colour": 1}', "p.jsonl:2: unknown field(s) 'colour'"),
    ('{"id": "x", "messages": [{"role": "user"}]}', "p.jsonl:2: field 'messages'"),
])
def test_prompt_errors_name_file_and_line(tmp_path, line, needle):
    p = tmp_path / "p.jsonl"
    p.write_text('{"id": "a", "prompt": "fine"}\n' + line + "\n")
    with pytest.raises(JobError) as e:
        list(read_prompts(p))
    assert needle in str(e.value)


def test_shipped_demo_job_loads():
    from conftest import ROOT

    job = Job.load(ROOT / "jobs" / "demo.toml")
    assert len(list(read_prompts(job.prompts, job.generation))) >= 4
