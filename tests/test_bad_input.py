"""Bad input under mpiexec: one clear line naming the file, line or field; non-zero exit; never a hang."""

from __future__ import annotations

import pytest

from conftest import Launches, run_mpi, write_job

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


def _tiny_copy(folder, tiny_path):
    import shutil

    dst = folder / "model"
    shutil.copytree(tiny_path, dst)
    return dst


def _hostfile(folder, name: str, text: str):
    (folder / name).write_text(text)
    return f'hostfile = "{name}"'


def _missing_tensor(folder, tiny_path):
    from safetensors.torch import load_file, save_file

    model = _tiny_copy(folder, tiny_path)
    tensors = load_file(model / "model.safetensors")
    del tensors["model.layers.3.mlp.up_proj.weight"]
    save_file(tensors, model / "model.safetensors")
    return model


def _unsupported_config(folder, tiny_path):
    import json

    model = _tiny_copy(folder, tiny_path)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    return model


_LONG = " ".join(["word"] * 400)  # tiny-random's context is 256 tokens
# name -> (run options, job) for jobs that cannot start. Those with the same options share one
# 2-rank launch with a good job ("ok"): each must be refused on a line of its own, and the launch go on.
BAD_JOBS = {
    "missing-model": ((), lambda d, tiny: write_job(d, d / "no-such-model", OK)),
    "bad-hostfile": ((), lambda d, tiny: write_job(d, "tiny-random", OK, extra=_hostfile(
        d, "bad.hosts", "# device: name=a memory=1GiB\nlocalhost:1\n# device: name=b memory=lots\nlocalhost:1\n"))),
    "plan-misses": ((), lambda d, tiny: write_job(d, "tiny-random", OK, plan="[plan]\nstages = [{rank = 0, first = 0, "
                                                  "last = 3}, {rank = 1, first = 5, last = 7}]\n")),
    "plan-repeats": ((), lambda d, tiny: write_job(d, "tiny-random", OK, plan="[plan]\nstages = [{rank = 0, first = 0, "
                                                   "last = 4}, {rank = 1, first = 4, last = 7}]\n")),
    "small-memory": ((), lambda d, tiny: write_job(d, "tiny-random", OK, extra=_hostfile(
        d, "small.hosts", "# device: name=big memory=1GiB\nlocalhost:1\n# device: name=tiny-board memory=1MiB\n"
                          "localhost:1\n"))),
    "missing-tensor": ((), lambda d, tiny: write_job(d, _missing_tensor(d, tiny), OK)),
    "unsupported-config": ((), lambda d, tiny: write_job(d, _unsupported_config(d, tiny), OK)),
    "kept-results": ((), lambda d, tiny: ((d / "job.h5").write_text("precious"), write_job(d, "tiny-random", OK))[1]),
    # a request that cannot run is an error record by default (tests/test_request_errors.py); --strict stops
    "not-json": (("--strict",), lambda d, tiny: write_job(d, "tiny-random", [OK[0], '{"id": "b", "prompt": "unterm'])),
    "empty-prompt": (("--strict",), lambda d, tiny: write_job(d, "tiny-random", [OK[0], {"id": "b", "prompt": "  "}])),
    "long-prompt": (("--strict",), lambda d, tiny: write_job(d, "tiny-random", [OK[0], {"id": "l", "prompt": _LONG}])),
}


@pytest.fixture(scope="module")
def refused(tmp_path_factory, tiny_path):
    """name -> the Launch that ran that job: one launch for each set of options, each with a good job
    (key ("ok", options)) beside the refused ones."""
    root = tmp_path_factory.mktemp("refused")
    jobs = {}
    for name, (args, make) in BAD_JOBS.items():
        (root / name).mkdir()
        jobs[name] = make(root / name, tiny_path)
    for args in {args for args, _ in BAD_JOBS.values()}:
        ok = root / f"ok{'-'.join(args)}"
        ok.mkdir()
        jobs[("ok", args)] = write_job(ok, "tiny-random", OK)
    return Launches(jobs, lambda key: (2, key[1] if key[0] == "ok" else BAD_JOBS[key][0]), timeout=240)


