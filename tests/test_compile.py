"""A compiled decode step (`compile = true`): the same tokens as eager steps and as `generate`, and
every graph a run needs compiled before the run starts."""

from __future__ import annotations

import re

import torch

from conftest import reference_tokens, run_mpi, write_job
from family_models import WINDOW, random_model
from edgeshard_mpi.results import read_results

PROMPTS = ["The quick brown fox", "In a distant galaxy, a lone explorer discovered", "def fibonacci(n):",
           "Paris is", "The three laws of thermodynamics state that energy cannot be created or destroyed, and"]


def _greedy(shard, ids, pads, new, capacity, leave_at=None):
    """Greedy tokens of a shard holding the whole model; the middle row leaves after `leave_at` steps."""
    x = shard.forward(0, ids, pads, capacity).argmax(-1)[:, None]
    out, rows = [x], list(range(ids.shape[0]))
    for i in range(new - 1):
        if i == leave_at:
            keep = [r for r in range(len(rows)) if r != len(rows) // 2]
            shard.select(0, keep)
            x, out, rows = x[keep], [o[keep] for o in out], [rows[r] for r in keep]
        x = shard.forward(0, x).argmax(-1)[:, None]
        out.append(x)
    shard.release(0)
    return rows, torch.cat(out, 1)


def test_compiled_steps_equal_eager_ones_past_the_window_and_compile_only_at_warm_up(tmp_path):
    """Gemma 2 (sliding layers every other layer, soft-caps): micro-batches of several sizes, padded,
    a row leaving mid-way, capacities in different rounding buckets, prompts and outputs past the
    window: the compiled shard's greedy tokens equal the eager one's, and after warm_up(4) no step
    compiles again."""
    from edgeshard_mpi.models import ModelSpec
    from edgeshard_mpi.shard import Shard

    model, tok = random_model("gemma2")
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    spec = ModelSpec.load(tmp_path, "float32")
    eager = Shard(spec, 0, spec.num_units - 1)
    torch._dynamo.reset()  # graphs are counted per process: start from none
    compiled = Shard(spec, 0, spec.num_units - 1, compile=True)
    compiled.warm_up(4)
    graphs = compiled.compiled.graphs
    assert graphs == 2, "one graph for a single row, one for any other count"
    gen = torch.Generator().manual_seed(0)
    for rows, pads, new, leave_at in [(1, [0], 3 * WINDOW, None), (4, [0, 5, 0, 2], 2 * WINDOW, 5),
                                      (3, [0, 0, 0], 300, WINDOW), (2, [1, 0], 10, 3)]:
        ids = torch.randint(5, 1000, (rows, WINDOW + 4), generator=gen)
        capacity = ids.shape[1] + new
        want = _greedy(eager, ids, pads, new, capacity, leave_at)
        got = _greedy(compiled, ids, pads, new, capacity, leave_at)
        assert got[0] == want[0] and torch.equal(got[1], want[1]), (rows, pads, new)
    assert compiled.compiled.graphs == graphs, "a step compiled after warm-up"


def test_compiled_run_equals_generate_and_compiles_before_it(tmp_path, tiny_path):
    """2 ranks, micro-batches of 3 (the last of 2): tokens equal `generate`'s on the same batches, and
    each rank compiled its 2 graphs before the run, none during it."""
    job = write_job(tmp_path, "tiny-random", [{"id": f"p{i}", "prompt": p} for i, p in enumerate(PROMPTS)],
                    extra="micro_batch_size = 3\ncompile = true",
                    plan="[plan]\nstages = [{rank = 0, first = 0, last = 3}, {rank = 1, first = 4, last = 7}]")
    proc = run_mpi(["run", str(job), "--no-progress"], 2, timeout=400)
    assert proc.returncode == 0, proc.stderr
    by_id = {r.id: r for r in read_results(tmp_path / "job.h5")}
    assert [by_id[f"p{i}"].token_ids for i in range(len(PROMPTS))] == reference_tokens(tiny_path, PROMPTS, 12, 3)
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("compiled decode steps"))
    assert re.findall(r"rank (\d) [\d.]+ s \((\d+) graphs\)", line) == [("0", "2"), ("1", "2")], line
