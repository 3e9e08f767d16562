"""What every rank does in a run: set up, load its shard, then the source loop or the stage loop.

    mpiexec -f hostfiles/local3.hosts -n 3 python -m edgeshard_mpi run jobs/demo.toml

Rank 0 is the source: it reads and tokenises the prompts, embeds them (it always holds unit 0),
runs its own units, sends the activations on, and receives the sampled token ids from the stage
that holds the head (logits never travel). Every other stage receives activations from the stage
before it, runs its units with that micro-batch's KV cache, and sends on; the head stage samples.
Ranks the plan leaves out wait, without spinning, for the end.

Schedule: `sequential`, one micro-batch at a time through all stages.
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .cluster import Cluster, Device, format_bytes, parse_hostfile
from .comm import ACT, STOP, TOKENS, Comm
from .jobs import Job, JobError, Request, read_prompts
from .models import ModelError, ModelSpec, prepare
from .planner import Plan, PlanError, even_plan
from .results import Record, ResultWriter
from .sampling import Sampler, SamplingParams
from .shard import Shard

__all__ = ["RunOptions", "Setup", "SetupFailed", "run_job", "Summary"]


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """Command-line choices that override the job file."""

    hostfile: str | None = None
    plan: str | None = None
    output: str | None = None
    overwrite: bool = False
    progress: bool = True


@dataclasses.dataclass(frozen=True)
class Setup:
    """What rank 0 decides before any compute and broadcasts to every rank."""

    model_path: str
    dtype: str
    plan: dict
    cluster: dict


@dataclasses.dataclass
class Summary:
    requests: int
    tokens: int
    seconds: float
    ttft_ms: float  # mean time to first token
    ms_per_token: float  # mean decode time per token
    stages: list[dict]  # per stage: rank, device, units, bytes, compute_s, steps, cpu_s, wall_s
    ranks: list[dict] = dataclasses.field(default_factory=list)  # the same figures for every rank

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


# -- setup (rank 0) ------------------------------------------------------------------------------
def _cluster(job: Job, opts: RunOptions, world: int) -> Cluster:
    hostfile = opts.hostfile or job.hostfile or os.environ.get("HYDRA_HOST_FILE")
    if not hostfile:
        return Cluster.local(world)
    return parse_hostfile(hostfile).for_world(world)


def _plan(job: Job, opts: RunOptions, spec: ModelSpec, world: int) -> Plan:
    n = spec.num_units
    if opts.plan:
        plan = Plan.load(opts.plan, n)
    elif job.plan and "file" in job.plan:
        plan = Plan.load(job.plan["file"], n)
    elif job.plan and "stages" in job.plan:
        plan = Plan.from_dict({"stages": job.plan["stages"], "objective": "manual"}, n, f"{job.path}: [plan]")
    else:
        plan = even_plan(n, world)
    plan.check_world(world)
    return plan


@dataclasses.dataclass
class _Prompt:
    request: Request
    ids: list[int]
    text: str  # the prompt as stored with the results (messages as JSON)


def _tokenize(job: Job, tok, spec: ModelSpec) -> list[_Prompt]:
    out = []
    for req in read_prompts(job.prompts, job.generation):
        if req.messages is not None or job.chat:
            messages = list(req.messages) if req.messages is not None else [{"role": "user", "content": req.prompt}]
            if not tok.chat_template:
                raise JobError(f"{req.where}: chat messages given but the model has no chat template")
            rendered = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            ids = tok(rendered, add_special_tokens=False)["input_ids"]
            text = req.prompt if req.messages is None else json.dumps(messages, ensure_ascii=False)
        else:
            ids = tok(req.prompt)["input_ids"]
            text = req.prompt
        if not ids:
            raise JobError(f"{req.where}: prompt tokenises to nothing")
        need = len(ids) + req.generation.max_new_tokens
        if need > spec.context:
            raise JobError(f"{req.where}: prompt of {len(ids)} tokens + max_new_tokens "
                           f"{req.generation.max_new_tokens} = {need} exceeds the model's context of "
                           f"{spec.context} tokens")
        out.append(_Prompt(req, ids, text))
    if not out:
        raise JobError(f"{job.prompts}: no prompts")
    return out


def _check_memory(spec: ModelSpec, plan: Plan, cluster: Cluster, job: Job, prompts: list[_Prompt]) -> None:
    """Each stage's weights plus its KV cache for a full micro-batch must fit its device."""
    longest = max(len(p.ids) + p.request.generation.max_new_tokens for p in prompts)
    for s in plan.stages:
        dev = cluster.devices[s.rank]
        need = spec.bytes_of(s.first, s.last) + spec.kv_bytes(s.first, s.last, longest * job.micro_batch_size)
        if dev.memory is not None and need > dev.memory:
            raise PlanError(f"{cluster.source}: device {dev.name} (rank {s.rank}) has {format_bytes(dev.memory)}, "
                            f"but units {s.first}..{s.last} need {format_bytes(need)} (weights + KV cache for "
                            f"{job.micro_batch_size} x {longest} tokens)")


