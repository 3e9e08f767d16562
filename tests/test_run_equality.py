"""End to end under mpiexec: tokens equal to transformers `generate`, whatever the partition."""

from __future__ import annotations

import json

import pytest

from conftest import Launches, reference_tokens, run_mpi, write_job
from edgeshard_mpi.results import read_attrs, read_results

PROMPTS = [
    "The quick brown fox",
    "In a distant galaxy, a lone explorer discovered",
    "def fibonacci(n):",
    "Paris is",
    "The three laws of thermodynamics state that energy cannot be created or destroyed, and",
]


# tiny-random has 8 units: embed, 6 blocks, head.
TINY_PARTITIONS = {
    1: [[(0, 0, 7)]],
    2: [None, [(0, 0, 0), (1, 1, 7)], [(0, 0, 6), (1, 7, 7)]],  # embedding alone; head alone
    3: [None, [(0, 0, 0), (1, 1, 6), (2, 7, 7)], [(0, 0, 2), (2, 3, 5), (1, 6, 7)]],  # ranks out of order
    4: [None, [(0, 0, 0), (1, 1, 1), (2, 2, 6), (3, 7, 7)]],
}
CASES = [(n, p) for n, parts in TINY_PARTITIONS.items() for p in parts]
SMOL_PARTITIONS = [(1, None), (2, [(0, 0, 0), (1, 1, 31)]), (3, None),
                   (4, [(0, 0, 9), (1, 10, 20), (2, 21, 30), (3, 31, 31)])]
SEEDED = [(1, None, 1), (3, [(0, 0, 0), (1, 1, 6), (2, 7, 7)], 1), (2, None, 2)]  # ranks, stages, micro-batch
SAMPLING = "max_new_tokens = 16\ntemperature = 0.9\ntop_k = 50\ntop_p = 0.95\nseed = 1234"

# Every job of this module, by name: those of one rank count share one launch (conftest.Launch).
JOBS = {
    **{f"tiny-{n}-{i}": dict(n=n, stages=st) for n, parts in TINY_PARTITIONS.items() for i, st in enumerate(parts)},
    **{f"mixed-{n}": dict(n=n, mbs=3) for n in (1, 3)},
    "idle": dict(n=3, stages=[(0, 0, 3), (1, 4, 7)], prompts=PROMPTS * 4),
    **{f"smol-{n}": dict(n=n, model="smollm2-135m", stages=st, mbs=3, prompts=PROMPTS[:3],
                         generation="max_new_tokens = 10") for n, st in SMOL_PARTITIONS},
    **{f"half-{dt}": dict(n=3, stages=[(0, 0, 2), (1, 3, 5), (2, 6, 7)], mbs=2, extra=f'dtype = "{dt}"')
       for dt in ("bfloat16", "float16")},
    **{f"seeded-{i}": dict(n=n, stages=st, mbs=mbs, generation=SAMPLING) for i, (n, st, mbs) in enumerate(SEEDED)},
}


def _plan(stages: list[tuple[int, int, int]]) -> str:
    rows = ", ".join(f"{{rank = {r}, first = {f}, last = {l}}}" for r, f, l in stages)
    return f"[plan]\nstages = [{rows}]\n"


@pytest.fixture(scope="module")
def launched(tmp_path_factory, tiny_path, smollm_path):
    """name -> the Launch that ran that job: one launch for each rank count's jobs."""
    root = tmp_path_factory.mktemp("equality")
    jobs = {}
    for name, spec in JOBS.items():
        (root / name).mkdir()
        jobs[name] = write_job(root / name, spec.get("model", "tiny-random"),
                               [{"id": f"p{i}", "prompt": p} for i, p in enumerate(spec.get("prompts", PROMPTS))],
                               extra=f"micro_batch_size = {spec.get('mbs', 1)}\n{spec.get('extra', '')}",
                               plan=_plan(spec["stages"]) if spec.get("stages") else "",
                               generation=spec.get("generation", "max_new_tokens = 12"))
    return Launches(jobs, lambda name: (JOBS[name]["n"], ()), timeout=600)


@pytest.fixture(scope="module")
def tiny_reference(tiny_path):
    return {mbs: reference_tokens(tiny_path, PROMPTS, 12, mbs) for mbs in (1, 3)}


@pytest.mark.parametrize("n,i", [(n, i) for n, parts in TINY_PARTITIONS.items() for i in range(len(parts))],
                         ids=[f"{n}ranks-{'even' if p is None else p}" for n, p in CASES])
def test_tiny_equals_generate(launched, tiny_reference, n, i):
    records = launched(f"tiny-{n}-{i}").results(f"tiny-{n}-{i}")
    assert [r.token_ids for r in records] == tiny_reference[1]
    for r in records:
        assert r.output_tokens == len(r.token_ids) and r.prompt_tokens > 0
        assert r.finish_reason in ("eos", "length")


@pytest.mark.parametrize("n", [1, 3])
def test_tiny_mixed_length_micro_batch_equals_generate_on_the_batch(launched, tiny_reference, n):
    # micro-batches of 3 prompts of different lengths: left padding, masks and positions as generate
    records = launched(f"mixed-{n}").results(f"mixed-{n}")
    assert [r.token_ids for r in records] == tiny_reference[3]


def test_idle_rank_is_left_out_and_does_not_spin(launched, tiny_reference):
    # rank 2 takes no part: it must wait for the end without burning a core
    launch = launched("idle")
    records = launch.results("idle")
    assert [r.token_ids for r in records] == tiny_reference[1] * 4
    summary = json.loads(read_attrs(launch.h5("idle"))["summary"])
    idle = next(st for st in summary["ranks"] if st["rank"] == 2)
    assert idle["steps"] == 0
    # a spinning wait would use a whole core (cpu_s ~ wall_s); polling with sleeps stays far below
    assert idle["cpu_s"] < 0.25 * idle["wall_s"], idle


@pytest.fixture(scope="module")
def smol_reference(smollm_path):
    return reference_tokens(smollm_path, PROMPTS[:3], 10, 3)


@pytest.mark.parametrize("n", [n for n, _ in SMOL_PARTITIONS], ids=[f"{n}ranks" for n, _ in SMOL_PARTITIONS])
def test_smollm2_equals_generate(launched, smol_reference, n):
    launch = launched(f"smol-{n}")
    assert [r.token_ids for r in launch.results(f"smol-{n}")] == smol_reference
    assert "tokens/s" in launch.summary(f"smol-{n}")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_activations_travel_as_raw_bytes(launched, tiny_path, dtype):
    # numpy has no bfloat16: its 2-byte words cross MPI as int16 and must arrive bit for bit
    records = launched(f"half-{dtype}").results(f"half-{dtype}")
    assert [r.token_ids for r in records] == reference_tokens(tiny_path, PROMPTS, 12, 2, dtype=dtype)


def test_seeded_sampling_is_the_same_whatever_the_partition(launched, tiny_path):
    runs = [[r.token_ids for r in launched(f"seeded-{i}").results(f"seeded-{i}")] for i in range(len(SEEDED))]
    assert runs[0] == runs[1] == runs[2]
    greedy = reference_tokens(tiny_path, PROMPTS, 16, 1)
    assert runs[0] != greedy  # it really sampled


def test_show_json_lists_every_request(launched):
    launch = launched("tiny-2-0")
    records = launch.results("tiny-2-0")
    import subprocess, sys
    out = subprocess.run([sys.executable, "-m", "edgeshard_mpi", "show", str(launch.h5("tiny-2-0")), "--json"],
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
