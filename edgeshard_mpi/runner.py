"""What every rank does in a run, in order. The one place that decides rank by rank.

    mpiexec -f hostfiles/local3.hosts -n 3 python -m edgeshard_mpi run jobs/demo.toml
    mpiexec -f hostfiles/hetero4.hosts -n 4 python -m edgeshard_mpi profile jobs/hetero4.toml

1. Rank 0 reads the job, hostfile and prompts, prepares the model, opens the results file, and
   decides whether a plan is given, or must be made from a saved profile, or from a new one.
   Every rank learns the decision (or the error: then all leave cleanly and rank 0 says why).
2. Links are shaped as the hostfile declares; if needed, every rank profiles (profiler.py).
3. Rank 0 plans (planner.py), checks memory, and broadcasts the plan.
4. Each rank in the plan loads its shard; rank 0 runs the source loop, the others the stage loop
   (pipeline.py); ranks left out wait. All meet at the end to report their figures.
An exception after step 1 on any rank prints the rank and message and aborts the whole job (cli.py).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Iterator

from .cluster import Cluster, format_bytes, parse_hostfile
from .comm import Comm, versions
from .drift import DEFAULT_THRESHOLD, DriftWatch, worth_moving
from .jobs import BENCH_DEFAULT, Job, JobError, choice_seed, count_prompts, read_prompts
from .launcher import Heartbeat
from .openai_batch import CHAT, COMPLETIONS
from .models import ModelSpec, prepare
from .pipeline import Prompt, Summary, source_loop, stage_loop
from .planner import Plan, PlanError, even_plan, plan_for, predict
from .profiler import (Profile, cluster_fingerprint, find_profile, measure_profile, model_fingerprint, peak_rss,
                       profile_shapes, profiles_dir, reset_peak_rss)
from .results import ResultWriter, done_key
from .shard import Shard, release_freed_memory
from .scheduler import in_flight_for, prefill_chunk_for, slot_columns
from .simulate import Request, Simulation, StageLine, StepCosts, simulate
from .trace import Tracer, write_chrome_trace

__all__ = ["RunOptions", "SetupFailed", "run_job", "profile_job", "bench_job", "between_jobs"]


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """Command-line choices that override the job file."""

    hostfile: str | None = None
    plan: str | None = None
    objective: str | None = None
    profile: str | None = None  # a profile file to plan from (else a saved matching one, else measure)
    output: str | None = None
    overwrite: bool = False
    resume: bool = False
    retry_errors: bool = False  # with resume: run the requests recorded as errors again
    schedule: str | None = None
    admission: str | None = None  # scheduler.ADMISSIONS; None: the job's
    prefill_chunk: int | None = None  # tokens a step prefills of a long prompt; 0: whole; None: the job's
    micro_batches: int | None = None
    progress: bool = True
    repeats: int = 5  # profiling: runs per measurement
    trace: str | None = None  # write every rank's timeline to this Chrome trace JSON
    step_timeout: float | None = 25.0  # rank 0 declares a rank lost after this long without tokens
    compile: bool | None = None  # torch.compile each stage's decode step; None = as the job says
    strict: bool = False  # the first request that cannot run stops the job (else it is recorded, and the job goes on)
    profile_load: str = "turns"  # a profile measured here: ranks in turns, or all "together" (profiler.LOADS)
    drift: float = DEFAULT_THRESHOLD  # a stage off its profile by more than this fraction is drifting (drift.py)
    replan: bool = False  # when a stage drifts, plan again on what was measured, and move if that pays
    launch_dir: str | None = None  # under `edgeshard launch`: the folder rank 0 reports through (launcher.py)


_MAX_REPLAY_EVENTS = 2_000_000  # stage steps the end-of-run prediction replays at most (about 2 s)
_SAMPLE = 256  # prompts read ahead of the run: they size the profile's shapes and the KV cache


class SetupFailed(Exception):
    """The job could not start; raised on every rank, and only rank 0 (quiet=False) reports it."""

    def __init__(self, message: str, quiet: bool = False):
        super().__init__(message)
        self.quiet = quiet


def _decide(comm: Comm, fn):
    """Rank 0 runs fn() -> (shared, local) and broadcasts `shared`; an error ends every rank cleanly.

    Returns (shared, local) on rank 0 and (shared, None) elsewhere.
    """
    if comm.rank == 0:
        try:
            shared, local = fn()
        except Exception as e:
            msg = str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"
            comm.bcast(("error", msg))
            raise SetupFailed(msg) from e
        comm.bcast(("ok", shared))
        return shared, local
    status, shared = comm.bcast(None)
    if status == "error":
        raise SetupFailed(shared, quiet=True)
    return shared, None


# -- step 1: rank 0 reads everything ---------------------------------------------------------------
def _cluster(job: Job, opts: RunOptions, world: int) -> Cluster:
    hostfile = opts.hostfile or job.hostfile or os.environ.get("HYDRA_HOST_FILE")
    if not hostfile:
        return Cluster.local(world)
    return parse_hostfile(hostfile).for_world(world)


def _given_plan(job: Job, opts: RunOptions, spec: ModelSpec, world: int) -> Plan | None:
    """The plan the user fixed (file, stages, even split), or None when one must be made."""
    n = spec.num_units
    if opts.plan:
        return Plan.load(opts.plan, n)
    if opts.objective or (job.plan and "objective" in job.plan):
        return None
    if job.plan and "file" in job.plan:
        return Plan.load(job.plan["file"], n)
    if job.plan and "stages" in job.plan:
        return Plan.from_dict({"stages": job.plan["stages"], "objective": "manual"}, n, f"{job.path}: [plan]")
    return even_plan(n, world)


def _tokenize(job: Job, tok, spec: ModelSpec, skip: set[str], strict: bool = False) -> Iterator[Prompt]:
    """Prompts one at a time, tokenised and checked, leaving out ids in `skip` (already done).

    A request that cannot run (a bad line, a prompt too long for the context) comes as a Prompt with
    its `error`, which the run records and goes on; with `strict` it raises instead."""
    for req in read_prompts(job.prompts, job.generation, strict=strict):
        if req.error:
            if req.id not in skip:
                yield Prompt(req, [], "", error=req.error, endpoint=req.endpoint or "")
            continue
        choices = [k for k in range(req.generation.n) if done_key(req.id, k) not in skip]
        if not choices:
            continue
        try:
            prompt = _tokenized(job, tok, spec, req)
        except JobError as e:
            if strict:
                raise
            yield Prompt(req, [], req.prompt or "", error=str(e), endpoint=req.endpoint or "")
            continue
        for k in choices:  # each choice a request of its own, with its own seed
            sampling = dataclasses.replace(req.generation.sampling,
                                           seed=choice_seed(req.generation.sampling.seed, k))
            gen = dataclasses.replace(req.generation, sampling=sampling)
            yield dataclasses.replace(prompt, request=dataclasses.replace(req, generation=gen), choice=k)


def _tokenized(job: Job, tok, spec: ModelSpec, req) -> Prompt:
    if req.messages is not None or job.chat:
        messages = list(req.messages) if req.messages is not None else [{"role": "user", "content": req.prompt}]
        if not tok.chat_template:
            raise JobError(f"{req.where}: chat messages given but the model has no chat template")
        rendered = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = tok(rendered, add_special_tokens=False)["input_ids"]
        text = req.prompt if req.messages is None else json.dumps(messages, ensure_ascii=False)
        endpoint = CHAT
    else:
        ids = tok(req.prompt)["input_ids"]
        text = req.prompt
        endpoint = COMPLETIONS
    if not ids:
        raise JobError(f"{req.where}: prompt tokenises to nothing")
    need = len(ids) + req.generation.max_new_tokens
    if need > spec.context:
        raise JobError(f"{req.where}: prompt of {len(ids)} tokens + max_new_tokens "
                       f"{req.generation.max_new_tokens} = {need} exceeds the model's context of "
                       f"{spec.context} tokens")
    return Prompt(req, ids, text, endpoint=req.endpoint or endpoint)


@dataclasses.dataclass(frozen=True)
class _Shared:
    """What rank 0 decides in step 1 and every rank needs."""

    model_path: str
    dtype: str
    quantize: str | None
    cluster: dict
    plan: dict | None  # None: to be made from a profile
    measure: dict | None  # shapes to profile at, when no saved profile fits
    compile: bool = False  # compile each stage's decode step, warmed up for micro-batches of `rows` rows
    rows: int = 1

    def spec(self) -> ModelSpec:
        return ModelSpec.load(self.model_path, self.dtype, quantize=self.quantize)


@dataclasses.dataclass
class _Local:
    """What only rank 0 keeps."""

    job: Job
    spec: ModelSpec
    tok: object = None
    prompts: Iterator[Prompt] = iter(())
    total: int = 0  # prompts still to run (for the progress bar)
    writer: ResultWriter | None = None
    output: str = ""  # the results file, checked in step 1, opened once the plan is made
    attrs: dict = dataclasses.field(default_factory=dict)
    objective: str | None = None
    profile: Profile | None = None
    kv_tokens: int = 0  # KV cache the planner budgets per unit: micro-batch x longest request x slots
    row_tokens: int = 0  # micro-batch x longest request: the KV cache of one slot
    longest: int = 0  # tokens of the longest request: what a sliding layer's window caps
    admission: str = "row"  # scheduler.ADMISSIONS, as this model allows
    prefill_chunk: int | None = None  # as asked for (options, job): scheduler.prefill_chunk_for
    schedule: str = "no-bubbles"
    in_flight: int | None = None  # micro-batches in flight if asked for (options, job): scheduler.in_flight_for
    shapes: dict | None = None  # the shapes this job is profiled at (profiler.profile_shapes)
    cluster: Cluster | None = None
    drift: float = DEFAULT_THRESHOLD
    replan: bool = False
    measured: Profile | None = None  # the profile as the run measured it (scaled by each stage's drift)
    next_plan: Plan | None = None  # where a run that drains to move goes next
    moves: list = dataclasses.field(default_factory=list)  # every time a new plan was weighed
    drifts: list = dataclasses.field(default_factory=list)  # drift.Drift events, as dicts
    heartbeat: Heartbeat | None = None  # under `edgeshard launch`


def _read(job_path: str, opts: RunOptions, hosts: list[tuple[int, int]], *, mode: str = "run"):
    """mode: "run" (results file, saved profile if one fits), "bench" (saved profile if one fits),
    "profile" (always measure)."""
    for_run = mode == "run"
    job = Job.load(job_path)
    world = len(hosts)
    cluster = _cluster(job, opts, world).with_threads(hosts)  # threads are part of what a profile measured
    output = opts.output or job.output
    # before the model is prepared (a preset's first conversion takes a while): a target that
    # cannot be written fails at once
    done = ResultWriter.check_target(output, overwrite=opts.overwrite, resume=opts.resume,
                                     retry_errors=opts.retry_errors) if for_run else set()
    model_path = prepare(job.model)  # a preset is prepared once, here, while the others wait
    spec = ModelSpec.load(model_path, job.dtype, name=Path(job.model).name, quantize=job.quantize)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path, trust_remote_code=False)  # never run code shipped with a model
    stream = _tokenize(job, tok, spec, done, strict=opts.strict)
    read_ahead = list(itertools.islice(stream, _SAMPLE))  # sizes the profile and the KV cache; the rest streams
    sample = [p for p in read_ahead if not p.error]
    if not read_ahead and not done:
        raise JobError(f"{job.prompts}: no prompts")
    if read_ahead and not sample:  # not one request to run: not a prompt file, or not one for this model
        raise JobError(f"{job.prompts}: none of the first {len(read_ahead)} requests can run; the first: "
                       f"{read_ahead[0].error}")
    longest = max((len(p.ids) + p.request.generation.max_new_tokens for p in sample), default=1)
    # a sliding layer's window moves with the step: rows cannot join its cache (kv_cache.join_rows)
    admission = "batch" if any(u.kv_window for u in spec.units) else (opts.admission or job.admission)
    columns = slot_columns(longest, admission)  # the KV time axis a slot may reach
    # every stage keeps a KV cache per micro-batch in flight; the planner, not knowing the plan yet,
    # budgets for the most there can be (twice the ranks); a plan is then checked with its own count
    in_flight = opts.micro_batches or job.micro_batches
    local = _Local(job, spec, tok, itertools.chain(read_ahead, stream),
                   kv_tokens=columns * job.micro_batch_size * (in_flight or 2 * world))
    local.row_tokens, local.longest, local.admission = columns * job.micro_batch_size, longest, admission
    local.prefill_chunk = job.prefill_chunk if opts.prefill_chunk is None else opts.prefill_chunk
    local.schedule, local.in_flight = opts.schedule or job.schedule, in_flight
    local.drift, local.replan = opts.drift, opts.replan and for_run
    plan = _given_plan(job, opts, spec, world) if for_run else None
    if mode == "bench":
        local.objective = "throughput"
    if plan is None and not sample:
        plan = even_plan(spec.num_units, world)  # nothing left to run: no need to profile
    measure = None
    local.cluster = cluster
    shapes = local.shapes = profile_shapes([len(p.ids) for p in sample] or [1], job.generation.max_new_tokens,
                                           job.micro_batch_size, opts.profile_load)
    if plan is None:
        local.objective = opts.objective or (job.plan or {}).get("objective", "throughput")
        if opts.profile:
            local.profile = Profile.load(opts.profile)
        elif mode != "profile":
            local.profile = _saved_profile(local)
        if local.profile is None:
            measure = shapes
    else:
        plan.check_world(world)
        plan.check_for(model_fingerprint(spec), cluster_fingerprint([d.to_dict() for d in cluster.devices]))
        # a device that times its work takes its stages' times from a profile, and re-planning
        # compares stages with one
        if any(d.clock == "work" for d in cluster.devices) or local.replan:
            local.profile = Profile.load(opts.profile) if opts.profile else _saved_profile(local)
            if local.profile is None:
                measure = shapes
        _check_memory(spec, plan, cluster, local.row_tokens * in_flight_for(local.schedule, len(plan.stages), local.in_flight),
                      longest)
    prof = local.profile
    if prof is not None and not opts.profile and Path(prof.source).name != prof.file_name:
        print(f"edgeshard: profile: {prof.source}", file=sys.stderr, flush=True)  # cut from a larger cluster's
    local.total = count_prompts(job.prompts) - len(done)  # read in chunks, never a whole line
    if for_run:
        # the file itself is opened once the plan is made, so a plan that fails leaves nothing behind
        local.output = output
        local.attrs = {"job": job.text, "job_path": job.path, "cluster": cluster.to_dict(),
                       "model": {"name": spec.name, "path": spec.path, "dtype": spec.dtype, "quantize": spec.quantize,
                                 "config": spec.config},
                       "versions": versions(), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    shared = _Shared(str(model_path), job.dtype, job.quantize, cluster.to_dict(), plan.to_dict() if plan else None, measure,
                     compile=job.compile if opts.compile is None else opts.compile, rows=job.micro_batch_size)
    return shared, local


def _own_spec(spec: ModelSpec, device) -> ModelSpec:
    """The model as `device` holds it: in its own dtype and quantization where the hostfile declares them."""
    return spec.with_precision(*device.precision(spec.dtype, spec.quantize))


def _check_memory(spec: ModelSpec, plan: Plan, cluster: Cluster, kv_tokens: int, row_tokens: int) -> None:
    """Each stage's weights plus its KV cache for its full micro-batches must fit its device, in its dtype."""
    for s in plan.stages:
        dev = cluster.devices[s.rank]
        own = _own_spec(spec, dev)
        need = own.bytes_of(s.first, s.last) + own.kv_bytes(s.first, s.last, kv_tokens, row_tokens)
        if dev.memory is not None and need > dev.memory:
            raise PlanError(f"{cluster.source}: device {dev.name} (rank {s.rank}) has {format_bytes(dev.memory)}, "
                            f"but units {s.first}..{s.last} need {format_bytes(need)} (weights + KV cache for "
                            f"{kv_tokens} tokens)")