def _versions() -> dict:
    import h5py
    import mpi4py
    import transformers
    from mpi4py import MPI

    return {"edgeshard_mpi": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "mpi4py": mpi4py.__version__, "h5py": h5py.__version__, "numpy": np.__version__,
            "mpi": MPI.Get_library_version().splitlines()[0].strip(), "python": sys.version.split()[0]}


# -- the run ---------------------------------------------------------------------------------------
class SetupFailed(Exception):
    """The job could not start; raised on every rank, and only rank 0 (quiet=False) reports it."""

    def __init__(self, message: str, quiet: bool = False):
        super().__init__(message)
        self.quiet = quiet


def _setup(job_path: str, opts: RunOptions, world: int):
    """Rank 0: read and check everything, prepare the model, open the results file."""
    job = Job.load(job_path)
    cluster = _cluster(job, opts, world)
    model_path = prepare(job.model)  # a preset is prepared once, here, while the others wait
    spec = ModelSpec.load(model_path, job.dtype, name=Path(job.model).name)
    plan = _plan(job, opts, spec, world)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    prompts = _tokenize(job, tok, spec)
    _check_memory(spec, plan, cluster, job, prompts)
    writer = ResultWriter(opts.output or job.output, {
        "job": job.text, "job_path": job.path, "plan": plan.to_dict(), "cluster": cluster.to_dict(),
        "model": {"name": spec.name, "path": spec.path, "dtype": spec.dtype, "config": spec.config},
        "versions": _versions(), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }, overwrite=opts.overwrite)
    setup = Setup(str(model_path), job.dtype, plan.to_dict(), cluster.to_dict())
    return setup, spec, (job, tok, prompts, writer)


