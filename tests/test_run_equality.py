"""End to end under mpiexec: tokens equal to transformers `generate`, whatever the partition."""

from __future__ import annotations

import json

import pytest

from conftest import reference_tokens, run_mpi, write_job
from edgeshard_mpi.results import read_attrs, read_results

PROMPTS = [
    "The quick brown fox",
    "In a distant galaxy, a lone explorer discovered",
    "def fibonacci(n):",
    "Paris is",
    "The three laws of thermodynamics state that energy cannot be created or destroyed, and",
]


def _plan(stages: list[tuple[int, int, int]]) -> str:
    rows = ", ".join(f"{{rank = {r}, first = {f}, last = {l}}}" for r, f, l in stages)
    return f"[plan]\nstages = [{rows}]\n"


def _run_and_read(tmp_path, model, n, *, plan="", mbs=1, max_new=12, prompts=PROMPTS, generation=None):
    job = write_job(tmp_path, model, [{"id": f"p{i}", "prompt": p} for i, p in enumerate(prompts)],
                    extra=f"micro_batch_size = {mbs}", plan=plan,
                    generation=generation or f"max_new_tokens = {max_new}")
    proc = run_mpi(["run", str(job), "--no-progress"], n)
    assert proc.returncode == 0, proc.stderr
    # records are written as requests finish; put them back in prompt order
    by_id = {r.id: r for r in read_results(tmp_path / "job.h5")}
    assert sorted(by_id) == sorted(f"p{i}" for i in range(len(prompts)))
    return [by_id[f"p{i}"] for i in range(len(prompts))], proc


# tiny-random has 8 units: embed, 6 blocks, head.
TINY_PARTITIONS = {
    1: [[(0, 0, 7)]],
    2: [None, [(0, 0, 0), (1, 1, 7)], [(0, 0, 6), (1, 7, 7)]],  # embedding alone; head alone
    3: [None, [(0, 0, 0), (1, 1, 6), (2, 7, 7)], [(0, 0, 2), (2, 3, 5), (1, 6, 7)]],  # ranks out of order
    4: [None, [(0, 0, 0), (1, 1, 1), (2, 2, 6), (3, 7, 7)]],
}
CASES = [(n, p) for n, parts in TINY_PARTITIONS.items() for p in parts]


@pytest.fixture(scope="module")
def tiny_reference(tiny_path):
    return {mbs: reference_tokens(tiny_path, PROMPTS, 12, mbs) for mbs in (1, 3)}


@pytest.mark.parametrize("n,stages", CASES, ids=[f"{n}ranks-{'even' if p is None else p}" for n, p in CASES])
def test_tiny_equals_generate(tmp_path, tiny_path, tiny_reference, n, stages):
    records, _ = _run_and_read(tmp_path, "tiny-random", n, plan=_plan(stages) if stages else "")
    assert [r.token_ids for r in records] == tiny_reference[1]
    for r in records:
        assert r.output_tokens == len(r.token_ids) and r.prompt_tokens > 0
        assert r.finish_reason in ("eos", "length")


@pytest.mark.parametrize("n", [1, 3])
def test_tiny_mixed_length_micro_batch_equals_generate_on_the_batch(tmp_path, tiny_path, tiny_reference, n):
    # micro-batches of 3 prompts of different lengths: left padding, masks and positions as generate
    records, _ = _run_and_read(tmp_path, "tiny-random", n, mbs=3)
    assert [r.token_ids for r in records] == tiny_reference[3]


def test_idle_rank_is_left_out_and_does_not_spin(tmp_path, tiny_path, tiny_reference):
    # rank 2 takes no part: it must wait for the end without burning a core
    records, proc = _run_and_read(tmp_path, "tiny-random", 3, plan=_plan([(0, 0, 3), (1, 4, 7)]),
                                  max_new=12, prompts=PROMPTS * 4)
    assert [r.token_ids for r in records] == tiny_reference[1] * 4
    summary = json.loads(read_attrs(tmp_path / "job.h5")["summary"])
    idle = next(st for st in summary["ranks"] if st["rank"] == 2)
    assert idle["steps"] == 0
    # a spinning wait would use a whole core (cpu_s ~ wall_s); polling with sleeps stays far below
    assert idle["cpu_s"] < 0.25 * idle["wall_s"], idle


SMOL_PARTITIONS = [(1, None), (2, [(0, 0, 0), (1, 1, 31)]), (3, None), (4, [(0, 0, 9), (1, 10, 20), (2, 21, 30), (3, 31, 31)])]