# -- steps 2 and 3: profile, plan ---------------------------------------------------------------------
def _profile(comm: Comm, shared: _Shared, cluster: Cluster, spec: ModelSpec, repeats: int,
             out: str | None = None) -> Profile | None:
    """Collective: measure a profile at shared.measure's shapes; rank 0 saves and returns it."""
    prof = measure_profile(comm, spec, list(cluster.devices), shared.measure, repeats=repeats)
    if comm.rank == 0:
        path = Path(out) if out else profiles_dir() / prof.file_name
        prof.source = str(prof.save(path))
        print(f"edgeshard: profile saved to {prof.source}", file=sys.stderr, flush=True)
        for line in prof.scattered():
            print(f"edgeshard: profile: {line}; `edgeshard plan` says whether that can change the plan",
                  file=sys.stderr, flush=True)
    return prof


def _make_plan(local: _Local, cluster: Cluster, world: int, objective: str | None = None) -> Plan:
    prof = local.profile
    devices = [d.to_dict() for d in cluster.devices]
    prof.check_for(local.spec.name, model_fingerprint(local.spec), cluster_fingerprint(devices), devices, cluster.source)
    plan = plan_for(prof.costs(kv_tokens=local.kv_tokens, row_tokens=local.longest), objective or local.objective)
    plan.check_world(world)
    _check_memory(local.spec, plan, cluster, local.row_tokens * in_flight_for(local.schedule, len(plan.stages), local.in_flight),
                  local.longest)
    return plan


