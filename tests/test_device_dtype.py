"""A device's own dtype and quantization (hostfile `dtype=`, `quantize=`): bytes, plans, profiles, a run.

    $ python -m pytest -q tests/test_device_dtype.py
"""

from __future__ import annotations

import json
import platform

import pytest
import torch

from conftest import run_mpi, write_job
from edgeshard_mpi.cluster import Device
from edgeshard_mpi.fewrows import bf16_instructions, widens
from edgeshard_mpi.models import ModelSpec
from edgeshard_mpi.planner import plan_throughput, predict
from edgeshard_mpi.profiler import Profile, ProfileError, cluster_fingerprint, device_bytes, model_fingerprint
from edgeshard_mpi.results import read_attrs, read_results

PROMPTS = ["The quick brown fox", "In a distant galaxy, a lone explorer discovered", "def fibonacci(n):", "Paris is"]


def _profile(spec: ModelSpec, devices: list[Device], decode_s: list[float], source: str = "<test>") -> Profile:
    """A profile of `spec` (the job's model) on `devices`, each holding its units in its own precision."""
    n = spec.num_units
    dicts = []
    for d, t in zip(devices, decode_s):
        own = spec.with_precision(*d.precision(spec.dtype, spec.quantize))
        dicts.append({**d.to_dict(), "prefill_s": [10 * t] * n, "decode_s": [t] * n, **device_bytes(spec, own)})
    m = len(devices)
    return Profile(model={"name": spec.name, "fingerprint": model_fingerprint(spec), "dtype": spec.dtype,
                          "num_units": n},
                   units=[{"name": u.name, "param_bytes": u.param_bytes, "kv_bytes_per_token": u.kv_bytes_per_token,
                           "out_bytes_per_token": u.out_bytes_per_token} for u in spec.units],
                   devices=dicts, bandwidth=[[None if k == j else 1e9 for j in range(m)] for k in range(m)],
                   latency=[[0.0] * m for _ in range(m)],
                   shapes={"prompt_tokens": 8, "context": 16, "micro_batch_size": 1},
                   cluster=cluster_fingerprint([d.to_dict() for d in devices]), source=source)


def test_a_device_may_declare_what_a_job_may():
    # cluster.py imports no torch, so it keeps its own list of the choices
    from edgeshard_mpi import cluster, models

    assert set(cluster.DTYPES) == set(models.DTYPE_BYTES)
    assert set(cluster.QUANTIZE) - {"none"} == set(models.QUANTIZE) - {None}


def test_a_device_that_holds_the_model_only_in_bf16_or_int8_is_planned_with_it(tmp_path, tiny_path):
    # fp32 job; the source holds the embedding alone; the fast device holds units 1..7 only in its own
    # dtype, so its own bytes, not the job's, decide whether it can take them
    fp32 = ModelSpec.load(tiny_path)
    n = fp32.num_units
    for own in ({"dtype": "bfloat16"}, {"quantize": "int8"}):
        small = fp32.with_precision(own.get("dtype", "float32"), own.get("quantize"))
        assert small.bytes_of(1, n - 1) < fp32.bytes_of(1, n - 1) / 1.9
        devices = [Device(name="src", memory=fp32.bytes_of(0, 0) + 2**16),
                   Device(name="fast", memory=small.bytes_of(1, n - 1) + 2**16, **own),
                   Device(name="slow")]
        prof = _profile(fp32, devices, [1e-3, 1e-4, 1e-2])
        prof = Profile.load(prof.save(tmp_path / "p.json"))  # the per-device bytes survive the file
        costs = prof.costs()
        assert costs.per_device_bytes
        assert costs.bytes_on(1)[-1] < costs.bytes_on(0)[-1] == costs.bytes_on(2)[-1]
        # what it sends on is in its dtype too: half in bf16, as the job's with int8 weights
        assert costs.out_bytes_on(1)[1] == costs.out_bytes_on(0)[1] / (2 if "dtype" in own else 1)
        plan = plan_throughput(costs)
        assert [(s.rank, s.first, s.last) for s in plan.stages] == [(0, 0, 0), (1, 1, n - 1)], own
        assert predict(costs, plan)["stage_bytes"][1] <= devices[1].memory
        assert fp32.bytes_of(1, n - 1) > devices[1].memory  # counted in the job's fp32, they would not fit


def test_a_profile_without_own_bytes_still_plans_with_one_byte_count(tiny_path):
    spec = ModelSpec.load(tiny_path)
    prof = _profile(spec, [Device(name="a"), Device(name="b")], [1e-3, 1e-3])
    assert all("param_bytes" not in d for d in prof.devices)
    assert not prof.costs().per_device_bytes and len(prof.unit_bytes()) == spec.num_units


def test_a_profile_measured_with_another_device_dtype_is_stale(tiny_path):
    # as with thread counts: the fingerprint changes, and the error names the difference
    spec = ModelSpec.load(tiny_path)
    then = [Device(name="a"), Device(name="b")]
    now = [Device(name="a"), Device(name="b", dtype="bfloat16")]
    prof = _profile(spec, then, [1e-3, 1e-3], source="p.json")
    here = [d.to_dict() for d in now]
    assert cluster_fingerprint(here) != prof.cluster
    with pytest.raises(ProfileError, match="rank 1 dtype was not set, is 'bfloat16'"):
        prof.check_for(spec.name, model_fingerprint(spec), cluster_fingerprint(here), here)


