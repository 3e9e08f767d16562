"""A device's own dtype and quantization (hostfile `dtype=`, `quantize=`): bytes, plans, profiles, a run.

    $ python -m pytest -q tests/test_device_dtype.py
"""

from __future__ import annotations

import pytest

from edgeshard_mpi.cluster import Device
from edgeshard_mpi.models import ModelSpec
from edgeshard_mpi.planner import plan_throughput, predict
from edgeshard_mpi.profiler import Profile, ProfileError, cluster_fingerprint, device_bytes, model_fingerprint


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