def _become_device(comm: Comm, cluster: Cluster, shared: _Shared, table: bool = False) -> None:
    """This rank takes on its device: its links' emulation, and its thread count (decided on rank 0
    from every rank's host, cluster.default_threads), which torch alone would set to 1 under mpiexec.
    Every rank's dtype and quantization are kept for the rank table (printed with `table`); rank 0
    names the ranks whose bf16 products take torch's slow path there (`_bf16_without_instructions`)."""
    import torch

    comm.emulate_links(cluster.devices)
    comm.threads = [d.threads for d in cluster.devices]
    comm.precision = [", ".join(x for x in d.precision(shared.dtype, shared.quantize) if x) for d in cluster.devices]
    torch.set_num_threads(cluster.devices[comm.rank].threads or 1)
    if comm.rank == 0 and table:  # mpiexec reports a rank that died by its pid and host: this maps them to devices
        print(f"edgeshard: ranks: {comm.rank_table()}", file=sys.stderr, flush=True)
    me = cluster.devices[comm.rank]
    slow_bf16 = comm.gather(_bf16_without_instructions(me.torch, *me.precision(shared.dtype, shared.quantize)))
    if comm.rank == 0 and any(slow_bf16):
        names = ", ".join(f"{d.name} ({isa})" for d, isa in zip(cluster.devices, slow_bf16) if isa)
        print(f"edgeshard: note: bfloat16 in torch's products on a CPU without bf16 instructions: {names}. "
              "Past a few rows a product there takes longer in bfloat16 than in float32: for micro-batches "
              "of more than a few rows, float32 (the job's dtype, or dtype= on the device's hostfile line) is "
              "faster there",
              file=sys.stderr, flush=True)