def run_job(comm: Comm, job_path: str, opts: RunOptions) -> Summary | None:
    """Run a job on every rank; rank 0 returns the Summary, the others None."""
    rank, world = comm.rank, comm.size
    if rank == 0:
        try:
            setup, spec, source_state = _setup(job_path, opts, world)
        except Exception as e:
            # Bad input found before any compute: every rank leaves cleanly, rank 0 says why.
            msg = str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"
            comm.bcast(msg)
            raise SetupFailed(msg) from e
        comm.bcast(setup)
    else:
        setup = comm.bcast(None)
        if isinstance(setup, str):
            raise SetupFailed(setup, quiet=True)
    cluster = Cluster.from_dict(setup.cluster)
    spec = ModelSpec.load(setup.model_path, setup.dtype) if rank != 0 else spec
    plan = Plan.from_dict(setup.plan, spec.num_units)
    device = cluster.devices[rank]
    index = plan.stage_of(rank)

    shard = None
    if index is not None:
        s = plan.stages[index]
        shard = Shard(spec, s.first, s.last, device.torch)
    comm.barrier()  # every shard loaded: the clock starts together

    stats = {"rank": rank, "device": device.name, "compute_s": 0.0, "steps": 0,
             "bytes": shard.param_bytes if shard else 0}
    start, cpu_start = time.perf_counter(), time.process_time()
    summary = None
    try:
        if rank == 0:
            summary = _source_loop(comm, shard, plan, device, *source_state, opts, stats)
        elif shard is not None:
            _stage_loop(comm, shard, plan, index, device, stats)
        comm.barrier()  # ranks done early (or left out) wait here for the last one, without spinning
        # CPU time while running or waiting: an idle rank's share shows whether waits spin
        stats["wall_s"] = time.perf_counter() - start
        stats["cpu_s"] = time.process_time() - cpu_start
        stats["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
        all_stats = comm.gather(stats)
        if rank != 0:
            return None
        by_rank = {st["rank"]: st for st in all_stats}
        summary.seconds = stats["wall_s"]
        summary.ranks = all_stats
        summary.stages = [{**by_rank[s.rank], "first": s.first, "last": s.last,
                           "units": f"{spec.units[s.first].name}..{spec.units[s.last].name}"} for s in plan.stages]
        source_state[3].set_attr("summary", dataclasses.asdict(summary))
        return summary
    finally:
        if rank == 0:
            source_state[3].close()  # whatever happened, committed records stay readable


def _fault_check(rank: int, step: int) -> None:
    """EDGESHARD_FAULT=RANK[:STEP] raises on that rank (at that step): tests use it to check aborts."""
    fault = os.environ.get("EDGESHARD_FAULT")
    if fault:
        r, _, s = fault.partition(":")
        if int(r) == rank and (not s or int(s) == step):
            raise RuntimeError(f"injected fault (EDGESHARD_FAULT={fault}) at step {step}")


def _timed_forward(shard: Shard, stats: dict, slot: int, x: torch.Tensor, pads) -> torch.Tensor:
    t0 = time.perf_counter()
    out = shard.forward(slot, x.to(shard.device), pads)
    stats["compute_s"] += time.perf_counter() - t0
    stats["steps"] += 1
    return out


def _stage_loop(comm: Comm, shard: Shard, plan: Plan, index: int, device: Device, stats: dict) -> None:
    prev = plan.stages[index - 1].rank
    nxt = plan.stages[index + 1].rank if index + 1 < len(plan.stages) else None
    samplers: dict[int, Sampler] = {}
    while True:
        msg = comm.recv(prev)
        if msg.kind == STOP:
            if nxt is not None:
                comm.send(nxt, STOP)
            return
        _fault_check(comm.rank, msg.step)
        pads = None
        if msg.meta is not None:  # a micro-batch's first step: fresh cache, its rows' settings
            pads = [int(p) for p in msg.meta[:, 0]]
            if nxt is None:
                samplers[msg.slot] = Sampler([SamplingParams.from_row(r) for r in msg.meta[:, 1:]])
        out = _timed_forward(shard, stats, msg.slot, msg.tensor, pads)
        if nxt is not None:
            comm.send(nxt, ACT, msg.slot, msg.step, out, msg.meta)
        else:
            comm.send(0, TOKENS, msg.slot, msg.step, samplers[msg.slot](out))


def _eos_ids(model_path: str) -> set[int]:
    ids: set[int] = set()
    for name in ("generation_config.json", "config.json"):
        f = Path(model_path) / name
        if f.is_file():
            eos = json.loads(f.read_text()).get("eos_token_id")
            if eos is not None:
                ids.update(eos if isinstance(eos, list) else [eos])
                break  # generate() stops on the generation config's EOS when it has one
    return ids


class _Row:
    """One request's progress inside a micro-batch, on the source."""

    def __init__(self, prompt: _Prompt):
        self.prompt = prompt
        self.gen = prompt.request.generation
        self.tokens: list[int] = []
        self.finish: str | None = None
        self.text = ""
        self.t_first = self.t_last = 0.0

    def add(self, token: int, now: float, eos: set[int], tok) -> None:
        if self.finish:
            return  # a finished row rides along until its micro-batch ends; its tokens are dropped
        self.tokens.append(token)
        if len(self.tokens) == 1:
            self.t_first = now
        self.t_last = now
        if token in eos:
            self.finish = "eos"
        elif self.gen.stop:
            text = tok.decode(self.tokens, skip_special_tokens=True)
            cut = min((i for i in (text.find(s) for s in self.gen.stop) if i >= 0), default=-1)
            if cut >= 0:
                self.finish, self.text = "stop", text[:cut]
        if not self.finish and len(self.tokens) >= self.gen.max_new_tokens:
            self.finish = "length"


def _source_loop(comm: Comm, shard: Shard, plan: Plan, device: Device, job: Job, tok, prompts: list[_Prompt],
                 writer: ResultWriter, opts: RunOptions, stats: dict) -> Summary:
    from tqdm import tqdm

    nxt = plan.stages[1].rank if len(plan.stages) > 1 else None
    head = plan.stages[-1].rank
    eos = _eos_ids(shard.spec.path)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else min(eos)
    bar = tqdm(total=len(prompts), unit="req", disable=not opts.progress, file=sys.stderr, dynamic_ncols=True)
    total_tokens, ttfts, tpots = 0, [], []
    t_run = time.perf_counter()
    slot = 0  # sequential: one micro-batch in flight, always in slot 0
    for b in range(0, len(prompts), job.micro_batch_size):
        rows = [_Row(p) for p in prompts[b:b + job.micro_batch_size]]
        width = max(len(r.prompt.ids) for r in rows)
        pads = [width - len(r.prompt.ids) for r in rows]
        ids = torch.tensor([[pad_id] * p + r.prompt.ids for p, r in zip(pads, rows)], dtype=torch.long)  # (B, T)
        meta = np.array([[p, *r.gen.sampling().to_row()] for p, r in zip(pads, rows)], dtype=np.float64)
        sampler = Sampler([r.gen.sampling() for r in rows]) if nxt is None else None
        t_start = time.perf_counter()
        x, step = ids, 0
        while True:
            _fault_check(0, step)
            out = _timed_forward(shard, stats, slot, x, pads if step == 0 else None)
            if nxt is None:
                tokens = sampler(out)
            else:
                comm.send(nxt, ACT, slot, step, out, meta if step == 0 else None)
                tokens = comm.recv(head, TOKENS).tensor
            now = time.perf_counter()
            for r, t in zip(rows, tokens.tolist()):
                r.add(t, now, eos, tok)
            if all(r.finish for r in rows):
                break
            x, step = tokens[:, None], step + 1  # (B, 1)
        records = []
        for r in rows:
            n = len(r.tokens)
            text = r.text if r.finish == "stop" else tok.decode(r.tokens, skip_special_tokens=True)
            ttft = (r.t_first - t_start) * 1e3
            tpot = (r.t_last - r.t_first) * 1e3 / (n - 1) if n > 1 else float("nan")
            records.append(Record(r.prompt.request.id, r.prompt.request.where, r.prompt.text, text, r.tokens,
                                  r.finish, len(r.prompt.ids), n, ttft, tpot))
            total_tokens += n
            ttfts.append(ttft)
            if n > 1:
                tpots.append(tpot)
        writer.append(records)
        bar.update(len(rows))
        bar.set_postfix_str(f"{total_tokens / (time.perf_counter() - t_run):.1f} tok/s")
    bar.close()
    if nxt is not None:
        comm.send(nxt, STOP)
    shard.release(slot)
    return Summary(len(prompts), total_tokens, 0.0, float(np.mean(ttfts)),
                   float(np.mean(tpots)) if tpots else float("nan"), [])