def _reference(plan: dict, specs: dict, threads: dict, prompts: list[str], max_new: int,
               model_path) -> list[list[int]]:
    """Greedy tokens of the plan's cut in-process: each stage a Shard in its rank's own precision, run
    on its rank's thread count, activations cast to the next stage's dtype as the pipeline does, one
    prompt at a time."""
    import torch
    from transformers import AutoTokenizer

    from edgeshard_mpi.pipeline import _eos_ids
    from edgeshard_mpi.shard import Shard

    tok = AutoTokenizer.from_pretrained(model_path)
    eos = _eos_ids(str(model_path))
    stages = [(Shard(specs[s["rank"]], s["first"], s["last"]), threads[s["rank"]]) for s in plan["stages"]]
    before = torch.get_num_threads()
    try:
        out = []
        for prompt in prompts:
            ids = tok(prompt)["input_ids"]
            x, pads, tokens = torch.tensor([ids]), [0], []
            while len(tokens) < max_new and not (tokens and tokens[-1] in eos):
                for shard, n in stages:
                    torch.set_num_threads(n)
                    x = shard.forward(0, x.to(shard.dtype) if x.is_floating_point() else x, pads,
                                      len(ids) + max_new - 1)
                tokens.append(int(x.argmax(-1)))
                x, pads = torch.tensor([[tokens[-1]]]), None
            out.append(tokens)
        return out
    finally:
        torch.set_num_threads(before)


def test_a_run_over_devices_in_their_own_dtypes(tmp_path, tiny_path):
    # fp32 job: the source in bf16, one device in the job's fp32, one with int8 weights. Memories are
    # set so that the head fits only on the int8 device and the source holds the embedding only in
    # bf16: the profile, the plan and the memory checks must all count each device's own bytes.
    fp32 = ModelSpec.load(tiny_path)
    bf16, int8 = fp32.with_precision("bfloat16", None), fp32.with_precision("float32", "int8")
    n, mib = fp32.num_units, 2**20
    head_and_blocks = int8.bytes_of(1, n - 1) + mib
    assert bf16.bytes_of(0, n - 2) + mib < fp32.bytes_of(0, 0) and head_and_blocks < bf16.units[-1].param_bytes
    hosts = tmp_path / "mixed.hosts"
    hosts.write_text(f"# device: name=src dtype=bfloat16 memory={bf16.bytes_of(0, n - 2) + mib}\nlocalhost:1\n"
                     f"# device: name=mid memory={fp32.bytes_of(1, n - 2) + mib}\nlocalhost:1\n"
                     f"# device: name=q8 quantize=int8 memory={head_and_blocks}\nlocalhost:1\n")
    job = write_job(tmp_path, "tiny-random", [{"id": f"p{i}", "prompt": p} for i, p in enumerate(PROMPTS)],
                    plan='[plan]\nobjective = "throughput"\n', generation="max_new_tokens = 10")
    proc = run_mpi(["run", str(job), "--hostfile", str(hosts), "--no-progress"], 3, hostfile=hosts, timeout=300)
    assert proc.returncode == 0, proc.stderr
    table = next(line for line in proc.stderr.splitlines() if line.startswith("edgeshard: ranks:"))
    assert "0 src (pid" in table and ", bfloat16), 1 mid (pid" in table and table.endswith(", float32, int8)"), table
    # bf16 on torch's products on a CPU without bf16 instructions is named, for the bf16 device only (not
    # for int8, whose products take fp32); where this project's kernel widens bf16 to fp32, for none
    notes = [line for line in proc.stderr.splitlines() if line.startswith("edgeshard: note: bfloat16")]
    if bf16_instructions() or platform.machine() != "x86_64" or widens(torch.device("cpu"), torch.bfloat16):
        assert notes == [], notes
    else:
        isa = torch.backends.cpu.get_cpu_capability()
        assert len(notes) == 1 and f"instructions: src ({isa}: " in notes[0], proc.stderr

    attrs = read_attrs(tmp_path / "job.h5")
    plan = json.loads(attrs["plan"])
    ranks = {r["rank"]: r for r in json.loads(attrs["ranks"])}
    assert [(ranks[r]["dtype"], ranks[r].get("quantize")) for r in range(3)] == [
        ("bfloat16", None), ("float32", None), ("float32", "int8")]
    assert plan["stages"][0]["rank"] == 0 and plan["stages"][-1]["rank"] == 2  # the head only fits in int8
    specs, threads = {0: bf16, 1: fp32, 2: int8}, {r: ranks[r]["threads"] for r in ranks}
    summary = json.loads(attrs["summary"])
    for st in summary["stages"]:  # each shard loaded in its own precision
        assert st["bytes"] == specs[st["rank"]].bytes_of(st["first"], st["last"]), st
    # the profile measured each rank in its own precision and recorded its bytes
    prof = Profile.load(attrs["profile"])
    assert prof.devices[0]["param_bytes"] == [u.param_bytes for u in bf16.units]
    assert prof.devices[2]["param_bytes"] == [u.param_bytes for u in int8.units]
    assert prof.devices[0]["out_bytes_per_token"] == [u.out_bytes_per_token for u in bf16.units]
    assert "param_bytes" not in prof.devices[1] and prof.costs().per_device_bytes

    by_id = {r.id: r.token_ids for r in read_results(tmp_path / "job.h5")}
    got = [by_id[f"p{i}"] for i in range(len(PROMPTS))]
    assert got == _reference(plan, specs, threads, PROMPTS, 10, tiny_path)