def _bf16_without_instructions(where: str, dtype: str, quantize: str | None) -> str | None:
    """This CPU's instruction set and why, when the rank computes plain bf16 products in torch's own
    way without bf16 instructions (AVX512-BF16 or AMX), else None. Such a CPU computes them in fp32 on
    the bf16 weights (fewrows.widens), at fp32's speed or better, unless this project's kernel could
    not be built there: then a bf16 decode step took 2.41x fp32's time at 16 rows on an AVX2 AMD EPYC
    (BENCHMARKS.md). int8 products take fp32 rows, so a quantized rank is not told."""
    import platform

    import torch

    from . import cpu_kernels
    from .fewrows import bf16_instructions, widens

    if dtype != "bfloat16" or quantize or where != "cpu" or platform.machine() not in ("x86_64", "AMD64"):
        return None
    if bf16_instructions() or widens(torch.device("cpu"), torch.bfloat16):
        return None
    return f"{torch.backends.cpu.get_cpu_capability()}: {cpu_kernels.available()}"


# -- the run -------------------------------------------------------------------------------------------
def run_job(comm: Comm, job_path: str, opts: RunOptions) -> Summary | None:
    """Run a job on every rank; rank 0 returns the Summary, the others None."""
    rank, world = comm.rank, comm.size
    comm.step_timeout = None  # until the pipeline runs (a launch's earlier job had set it)
    heartbeat = None
    if rank == 0 and opts.launch_dir:  # from here on the launcher watches each rank's process
        heartbeat = Heartbeat(opts.launch_dir)
        heartbeat.ranks([{"rank": r, "host": h, "pid": pid, "boot": b}
                         for r, ((h, pid), b) in enumerate(zip(comm.where, comm.boots))])
    shared, local = _decide(comm, lambda: _read(job_path, opts, comm.hosts, mode="run"))
    cluster = Cluster.from_dict(shared.cluster)
    _become_device(comm, cluster, shared, table=True)
    if rank == 0:
        local.heartbeat = heartbeat
    spec = local.spec if rank == 0 else shared.spec()
    if shared.measure is not None:
        prof = _profile(comm, shared, cluster, spec, opts.repeats)
        if rank == 0:
            local.profile = prof
    plan_dict = shared.plan
    if plan_dict is None:
        plan_dict, _ = _decide(comm, lambda: (_make_plan(local, cluster, world).to_dict(), None))
    plan = Plan.from_dict(plan_dict, spec.num_units)
    if rank == 0:
        ranks = []
        for r, (n, (h, pid), t, d) in enumerate(zip(comm.names, comm.where, comm.threads, cluster.devices)):
            dtype, quantize = d.precision(shared.dtype, shared.quantize)
            ranks.append({"rank": r, "device": n, "host": h, "pid": pid, "threads": t, "dtype": dtype,
                          **({"quantize": quantize} if quantize else {})})
        attrs = {**local.attrs, "plan": plan.to_dict(), "ranks": ranks}
        if local.profile is not None:
            attrs["profile"] = local.profile.source
        local.writer = ResultWriter(local.output, attrs, overwrite=opts.overwrite, resume=opts.resume)
        if local.heartbeat is not None:
            _record_epoch(local.heartbeat, local.writer, cluster, plan)
        comm.step_timeout = opts.step_timeout  # from here on a silent pipeline means a lost rank

    try:
        prompts, parts = local.prompts if rank == 0 else None, []
        while True:  # one plan after another: a run moves to a new plan only with --replan
            summary = _execute(comm, spec, cluster, plan, local, prompts,
                               schedule=opts.schedule or (local.job.schedule if rank == 0 else ""),
                               in_flight=local.in_flight if rank == 0 else None, progress=opts.progress,
                               trace=opts.trace, shared=shared)
            nxt = comm.bcast(local.next_plan.to_dict() if rank == 0 and local.next_plan else None)
            if rank == 0:
                parts.append((plan, summary))
                if local.moves:
                    local.writer.set_attr("moves", local.moves)
                prompts = itertools.chain(summary.leftover, prompts)
                local.total -= summary.requests + summary.errors
                local.next_plan = None
            if nxt is None:
                break
            plan = Plan.from_dict(nxt, spec.num_units)
            if rank == 0 and local.heartbeat is not None:
                local.heartbeat.rest()  # reloading (and compiling) is no step: the launcher waits for the next
        if rank == 0:
            summary = _joined(parts)
            if opts.trace:
                local.writer.set_attr("trace", str(Path(opts.trace).resolve()))
            local.writer.set_attr("summary", summary.record())
            local.writer.close(complete=True)
        return summary
    finally:
        if rank == 0:
            local.writer.close()  # whatever happened, committed records stay readable


