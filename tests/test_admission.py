"""Iteration-level admission: rows that join a running micro-batch give `generate`'s tokens.

In-process: one shard holding the whole model (eager, then compiled) runs the steps the scheduler
launches, built into step messages as the source loop builds them, and every request's greedy tokens
are checked against `generate` on that request alone, whatever its neighbours and whenever it joined.
Under mpiexec: the same across stages, against a run that admits whole micro-batches.
"""

from __future__ import annotations

import json
import random

import pytest
import torch

from conftest import reference_tokens, run_mpi, write_job
from family_models import random_model
from edgeshard_mpi.jobs import Generation, Request
from edgeshard_mpi.pipeline import Prompt, _apply, _Row, _sample_step, _step_of
from edgeshard_mpi.results import read_attrs, read_results
from edgeshard_mpi.scheduler import Scheduler
from edgeshard_mpi.trace import Tracer

# prompt lengths from 1 to 40 tokens and outputs from 1 to 14: rows finish at every step, prompts
# longer than the slot's axis join (the axis is re-laid out), one-token prompts join with no prefill
SHAPES = [(9, 5), (3, 2), (27, 9), (1, 3), (14, 1), (40, 12), (6, 4), (1, 1), (22, 14), (5, 6), (33, 3), (2, 8),
          (11, 2), (8, 10), (38, 5), (4, 7), (17, 1), (26, 4)]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    model, tok = random_model("llama")
    path = tmp_path_factory.mktemp("llama")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    rng = random.Random(0)
    prompts = [[rng.randrange(5, len(tok)) for _ in range(n)] for n, _ in SHAPES]
    want = []
    for ids, (_, new) in zip(prompts, SHAPES):
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=new, do_sample=False)[0, len(ids):].tolist()
        eos = model.generation_config.eos_token_id
        want.append(out[:next((i + 1 for i, t in enumerate(out) if t == eos), len(out))])
    return path, prompts, want, model.generation_config.eos_token_id


def _run(shard, prompts, eos: int, mbs: int, in_flight: int, admission: str = "row", prefill_chunk=None):
    """The source loop in one process: scheduler launches, step messages, the shard (or the shards of
    a pipeline, each passing its output on as a stage does), greedy tokens."""
    shards = shard if isinstance(shard, list) else [shard]
    rows = [_Row(Prompt(Request(f"r{i}", "test", "", generation=Generation(max_new_tokens=n)), ids, ""))
            for i, (ids, (_, n)) in enumerate(zip(prompts, SHAPES))]
    sched = Scheduler(((r, len(r.prompt.ids), r.gen.max_new_tokens) for r in rows), micro_batch_size=mbs,
                      in_flight=in_flight, admission=admission, row_budget=48, prefill_chunk=prefill_chunk)
    samplers, stats, tracer = {}, {"compute_s": 0.0, "steps": 0}, Tracer(enabled=False)
    queue, late, places, chunked = list(sched.start()), set(), set(), set()
    while queue:
        ln = queue.pop(0)
        step = _step_of(ln, pad_id=0)
        if ln.join and not ln.fresh:
            late |= {id(r.item) for r in ln.join}
        late |= {id(r.item) for r in ln.filled}
        chunked |= {id(r.item) for r in ln.filled}
        places |= {i for i, r in enumerate(ln.rows) if id(r.item) in late}
        for stage in shards[:-1]:
            step = step.passed_on(*_apply(stage, stats, tracer, step))
        tokens = _sample_step(samplers, step, *_apply(shards[-1], stats, tracer, step), {eos}).tensor.tolist()
        finished = []
        for i, (r, t) in enumerate(zip(ln.rows, tokens)):
            r.item.add(t, 0.0, {eos}, None)
            if r.item.finish:
                finished.append(i)
        more, done = sched.returned(ln.slot, finished)
        if done:
            for stage in shards:
                stage.release(ln.slot)
        queue += more
    return [r.tokens for r in rows], places, sched, chunked


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_rows_that_join_mid_flight_give_generates_tokens(llama, compiled):
    from edgeshard_mpi.models import ModelSpec
    from edgeshard_mpi.shard import Shard

    path, prompts, want, eos = llama
    spec = ModelSpec.load(path, "float32")
    shard = Shard(spec, 0, spec.num_units - 1, compile=compiled)
    if compiled:
        torch._dynamo.reset()
        shard.warm_up(4)
        graphs = shard.compiled.graphs
    got, places, sched, _ = _run(shard, prompts, eos, mbs=4, in_flight=2)
    assert got == want
    assert places == {0, 1, 2, 3}, "requests joined at every row position"
    # long prompts joining by chunks of 8 tokens, beside the other rows' decode steps
    got, places, _, chunked = _run(shard, prompts, eos, mbs=4, in_flight=2, prefill_chunk=8)
    assert got == want
    assert len(chunked) >= 4 and places == {0, 1, 2, 3}
    if compiled:
        assert shard.compiled.graphs == graphs, "a join or a re-layout compiled a graph after warm-up"
    else:  # the same requests admitted by whole micro-batches: the same tokens, emptier steps
        again, _, batch, _ = _run(shard, prompts, eos, mbs=4, in_flight=2, admission="batch")
        assert again == want
        assert sched.row_steps / sched.steps > 1.2 * batch.row_steps / batch.steps