def _refused(refused, name, *needles) -> str:
    """The job's error line, holding every needle; the good job of the same launch ran."""
    launch = refused(name)
    line = launch.error(name)
    for needle in needles:
        assert needle in line, line
    assert "Traceback" not in launch.proc.stderr, launch.proc.stderr
    assert "requests" in launch.summary(("ok", BAD_JOBS[name][0]))
    return line


def test_missing_model_folder(refused):
    _refused(refused, "missing-model", "no-such-model", "model folder not found")


def test_malformed_hostfile_line(refused):
    _refused(refused, "bad-hostfile", "bad.hosts:3", "memory")


def test_more_ranks_than_slots(tmp_path, tiny_path):
    hosts = tmp_path / "two.hosts"
    hosts.write_text("# device: name=a\nlocalhost:1\n# device: name=b\nlocalhost:1\n")
    job = write_job(tmp_path, "tiny-random", OK)
    _fails(run_mpi(["run", str(job), "--hostfile", str(hosts)], 3, timeout=60), "two.hosts", "2 slot(s)", "3 ranks")


def test_prompt_line_not_json(refused):
    _refused(refused, "not-json", "job-prompts.jsonl:2", "not valid JSON")


def test_empty_prompt(refused):
    _refused(refused, "empty-prompt", "job-prompts.jsonl:2", "'prompt' is empty")


def test_prompt_longer_than_context(refused):
    _refused(refused, "long-prompt", "job-prompts.jsonl:2", "context of 256")


@pytest.mark.parametrize("name,needle", [("plan-misses", "misses unit(s) 4"),
                                         ("plan-repeats", "unit 4 is in stage 0 and stage 1")])
def test_plan_that_misses_or_repeats_units(refused, name, needle):
    _refused(refused, name, "[plan]", needle)


def test_results_file_is_never_overwritten_silently(refused):
    _refused(refused, "kept-results", "job.h5", "--overwrite")
    assert refused("kept-results").h5("kept-results").read_text() == "precious"


def test_output_of_several_jobs_is_refused(tmp_path, tiny_path):
    jobs = [write_job(tmp_path, "tiny-random", OK, name=n) for n in ("a", "b")]
    _fails(run_mpi(["run", *map(str, jobs), "--output", str(tmp_path / "x.h5")], 2, timeout=60),
           "--output names one file", "give one job, not 2")
    assert not list(tmp_path.glob("*.h5"))


def test_exception_on_rank_2_of_3_ends_the_job(tmp_path, tiny_path):
    job = write_job(tmp_path, "tiny-random", OK)
    line = _fails(run_mpi(["run", str(job), "--no-progress"], 3, timeout=90, env={"EDGESHARD_FAULT": "2:1"}),
                  "rank 2 of 3", "injected fault")
    assert "step 1" in line


def test_shard_larger_than_its_device_memory(refused):
    _refused(refused, "small-memory", "tiny-board", "1.00 MiB", "need")


def test_model_with_a_missing_tensor(refused):
    model = refused("missing-tensor").jobs["missing-tensor"].parent / "model"
    _refused(refused, "missing-tensor", f"{model}: unit block.3 is missing tensor(s) model.layers.3.mlp.up_proj.weight")


def test_model_with_an_unsupported_config(refused):
    config = refused("unsupported-config").jobs["unsupported-config"].parent / "model" / "config.json"
    _refused(refused, "unsupported-config", f"{config}: model_type 'gpt2' is not supported")