def between_jobs() -> None:
    """Before the next job of one launch: the last job's shards and compiled graphs are let go and its
    peak memory forgotten, so that each job runs, and reports, as it would in a launch of its own
    (its memory, its peak RSS, and dynamo's recompile limit)."""
    import gc

    if "torch._dynamo" in sys.modules:
        import torch._dynamo

        torch._dynamo.reset()
    gc.collect()
    release_freed_memory()
    reset_peak_rss()


def _record_epoch(heartbeat: Heartbeat, writer: ResultWriter, cluster: Cluster, plan: Plan) -> None:
    """Under `edgeshard launch`: this run's epoch joins the results file's `runs` (why it started, on which
    devices, its plan) and, at its first step back, how long after the loss it made progress again."""
    runs = json.loads(writer.attr("runs", "[]"))
    run = {**heartbeat.epoch(), "devices": [d.name for d in cluster.devices], "started": time.time(),
           "stages": [{"device": cluster.devices[s.rank].name, "first": s.first, "last": s.last} for s in plan.stages]}
    runs.append(run)
    writer.set_attr("runs", runs)
    heartbeat.opened()

    def progress(at: float) -> None:
        if "lost_at" in run:
            run["resumed_after_s"] = round(at - run["lost_at"], 3)
            writer.set_attr("runs", runs)

    heartbeat.first_progress = progress


def _joined(parts: list[tuple[Plan, Summary]]) -> Summary:
    """One Summary of a run that moved between plans: its parts' counts added, their means weighted by
    requests, the last plan's stages, and each part's plan and figures in `segments`. The wall time
    includes the reloads between parts (each part's own figures start after its load)."""
    if len(parts) == 1:
        return parts[0][1]
    summaries = [s for _, s in parts]
    last = summaries[-1]

    def mean(key: str) -> float:
        pairs = [(getattr(s, key), s.requests) for s in summaries if s.requests and not math.isnan(getattr(s, key))]
        n = sum(w for _, w in pairs)
        return sum(v * w for v, w in pairs) / n if n else float("nan")

    reloads = sum(max(st.get("load_s", 0.0) for st in s.ranks) for s in summaries[1:])
    return dataclasses.replace(
        last, requests=sum(s.requests for s in summaries), tokens=sum(s.tokens for s in summaries),
        seconds=sum(s.seconds for s in summaries) + reloads, ttft_ms=mean("ttft_ms"), ms_per_token=mean("ms_per_token"),
        shapes=[x for s in summaries for x in s.shapes], predicted=None, rows_per_step=mean("rows_per_step"),
        chunked=sum(s.chunked for s in summaries), errors=sum(s.errors for s in summaries), leftover=[],
        segments=[{"plan": p.to_dict(), "requests": s.requests, "tokens": s.tokens, "seconds": s.seconds,
                   "tokens_per_s": s.tokens_per_s, "load_s": max(st.get("load_s", 0.0) for st in s.ranks),
                   "stages": [{k: st[k] for k in ("rank", "device", "first", "last", "compute_s", "steps")}
                              for st in s.stages]}
                  for p, s in parts])


