"""OpenAI batch files in, OpenAI batch output out, checked against the `openai` package's own types."""

from __future__ import annotations

import json

from conftest import run_mpi, write_job

from edgeshard_mpi.jobs import Generation, choice_seed, read_prompts
from edgeshard_mpi.openai_batch import CHAT, COMPLETIONS


def _line(cid, url, **body):
    return {"custom_id": cid, "method": "POST", "url": url, "body": body}


LINES = [
    _line("chat-1", CHAT, model="gpt-4o-mini", messages=[{"role": "user", "content": "Name a colour."}], max_tokens=4),
    _line("chat-2", CHAT, model="smollm2-135m", messages=[{"role": "system", "content": "Be brief."},
                                                          {"role": "user", "content": "Count to three."}],
          max_completion_tokens=3, stop=["\n\n"], temperature=0.7, seed=5, top_k=20),
    _line("text-1", COMPLETIONS, prompt="The capital of France is", max_tokens=4),
    _line("text-2", COMPLETIONS, prompt="One, two,", max_tokens=4, repetition_penalty=1.3, min_tokens=2),
    _line("bad-field", CHAT, messages=[{"role": "user", "content": "hi"}], logit_bias={"50256": -100}),
    _line("bad-n", COMPLETIONS, prompt="hi", n=0),
    _line("bad-url", "/v1/embeddings", input="hi"),
    "this line is not JSON",
    _line("many", COMPLETIONS, prompt="My favourite fruit is", max_tokens=4, n=3, temperature=1.0, seed=7),
    _line("many-1", COMPLETIONS, prompt="My favourite fruit is", max_tokens=4, temperature=1.0,
          seed=choice_seed(7, 1)),  # what the second of "many"'s choices must be
    _line("lp-chat", CHAT, messages=[{"role": "user", "content": "Say hi."}], max_tokens=3, logprobs=True,
          top_logprobs=2),
    _line("lp-text", COMPLETIONS, prompt="Once upon a", max_tokens=3, logprobs=2),
]
IDS = ["chat-1", "chat-2", "text-1", "text-2", "bad-field", "bad-n", "bad-url", "8", "many", "many-1", "lp-chat",
       "lp-text"]


def test_batch_lines_map_to_requests_and_their_errors(tmp_path):
    p = tmp_path / "batch.jsonl"
    p.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in LINES))
    reqs = {r.id: r for r in read_prompts(p, Generation(max_new_tokens=9), strict=False)}
    assert list(reqs) == IDS
    assert reqs["lp-chat"].generation.sampling.logprobs == 2 == reqs["lp-text"].generation.sampling.logprobs
    assert reqs["text-1"].generation.sampling.logprobs == -1
    assert reqs["many"].generation.n == 3 and reqs["many"].generation.sampling.seed == 7
    c2, t2 = reqs["chat-2"], reqs["text-2"]
    assert c2.endpoint == CHAT and len(c2.messages) == 2 and c2.generation.max_new_tokens == 3
    assert c2.generation.stop == ("\n\n",) and (c2.generation.sampling.temperature, c2.generation.sampling.seed,
                                               c2.generation.sampling.top_k) == (0.7, 5, 20)
    assert t2.endpoint == COMPLETIONS and t2.prompt == "One, two," and t2.generation.sampling.min_tokens == 2
    assert reqs["text-1"].generation.sampling.temperature == 0.0  # not given: the job's, not OpenAI's 1.0
    assert all(reqs[k].error is None for k in ("chat-1", "chat-2", "text-1", "text-2"))
    assert "'logit_bias' not supported" in reqs["bad-field"].error
    assert "'n' must be in [1, 128]" in reqs["bad-n"].error and "/v1/embeddings" in reqs["bad-url"].error
    assert ":8: not valid JSON" in reqs["8"].error


def test_a_batch_file_runs_end_to_end_and_exports_as_openai_batch_output(tmp_path, smollm_path):
    from openai.types import Completion
    from openai.types.chat import ChatCompletion

    from edgeshard_mpi.cli import main

    job = write_job(tmp_path, "smollm2-135m", LINES, generation="max_new_tokens = 4")
    proc = run_mpi(["run", str(job), "--no-progress"], 1)
    assert proc.returncode == 0, proc.stderr
    assert "10 requests (4 could not run" in proc.stdout  # "many" runs as 3
    out = tmp_path / "out.jsonl"
    assert main(["export", str(tmp_path / "job.h5"), "--format", "openai", "--out", str(out)]) == 0
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    # one line a request, in the file's order, custom_ids one to one
    assert [x["custom_id"] for x in lines] == IDS
    for x in lines[:4] + lines[8:]:  # the good ones
        assert x["error"] is None and x["response"]["status_code"] == 200
        body = x["response"]["body"]
        url = next(line["url"] for line in LINES if isinstance(line, dict) and line["custom_id"] == x["custom_id"])
        typed = (ChatCompletion if url == CHAT else Completion).model_validate(body)  # the type its request asked
        assert typed.model == "smollm2-135m"  # the model that answered, whatever the request named
        assert len(typed.choices) == (3 if x["custom_id"] == "many" else 1)
        assert all(c.finish_reason in ("stop", "length") for c in typed.choices)
        text = typed.choices[0].message.content if isinstance(typed, ChatCompletion) else typed.choices[0].text
        assert isinstance(text, str) and typed.usage.completion_tokens >= 1
        assert typed.usage.total_tokens == typed.usage.prompt_tokens + typed.usage.completion_tokens
    assert lines[1]["response"]["body"]["usage"]["completion_tokens"] <= 3
    for x in lines[4:8]:
        assert x["response"] is None and x["error"]["message"]
    # n choices: each its own seed, stored together, the second equal to a request of that seed alone
    many = [c["text"] for c in lines[8]["response"]["body"]["choices"]]
    assert [c["index"] for c in lines[8]["response"]["body"]["choices"]] == [0, 1, 2] and len(set(many)) > 1
    assert many[1] == lines[9]["response"]["body"]["choices"][0]["text"]
    flat = tmp_path / "flat.jsonl"
    assert main(["export", str(tmp_path / "job.h5"), "--format", "jsonl", "--out", str(flat)]) == 0
    rows = [json.loads(x) for x in flat.read_text().splitlines()]
    assert [(r["id"], r["choice"]) for r in rows][8:11] == [("many", 0), ("many", 1), ("many", 2)]
    # the same flat records as a Parquet table
    import pyarrow.parquet

    table = tmp_path / "out.parquet"
    assert main(["export", str(tmp_path / "job.h5"), "--format", "parquet", "--out", str(table)]) == 0
    assert pyarrow.parquet.read_table(table).to_pylist() == rows
    assert [r["status"] for r in rows] == ["ok"] * 4 + ["error"] * 4 + ["ok"] * 6
    # logprobs: one entry a token, the chosen (greedy: the likeliest) first among its top 2
    chat = ChatCompletion.model_validate(lines[10]["response"]["body"]).choices[0].logprobs.content
    text = Completion.model_validate(lines[11]["response"]["body"]).choices[0].logprobs
    assert len(chat) == lines[10]["response"]["body"]["usage"]["completion_tokens"]
    for entry in chat:
        assert len(entry.top_logprobs) == 2 and entry.logprob == entry.top_logprobs[0].logprob <= 0
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
    assert len(text.tokens) == len(text.token_logprobs) == lines[11]["response"]["body"]["usage"]["completion_tokens"]
    assert all(len(t) == 2 for t in text.top_logprobs) and text.text_offset[0] == 0
