"""The `edgeshard` command (also `python -m edgeshard_mpi`).

    mpiexec -f hostfiles/local3.hosts -n 3 edgeshard run jobs/demo.toml --overwrite
    edgeshard show results/demo.h5 [--json]
    edgeshard model prepare smollm2-135m
    edgeshard model info smollm2-135m
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback

from .cluster import HostfileError, format_bytes
from .jobs import JobError
from .models import ModelError
from .planner import PlanError
from .results import ResultsError

__all__ = ["main"]

# Errors that come from what the user gave us: one clear line, no traceback.
_USER_ERRORS = (JobError, HostfileError, ModelError, PlanError, ResultsError, FileNotFoundError)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgeshard", description="EdgeShard LLM batch inference over MPI")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a job (under mpiexec)")
    run.add_argument("job", help="job file (TOML)")
    run.add_argument("--hostfile", help="hostfile with device declarations (default: the job's, or HYDRA_HOST_FILE)")
    run.add_argument("--plan", help="plan JSON to use instead of the job's")
    run.add_argument("--output", help="results HDF5 file (default: the job's)")
    run.add_argument("--overwrite", action="store_true", help="replace an existing results file")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")

    show = sub.add_parser("show", help="print the requests of a results file")
    show.add_argument("results")
    show.add_argument("--json", action="store_true", help="one JSON object per line")

    model = sub.add_parser("model", help="prepare or describe a model")
    msub = model.add_subparsers(dest="model_command", required=True)
    prep = msub.add_parser("prepare", help="prepare a preset (or check a folder) and print its folder")
    prep.add_argument("model")
    info = msub.add_parser("info", help="list the model's units and their bytes")
    info.add_argument("model")
    info.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "run":
        return _run(args)
    try:
        if args.command == "show":
            return _show(args)
        if args.command == "model":
            return _model(args)
    except _USER_ERRORS as e:
        print(f"edgeshard: error: {e}", file=sys.stderr)
        return 1
    raise AssertionError(args.command)


def _run(args) -> int:
    from .comm import Comm

    comm = Comm()
    try:
        from .pipeline import RunOptions, SetupFailed, run_job

        opts = RunOptions(hostfile=args.hostfile, plan=args.plan, output=args.output, overwrite=args.overwrite,
                          progress=not args.no_progress)
        summary = run_job(comm, args.job, opts)
    except SetupFailed as e:  # every rank knows; all leave normally, nothing to abort
        if not e.quiet:
            print(f"edgeshard: error: {e}", file=sys.stderr, flush=True)
        return 1
    except BaseException as e:  # any rank's failure ends the whole job, never a hang
        if isinstance(e, _USER_ERRORS):
            msg = str(e)
        else:
            msg = f"{type(e).__name__}: {e}"
            if os.environ.get("EDGESHARD_DEBUG"):
                traceback.print_exc()
        print(f"edgeshard: error on rank {comm.rank} of {comm.size}: {msg}", file=sys.stderr, flush=True)
        time.sleep(0.3)  # let mpiexec forward the message before the abort tears the job down
        comm.abort(1)
        return 1
    if summary is not None:
        _print_summary(summary, args)
    return 0


def _print_summary(s, args) -> None:
    print(f"edgeshard run: {s.requests} requests, {s.tokens} tokens in {s.seconds:.2f} s: "
          f"{s.tokens_per_s:.1f} tokens/s, {s.ms_per_token:.1f} ms/token (decode), "
          f"{s.ttft_ms:.0f} ms to first token")
    print(f"{'stage':>5}  {'rank':>4}  {'device':<14} {'units':<22} {'weights':>11}  {'compute s':>9}")
    for i, st in enumerate(s.stages):
        units = f"{st['units']} ({st['first']}..{st['last']})"
        print(f"{i:>5}  {st['rank']:>4}  {st['device']:<14} {units:<22} "
              f"{format_bytes(st['bytes']):>11}  {st['compute_s']:>9.2f}")


def _show(args) -> int:
    from .results import read_results

    for r in read_results(args.results):
        if args.json:
            d = dict(r.__dict__)
            for k in ("ttft_ms", "ms_per_token"):
                if math.isnan(d[k]):
                    d[k] = None
            print(json.dumps(d, ensure_ascii=False))
        else:
            print(f"--- {r.id} ({r.where}) [{r.finish_reason}, {r.output_tokens} tokens]")
            print(f"prompt: {r.prompt}")
            print(f"text:   {r.text}")
    return 0


def _model(args) -> int:
    from .models import ModelSpec, prepare

    path = prepare(args.model)
    if args.model_command == "prepare":
        print(path)
        return 0
    spec = ModelSpec.load(path, args.dtype)
    print(f"{spec.name}: {spec.num_units} units ({spec.num_layers} blocks), context {spec.context}, {args.dtype}, "
          f"{format_bytes(spec.bytes_of(0, spec.num_units - 1))}")
    print(f"{'unit':>4}  {'name':<10} {'weights':>11}  {'KV/token':>9}  {'out/token':>9}")
    for u in spec.units:
        print(f"{u.index:>4}  {u.name:<10} {format_bytes(u.param_bytes):>11}  {u.kv_bytes_per_token:>9}  "
              f"{u.out_bytes_per_token:>9}")
    return 0