def _saved_profile(local: _Local) -> Profile | None:
    """A saved profile of this job's model and cluster at its shapes, if there is one, or one of a
    larger cluster that measured every device of this one (a cluster that lost devices)."""
    if local.shapes is None:
        return None
    devices = [d.to_dict() for d in local.cluster.devices]
    return find_profile(model_fingerprint(local.spec), cluster_fingerprint(devices), local.shapes, devices=devices)


def _work_clocks(comm: Comm, cluster: Cluster, plan: Plan, local: _Local | None) -> dict[int, StageLine]:
    """Collective: each stage's StageLine, by rank, for the devices that time their work (clock=work),
    from the profile the plan was made with (rank 0's; _read makes sure there is one)."""
    if not any(d.clock == "work" for d in cluster.devices):
        return {}
    lines = None
    if comm.rank == 0:
        costs = StepCosts.from_profile(local.profile or _saved_profile(local), plan)
        lines = {s.rank: costs.line(i) for i, s in enumerate(plan.stages) if cluster.devices[s.rank].clock == "work"}
    return comm.bcast(lines)


def _adopt_forms(comm: Comm, spec: ModelSpec, cluster: Cluster, local: _Local | None) -> None:
    """Collective: each rank takes the product and attention forms its device was profiled in
    (fewrows.adopt, attention.adopt), from the profile the plan was made with, where there is one and it
    recorded them; else a shard measures its own. Rank 0 names the devices kept from the widened bf16
    form by a profile timed without it."""
    import torch

    from . import attention
    from .fewrows import adopt, adopt_widened, bf16_instructions, can_widen, head_shape
    from .shard import TORCH_DTYPES

    recorded = {}
    if comm.rank == 0:
        prof = local.profile or _saved_profile(local)
        if prof is not None:
            by_name = {d["name"]: d.get("products") for d in prof.devices}
            rows = prof.shapes["micro_batch_size"]
            recorded = {r: (rows, by_name[d.name]) for r, d in enumerate(cluster.devices) if by_name.get(d.name)}
    mine = comm.bcast(recorded).get(comm.rank)
    me = cluster.devices[comm.rank]
    own = _own_spec(spec, me)
    dtype = TORCH_DTYPES[own.dtype]
    widened = None
    if mine is not None:
        rows, products = mine
        adopt(dtype, rows, products["turned"], products["packed"], products.get("head"), head_shape(spec),
              products.get("panels"))
        attention.adopt(dtype, rows, products.get("attention"))
        widened = products.get("widened")
    adopt_widened(dtype, widened)
    # where bf16 has no instructions of its own, only a kernel not built at profile time kept it unwidened
    narrow = comm.gather(widened is False and can_widen(torch.device(me.torch), dtype, own.quantize)
                         and not bf16_instructions())
    if comm.rank == 0 and any(narrow):
        names = ", ".join(d.name for d, n in zip(cluster.devices, narrow) if n)
        print(f"edgeshard: note: the profile timed bfloat16 in torch's products on {names}, where this "
              "project's kernel now computes them in float32 arithmetic, faster: this run computes as its "
              "plan was timed; profile again (edgeshard profile) to plan on the faster form",
              file=sys.stderr, flush=True)


def _watch(prof: Profile, cluster: Cluster, plan: Plan, threshold: float) -> DriftWatch:
    """Rank 0: a DriftWatch over the plan's stages, predicting from `prof`."""
    costs = StepCosts.from_profile(prof, plan)
    return DriftWatch([costs.line(i) for i in range(len(plan.stages))],
                      [cluster.devices[s.rank].name for s in plan.stages], threshold=threshold)


def _mover(local: _Local, prof: Profile, cluster: Cluster, plan: Plan, reload_s: float, in_flight: int):
    """Rank 0, with --replan: the source loop's `move(watch, requests, tokens)`. It scales each stage's
    device in `prof` (the watch's) by what the run measured (drift.DriftWatch.ratios), plans again, and says
    whether the new plan saves more of the time left than the move costs (drift.worth_moving); then
    `local.next_plan` is where the run goes once the micro-batches in flight have finished."""
    from tqdm import tqdm

    objective = local.objective if local.objective in ("latency", "throughput") else "throughput"
    key = "latency_s" if objective == "latency" else "bottleneck_s"

    def move(watch: DriftWatch, requests: int, tokens: int) -> bool:
        ratios = watch.ratios()
        measured = prof.scaled(
            {s.rank: r for s, r in zip(plan.stages, ratios) if r is not None})
        costs = measured.costs(kv_tokens=local.kv_tokens, row_tokens=local.longest)
        try:
            new = plan_for(costs, objective)
            _check_memory(local.spec, new, cluster, local.row_tokens * in_flight_for(
                local.schedule, len(new.stages), local.in_flight), local.longest)
        except PlanError:
            return False
        rate, between = watch.pace()
        per_request = tokens / requests if requests else local.job.generation.max_new_tokens
        remaining_s = (local.total - requests) * per_request / rate if rate > 0 else 0.0
        # while the last micro-batches of the old plan finish, the pipeline empties: about half of
        # a request's steps of each slot's round trip are lost
        drain_s = 0.5 * per_request * between * in_flight
        same = new.stages == plan.stages
        go, saved = (False, 0.0) if same else worth_moving(predict(costs, plan)[key], predict(costs, new)[key],
                                                           remaining_s, reload_s, drain_s)
        names = [d.name for d in cluster.devices]
        local.moves.append({
            "at_s": watch.last_s, "ratios": {names[s.rank]: r for s, r in zip(plan.stages, ratios)},
            "plan": plan.to_dict(), "candidate": new.to_dict(), "remaining_s": remaining_s, "saved_s": saved,
            "reload_s": reload_s, "drain_s": drain_s, "moved": go})
        stages = ", ".join(f"{names[s.rank]} {s.first}..{s.last}" for s in new.stages)
        verdict = ("it is this plan: staying" if same else
                   f"it saves {saved:.1f} s of the {remaining_s:.1f} s left, against {reload_s + drain_s:.1f} s "
                   f"to move: {'moving' if go else 'staying'}")
        tqdm.write(f"edgeshard: replan: the plan for the speeds measured is {stages}; {verdict}", file=sys.stderr)
        if go:
            local.measured, local.next_plan = measured, new
        return go

    return move