@pytest.fixture(scope="module")
def smol_reference(smollm_path):
    return reference_tokens(smollm_path, PROMPTS[:3], 10, 3)


@pytest.mark.parametrize("n,stages", SMOL_PARTITIONS, ids=[f"{n}ranks" for n, _ in SMOL_PARTITIONS])
def test_smollm2_equals_generate(tmp_path, smollm_path, smol_reference, n, stages):
    records, proc = _run_and_read(tmp_path, "smollm2-135m", n, plan=_plan(stages) if stages else "", mbs=3,
                                  max_new=10, prompts=PROMPTS[:3])
    assert [r.token_ids for r in records] == smol_reference
    assert "tokens/s" in proc.stdout


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_activations_travel_as_raw_bytes(tmp_path, tiny_path, dtype):
    # numpy has no bfloat16: its 2-byte words cross MPI as int16 and must arrive bit for bit
    job = write_job(tmp_path, "tiny-random", [{"id": f"p{i}", "prompt": p} for i, p in enumerate(PROMPTS)],
                    extra=f'dtype = "{dtype}"\nmicro_batch_size = 2',
                    plan=_plan([(0, 0, 2), (1, 3, 5), (2, 6, 7)]))
    proc = run_mpi(["run", str(job), "--no-progress"], 3)
    assert proc.returncode == 0, proc.stderr
    by_id = {r.id: r.token_ids for r in read_results(tmp_path / "job.h5")}
    assert [by_id[f"p{i}"] for i in range(len(PROMPTS))] == reference_tokens(tiny_path, PROMPTS, 12, 2, dtype=dtype)


def test_seeded_sampling_is_the_same_whatever_the_partition(tmp_path, tiny_path):
    gen = "max_new_tokens = 16\ntemperature = 0.9\ntop_k = 50\ntop_p = 0.95\nseed = 1234"
    runs = []
    for i, (n, stages) in enumerate([(1, None), (3, [(0, 0, 0), (1, 1, 6), (2, 7, 7)]), (2, None)]):
        d = tmp_path / f"r{i}"
        d.mkdir()
        records, _ = _run_and_read(d, "tiny-random", n, plan=_plan(stages) if stages else "",
                                   mbs=2 if i == 2 else 1, generation=gen)
        runs.append([r.token_ids for r in records])
    assert runs[0] == runs[1] == runs[2]
    greedy = reference_tokens(tiny_path, PROMPTS, 16, 1)
    assert runs[0] != greedy  # it really sampled


def test_show_json_lists_every_request(tmp_path, tiny_path):
    records, _ = _run_and_read(tmp_path, "tiny-random", 2)
    import subprocess, sys
    out = subprocess.run([sys.executable, "-m", "edgeshard_mpi", "show", str(tmp_path / "job.h5"), "--json"],
                         capture_output=True, text=True, check=True).stdout
    rows = [json.loads(line) for line in out.splitlines()]
    assert sorted(r["id"] for r in rows) == sorted(r.id for r in records)
    assert all({"id", "prompt", "text", "token_ids", "finish_reason"} <= set(r) for r in rows)
    assert {r["id"]: r["token_ids"] for r in rows} == {r.id: r.token_ids for r in records}


def test_each_rank_sets_its_threads(tmp_path, tiny_path, tiny_reference):
    # torch would pick 1 thread under mpiexec (MPI_LOCALNRANKS): threads=N from the hostfile, else the
    # host's cores shared among its ranks (2 here), else 1 for an emulated device
    import os

    cores = len(os.sched_getaffinity(0))
    hosts = tmp_path / "t.hosts"
    hosts.write_text("# device: name=a threads=3\nlocalhost:1\n# device: name=b\nlocalhost:1\n")
    job = write_job(tmp_path, "tiny-random", [{"id": f"p{i}", "prompt": p} for i, p in enumerate(PROMPTS)],
                    plan=_plan([(0, 0, 3), (1, 4, 7)]))
    proc = run_mpi(["run", str(job), "--hostfile", str(hosts), "--no-progress"], 2, hostfile=hosts)
    assert proc.returncode == 0, proc.stderr
    want = [3, max(1, cores // 2)]
    summary = json.loads(read_attrs(tmp_path / "job.h5")["summary"])
    assert [st["threads"] for st in sorted(summary["ranks"], key=lambda st: st["rank"])] == want
    assert "0 a (pid" in proc.stderr and ", 3 threads, float32), 1 b (pid" in proc.stderr
    by_id = {r.id: r.token_ids for r in read_results(tmp_path / "job.h5")}
    assert [by_id[f"p{i}"] for i in range(len(PROMPTS))] == tiny_reference[1]