def test_a_profile_of_another_cluster_is_refused_naming_both_hashes(tmp_path, tiny_path):
    from edgeshard_mpi.cluster import Cluster, Device
    from edgeshard_mpi.models import ModelSpec
    from edgeshard_mpi.profiler import Profile, cluster_fingerprint, model_fingerprint

    spec = ModelSpec.load(tiny_path)
    n = spec.num_units
    boards = [Device(name=f"board{r}").to_dict() for r in range(2)]  # this model, two other devices
    prof = Profile(model={"name": spec.name, "fingerprint": model_fingerprint(spec), "dtype": spec.dtype, "num_units": n},
                   units=[{"name": u.name, "param_bytes": u.param_bytes, "kv_bytes_per_token": u.kv_bytes_per_token,
                           "out_bytes_per_token": u.out_bytes_per_token} for u in spec.units],
                   devices=[{**d, "prefill_s": [1e-3] * n, "decode_s": [1e-4] * n} for d in boards],
                   bandwidth=[[None, 1e9], [1e9, None]], latency=[[0.0, 0.0], [0.0, 0.0]],
                   shapes={"prompt_tokens": 8, "context": 16, "micro_batch_size": 1}, cluster=cluster_fingerprint(boards))
    path = prof.save(tmp_path / "other-cluster.json")
    import os

    cores = len(os.sched_getaffinity(0))  # the run decides each rank's threads: its host's cores / 2 ranks
    here = cluster_fingerprint([d.to_dict() for d in Cluster.local(2).with_threads([(cores, 2)] * 2).devices])
    job = write_job(tmp_path, "tiny-random", OK)
    _fails(run_mpi(["run", str(job), "--objective", "throughput", "--profile", str(path)], 2, timeout=60),
           f"{path}: profile is for cluster {prof.cluster}, not <no hostfile> ({here})", "rank 0 name was 'board0'")
    assert not (tmp_path / "job.h5").exists()  # refused before the results file is made


def test_a_profile_measured_with_other_thread_counts_is_stale(tiny_path):
    # the same devices on hosts with more cores: its times are not this run's, and the error says why
    from edgeshard_mpi.cluster import Cluster
    from edgeshard_mpi.models import ModelSpec
    from edgeshard_mpi.profiler import Profile, ProfileError, cluster_fingerprint, model_fingerprint

    spec = ModelSpec.load(tiny_path)
    n = spec.num_units
    then = [d.to_dict() for d in Cluster.local(2).with_threads([(8, 2)] * 2).devices]  # 4 threads each
    now = [d.to_dict() for d in Cluster.local(2).with_threads([(2, 2)] * 2).devices]  # 1 thread each
    prof = Profile(model={"name": spec.name, "fingerprint": model_fingerprint(spec), "dtype": spec.dtype, "num_units": n},
                   units=[{"name": u.name, "param_bytes": u.param_bytes, "kv_bytes_per_token": u.kv_bytes_per_token,
                           "out_bytes_per_token": u.out_bytes_per_token} for u in spec.units],
                   devices=[{**d, "prefill_s": [1e-3] * n, "decode_s": [1e-4] * n} for d in then],
                   bandwidth=[[None, 1e9], [1e9, None]], latency=[[0.0, 0.0], [0.0, 0.0]],
                   shapes={"prompt_tokens": 8, "context": 16, "micro_batch_size": 1}, cluster=cluster_fingerprint(then),
                   source="p.json")
    with pytest.raises(ProfileError, match="rank 0 threads was 4, is 1"):
        prof.check_for(spec.name, model_fingerprint(spec), cluster_fingerprint(now), now)


def test_a_bad_prompt_line_after_the_read_ahead_keeps_the_results_so_far(tmp_path, tiny_path):
    from edgeshard_mpi.results import read_results

    good = [{"id": f"q{i}", "prompt": f"Number {i}"} for i in range(260)]  # more than the 256 read ahead
    job = write_job(tmp_path, "tiny-random", good + ["{\"id\": \"bad\", \"prompt\": \"caf\u00e9\"}"],
                    extra="micro_batch_size = 16", generation="max_new_tokens = 1")
    prompts = tmp_path / "job-prompts.jsonl"
    data = prompts.read_bytes()
    prompts.write_bytes(data.replace("caf\u00e9".encode(), b"caf\xe9"))  # line 261: Latin-1, not UTF-8
    _fails(run_mpi(["run", str(job), "--no-progress", "--strict"], 2, timeout=120),
           "job-prompts.jsonl:261: not UTF-8")
    kept = {r.id for r in read_results(tmp_path / "job.h5")}
    assert kept and kept <= {p["id"] for p in good}
    prompts.write_bytes(data)  # the line fixed: --resume runs only what is missing
    proc = run_mpi(["run", str(job), "--no-progress", "--resume"], 2, timeout=120)
    assert proc.returncode == 0, proc.stderr
    ids = [r.id for r in read_results(tmp_path / "job.h5")]
    assert sorted(ids) == sorted([p["id"] for p in good] + ["bad"]) and len(ids) == len(set(ids))