def _predict(local: _Local, plan: Plan, summary: Summary, schedule: str, in_flight: int) -> Simulation | None:
    """What the simulator predicts for this run: its plan and schedule, the requests it actually ran
    (prompt and output lengths, in admission order), from the profile it planned with or a saved one
    that matches; None when there is no such profile."""
    prof = local.profile or _saved_profile(local)
    if prof is None or not summary.shapes:
        return None
    # the replay costs about a microsecond an event (a stage's step): a job of millions is not
    # worth the wait at the end of a run (edgeshard simulate gives its shape's figures at once)
    mb = local.job.micro_batch_size
    steps = sum(max(n for _, n in summary.shapes[i:i + mb]) for i in range(0, len(summary.shapes), mb))
    if steps * len(plan.stages) > _MAX_REPLAY_EVENTS:
        return None
    requests = [Request(p, n) for p, n in summary.shapes]
    return simulate(StepCosts.from_profile(prof, plan), requests, micro_batch_size=local.job.micro_batch_size,
                    schedule=schedule, in_flight=in_flight, admission=summary.admission,
                    prefill_chunk=summary.prefill_chunk)


def _execute(comm: Comm, spec: ModelSpec, cluster: Cluster, plan: Plan, local: _Local | None, prompts,
             *, schedule: str, in_flight: int | None, progress: bool, shared: _Shared,
             trace: str | None = None) -> Summary | None:
    """Load this rank's shard (in its device's dtype and quantization), run the loops, gather every
    rank's figures; rank 0 returns the Summary.

    in_flight defaults to twice the plan's stages. With exactly as many, a micro-batch's trip back to
    the source and the prefill steps of newly admitted micro-batches (many times a decode step) leave
    stages short of work: on hetero4, 4 in flight kept the busiest stage 79-84% busy, 8 kept it 94%.
    """
    import torch

    rank = comm.rank
    device = cluster.devices[rank]
    index = plan.stage_of(rank)
    shard = None
    clocks = _work_clocks(comm, cluster, plan, local)
    _adopt_forms(comm, spec, cluster, local)
    t_load = time.perf_counter()
    if index is not None:
        st = plan.stages[index]
        shard = Shard(_own_spec(spec, device), st.first, st.last, device.torch, slowdown=device.slowdown,
                      memory=device.memory, compile=shared.compile, clock=clocks.get(rank), rows=shared.rows)
        shard.warm_up(shared.rows)  # compiles before the clock starts, never in a step the timeout watches
    load_s = time.perf_counter() - t_load
    comm.barrier()  # every shard loaded: the clock starts together
    reload_s = comm.gather(load_s)  # rank 0: what moving to another plan would cost again
    tracer = Tracer(enabled=trace is not None)
    tracer.start()

    stats = {"rank": rank, "device": device.name, "compute_s": 0.0, "steps": 0,
             "bytes": shard.param_bytes if shard else 0, "threads": torch.get_num_threads(), "load_s": load_s}
    start, cpu_start = time.perf_counter(), time.process_time()
    summary = None
    schedule = schedule or "no-bubbles"
    in_flight = in_flight_for(schedule, len(plan.stages), in_flight)
    if rank == 0:
        # the profile as the run has measured it so far; none for a given plan with none saved
        prof = local.measured or local.profile or _saved_profile(local)
        watch = _watch(prof, cluster, plan, local.drift) if prof else None
        move = _mover(local, prof, cluster, plan, max(reload_s), in_flight) if watch and local.replan else None
        summary = source_loop(comm, shard, plan, local.job, local.tok, prompts, local.writer, progress, stats,
                              tracer, schedule=schedule, in_flight=in_flight, total=local.total,
                              admission=local.admission, row_budget=local.row_tokens // local.job.micro_batch_size,
                              prefill_chunk=prefill_chunk_for(len(plan.stages), local.prefill_chunk),
                              watch=watch, move=move,
                              beat=local.heartbeat.beat if local.heartbeat else None)
        if watch is not None and watch.events:
            local.drifts += [dataclasses.asdict(d) for d in watch.events]
            local.writer.set_attr("drift", local.drifts)
    elif shard is not None:
        stage_loop(comm, shard, plan, index, stats, tracer)
    comm.barrier()  # ranks done early (or left out) wait here for the last one, without spinning
    # CPU time while running or waiting: an idle rank's share shows whether waits spin
    stats["wall_s"] = time.perf_counter() - start
    stats["cpu_s"] = time.process_time() - cpu_start
    stats["peak_rss"] = peak_rss()
    if shard is not None:  # the forms its products took: its profile's where that recorded them
        stats["products"] = {"turned": sorted(shard.turned), "head": sorted(shard.head_turned),
                             "packed": shard.packed, "panels": shard.paneled, "widened": shard.widened}
    if shard is not None and shard.clock is not None:  # steps the clock could not hold to its time
        stats["late_steps"] = shard.late
    if shard is not None and shard.compiled:  # the warm-up's, and any a run needed after it (none, normally)
        stats["compile_s"], stats["compile_graphs"] = shard.compiled.seconds, shard.compiled.graphs
    all_stats = comm.gather((stats, tracer.events))
    if rank != 0:
        return None
    tracks = [{"rank": st["rank"], "label": f"rank {st['rank']} {st['device']}", "events": ev} for st, ev in all_stats]
    all_stats = [st for st, _ in all_stats]
    by_rank = {st["rank"]: st for st in all_stats}
    summary.seconds = stats["wall_s"]
    summary.ranks = all_stats
    summary.stages = [{**by_rank[s.rank], "first": s.first, "last": s.last,
                       "units": f"{spec.units[s.first].name}..{spec.units[s.last].name}"} for s in plan.stages]
    sim = _predict(local, plan, summary, schedule, in_flight)
    summary.predicted = sim.to_dict() if sim else None
    if trace:
        write_chrome_trace(trace, tracks, {"schedule": schedule, "in_flight": in_flight, "plan": plan.to_dict(),
                                           "model": spec.name})
        print(f"edgeshard: trace written to {trace}", file=sys.stderr, flush=True)
    return summary