def test_rows_joining_by_chunks_through_stages_without_blocks_give_generates_tokens(llama):
    # a pipeline whose first stage holds only the embedding and whose last only the head, as a plan
    # may cut it: those stages keep no cache, yet follow every row change
    from edgeshard_mpi.models import ModelSpec
    from edgeshard_mpi.shard import Shard

    path, prompts, want, eos = llama
    spec = ModelSpec.load(path, "float32")
    n = spec.num_units
    shards = [Shard(spec, 0, 0), Shard(spec, 1, n - 3), Shard(spec, n - 2, n - 2), Shard(spec, n - 1, n - 1)]
    got, places, _, chunked = _run(shards, prompts, eos, mbs=4, in_flight=2, prefill_chunk=8)
    assert got == want and len(chunked) >= 4 and places == {0, 1, 2, 3}


PROMPTS = ["The quick brown fox", "In a distant galaxy, a lone explorer discovered", "def fibonacci(n):", "Paris is",
           "Once upon a time", "The three laws of thermodynamics state that energy cannot be created or destroyed, and",
           "My favourite colour is", "Water boils at", "A", "Rivers run to the sea because"]
MAX_NEW = [12, 3, 9, 2, 14, 6, 1, 10, 5, 8]


def _penalized(tiny_path) -> tuple[list[dict], dict]:
    """Requests with a repetition penalty, min_tokens and stop token ids, and generate's tokens for each
    with the same settings. The stop ids are tokens the request makes without them, so they bite."""
    free = reference_tokens(tiny_path, [PROMPTS[0]], 14, 1)[0]
    stop, early = free[3], free[2]
    settings = {
        "rep": ({"repetition_penalty": 1.5}, {"repetition_penalty": 1.5}),
        "stop": ({"stop_token_ids": [stop]}, {"eos_token_id": [stop]}),
        "min": ({"stop_token_ids": [early], "min_tokens": 6}, {"eos_token_id": [early], "min_new_tokens": 6}),
    }
    lines, want = [], {}
    for name, (ours, theirs) in settings.items():
        lines.append({"id": name, "prompt": PROMPTS[0], "max_new_tokens": 14, **ours})
        want[name] = reference_tokens(tiny_path, [PROMPTS[0]], 14, 1, **theirs)[0]
    assert want["rep"] != free and len(want["stop"]) == 4 and len(want["min"]) > 6, (free, want)
    lines.append({"id": "lp", "prompt": PROMPTS[0], "max_new_tokens": 14, "logprobs": 3})
    want["lp"] = free
    return lines, want


def _generate_logprobs(path, prompt: str, n: int, k: int):
    """generate's raw logits for a request, as (each chosen token's logprob, each step's top-k ids and logprobs)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    enc = tok([prompt], return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=n, do_sample=False, output_logits=True, return_dict_in_generate=True)
    new = out.sequences[0, enc["input_ids"].shape[1]:].tolist()
    lps = [torch.log_softmax(step[0].float(), -1) for step in out.logits]
    tops = [torch.topk(lp, k) for lp in lps]
    return ([float(lp[t]) for lp, t in zip(lps, new)], sum((t.indices.tolist() for t in tops), []),
            sum((t.values.tolist() for t in tops), []))


def test_pipelined_row_admission_gives_generates_tokens_and_fuller_steps(tmp_path, tiny_path):
    want = {f"p{i}": reference_tokens(tiny_path, [p], n, 1)[0] for i, (p, n) in enumerate(zip(PROMPTS, MAX_NEW))}
    lines = [{"id": f"p{i}", "prompt": p, "max_new_tokens": n} for i, (p, n) in enumerate(zip(PROMPTS, MAX_NEW))]
    # requests with penalties join mid-flight too, and still give generate's tokens with the same settings
    penalized, want_penalized = _penalized(tiny_path)
    lines[3:3] = penalized
    want.update(want_penalized)
    job = write_job(tmp_path, "tiny-random", lines, extra="micro_batch_size = 3\nmicro_batches = 2")
    fill = {}
    for admission in ("row", "batch"):
        out = tmp_path / f"{admission}.h5"
        # row admission with chunks of 5: the longer prompts join (or start a slot) by chunks across the
        # stages, the others whole
        chunks = ["--prefill-chunk", "5"] if admission == "row" else []
        proc = run_mpi(["run", str(job), "--no-progress", "--admission", admission, "--output", str(out), *chunks], 3)
        assert proc.returncode == 0, proc.stderr
        records = read_results(out)
        assert {r.id: r.token_ids for r in records} == want
        # logprobs asked for: generate's raw distribution at every step, across ranks, whenever it joined
        lp = next(r for r in records if r.id == "lp")
        chosen, top_ids, top_values = _generate_logprobs(tiny_path, PROMPTS[0], len(lp.token_ids), 3)
        assert lp.top_ids == top_ids and len(lp.logprobs) == len(lp.token_ids)
        assert lp.logprobs == pytest.approx(chosen, abs=1e-4) and lp.top_logprobs == pytest.approx(top_values, abs=1e-4)
        assert all(not r.logprobs for r in records if r.id != "lp")
        summary = json.loads(read_attrs(out)["summary"])
        assert summary["admission"] == admission
        fill[admission] = summary["rows_per_step"]
        if admission == "row":
            assert summary["prefill_chunk"] == 5 and summary["chunked"] >= 2, summary
    # 10 requests of 1 to 14 tokens in micro-batches of 3: a batch waits for its longest row
    assert fill["row"] > 1.2 * fill["batch"], fill