def profile_job(comm: Comm, job_path: str, opts: RunOptions, out: str | None = None) -> Profile | None:
    """`edgeshard profile`: measure the job's model on the cluster; rank 0 returns the saved Profile."""
    shared, local = _decide(comm, lambda: _read(job_path, dataclasses.replace(opts, profile=None), comm.hosts,
                                                   mode="profile"))
    cluster = Cluster.from_dict(shared.cluster)
    _become_device(comm, cluster, shared)
    spec = local.spec if comm.rank == 0 else shared.spec()
    return _profile(comm, shared, cluster, spec, opts.repeats, out)


def bench_job(comm: Comm, job_path: str, opts: RunOptions,
              configs: tuple[tuple[str, str], ...] = BENCH_DEFAULT) -> list[dict] | None:
    """`edgeshard bench`: the job's prompts under each (objective, schedule), one after the other.

    Every configuration plans from the same profile (saved, or measured first) and runs the same
    prompts; rank 0 returns one row per configuration. A plan that cannot be made (a baseline out
    of memory) gives a row with the reason instead.
    """
    import tempfile

    rank, world = comm.rank, comm.size
    shared, local = _decide(comm, lambda: _read(job_path, opts, comm.hosts, mode="bench"))
    cluster = Cluster.from_dict(shared.cluster)
    _become_device(comm, cluster, shared)
    spec = local.spec if rank == 0 else shared.spec()
    if shared.measure is not None:
        prof = _profile(comm, shared, cluster, spec, opts.repeats)
        if rank == 0:
            local.profile = prof
    if rank == 0:
        comm.step_timeout = opts.step_timeout  # a silent pipeline means a lost rank (profiling may be slower)
    rows = []
    tmpdir = tempfile.TemporaryDirectory(prefix="edgeshard-bench-") if rank == 0 else None
    tmp = tmpdir.name if tmpdir else None
    for i, (objective, schedule) in enumerate(configs):
        def decide_plan():
            try:
                return ("ok", _make_plan(local, cluster, world, objective).to_dict()), None
            except PlanError as e:
                return ("infeasible", str(e)), None

        (status, value), _ = _decide(comm, decide_plan)
        if status != "ok":
            rows.append({"objective": objective, "schedule": schedule, "error": value})
            continue
        plan = Plan.from_dict(value, spec.num_units)
        prompts = None
        if rank == 0:
            local.writer = ResultWriter(Path(tmp) / f"bench-{i}.h5", {"job": local.job.text}, overwrite=True)
            prompts = _tokenize(local.job, local.tok, spec, set(), strict=opts.strict)
        try:
            summary = _execute(comm, spec, cluster, plan, local, prompts, schedule=schedule,
                               in_flight=opts.micro_batches or (local.job.micro_batches if rank == 0 else None),
                               progress=False, shared=shared)
        finally:
            if rank == 0:
                local.writer.close(complete=True)
        if rank == 0:
            compute = [st["compute_s"] for st in summary.stages]
            rows.append({
                "objective": objective, "schedule": schedule, "plan": plan.to_dict(),
                "requests": summary.requests, "tokens": summary.tokens, "seconds": summary.seconds,
                "tokens_per_s": summary.tokens_per_s, "ms_per_token": summary.ms_per_token,
                "ttft_ms": summary.ttft_ms, "admission": summary.admission, "rows_per_step": summary.rows_per_step,
                "prefill_chunk": summary.prefill_chunk,
                "busy": [c / summary.seconds for c in compute],
                "predicted": summary.predicted,
                # the rate if the busiest stage never waited: tokens / its compute time, same run
                "ideal_tokens_per_s": summary.tokens / max(compute) if max(compute) > 0 else 0.0,
                "stages": summary.stages,
            })
    if tmpdir:
        tmpdir.cleanup()
    return rows if rank == 0 else None
