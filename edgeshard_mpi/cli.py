"""The `edgeshard` command (also `python -m edgeshard_mpi`).

    mpiexec -f hostfiles/local3.hosts -n 3 edgeshard run jobs/demo.toml --overwrite
    mpiexec -f hostfiles/hetero4.hosts -n 4 edgeshard profile jobs/hetero4.toml
    edgeshard plan --profile profiles/paper-llama2-7b.json --objective latency
    edgeshard simulate --profile profiles/paper-llama2-70b.json --objective throughput --micro-batches 16
    edgeshard launch jobs/demo.toml -f hostfiles/local3.hosts --max-restarts 3 --overwrite
    edgeshard show results/demo.h5 [--json] [--runs]
    edgeshard show --timeline traces/run.json --out timeline.png
    edgeshard model prepare smollm2-135m
    edgeshard model info smollm2-135m
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
import traceback

from .cluster import HostfileError, format_bytes
from .drift import DEFAULT_THRESHOLD, DEFAULT_WINDOW
from .jobs import BENCH_DEFAULT, SCHEDULES, JobError
from .scheduler import ADMISSIONS
from .models import ModelError
from .planner import OBJECTIVES, PlanError
from .profiler import LOADS, ProfileError
from .results import ResultsError
from .scheduler import in_flight_for

__all__ = ["main"]

# Errors that come from what the user gave us: one clear line, no traceback.
_USER_ERRORS = (JobError, HostfileError, ModelError, PlanError, ProfileError, ResultsError, FileNotFoundError)


def _job_shape_args(p: argparse.ArgumentParser) -> None:
    """The job shape a plan is simulated at; defaults come from the profile's shapes."""
    p.add_argument("--prompt-tokens", type=int, help="prompt length (default: the profile's)")
    p.add_argument("--new-tokens", type=int, help="tokens generated per request (default: twice the profile's "
                   "context minus its prompt, the job it was profiled for)")
    p.add_argument("--micro-batches", type=int, help="micro-batches in the job (default: those in flight)")
    p.add_argument("--in-flight", type=int, help="micro-batches in flight (default: twice the stages)")


def _profile_load_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile-load", choices=list(LOADS), default="turns",
                   help="a profile measured here: ranks take turns, unit by unit (default), or all measure at "
                        "once, under the load a run puts on ranks that share a host; each is saved and found apart")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgeshard", description="EdgeShard LLM batch inference over MPI")
    sub = p.add_subparsers(dest="command", required=True)

    # no abbreviated options: `launch` passes its unknown options on to `run`, and must know them whole
    run = sub.add_parser("run", help="run a job (under mpiexec)", allow_abbrev=False)
    run.add_argument("job", nargs="+", help="job file (TOML); several run one after another in this launch, "
                                           "the ranks started once")
    run.add_argument("--hostfile", help="hostfile with device declarations (default: the job's, or HYDRA_HOST_FILE)")
    run.add_argument("--plan", help="plan JSON to use instead of the job's")
    run.add_argument("--objective", choices=list(OBJECTIVES),
                     help="plan at start from a profile for this objective (overrides the job's plan)")
    run.add_argument("--profile", help="profile JSON to plan from (default: a saved matching one, else measure)")
    run.add_argument("--output", help="results HDF5 file (default: the job's)")
    run.add_argument("--overwrite", action="store_true", help="replace an existing results file")
    run.add_argument("--resume", action="store_true",
                     help="continue an existing results file: skip the requests it already holds (errors too)")
    run.add_argument("--retry-errors", action="store_true",
                     help="with --resume: run the requests the file holds as errors again (after fixing their lines)")
    run.add_argument("--strict", action="store_true",
                     help="stop at the first request that cannot run (default: record it as an error and go on)")
    run.add_argument("--schedule", choices=list(SCHEDULES), help="pipeline schedule (default: the job's)")
    run.add_argument("--admission", choices=list(ADMISSIONS),
                     help="row: a finished row's place takes the next prompt at its micro-batch's next step; "
                          "batch: new prompts only when a whole micro-batch finished (default: the job's)")
    run.add_argument("--prefill-chunk", type=_tokens, metavar="N",
                     help="with row admission, a prompt longer than N tokens prefills N a step beside the "
                          "other rows' decode steps; 0: in one step (default: the job's, else 64 on a pipeline "
                          "of more than one stage and 0 on one)")
    run.add_argument("--micro-batches", type=int, help="micro-batches in flight (default: the job's, "
                     "else twice the plan's stages)")
    run.add_argument("--compile", action="store_true", default=None,
                     help="torch.compile each stage's decode step before the run (default: the job's compile)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument("--trace", help="write every rank's timeline to this Chrome trace JSON (Perfetto opens it)")
    run.add_argument("--step-timeout", type=_seconds, default=25.0, metavar="S",
                     help="end the job when no tokens reach rank 0 for S seconds, naming the lost rank "
                          "(default 25, so that a lost rank ends the job within 30 s; 0 = wait forever)")
    run.add_argument("--drift", type=_fraction, default=DEFAULT_THRESHOLD, metavar="F",
                     help="a stage whose compute is off its profile's by more than this fraction, over its last "
                          f"{DEFAULT_WINDOW} steps, is drifting: said on the progress line and recorded "
                          f"(default {DEFAULT_THRESHOLD})")
    _profile_load_option(run)
    run.add_argument("--replan", action="store_true",
                     help="when a stage drifts, plan again on the speeds measured, and move to that plan "
                          "(the micro-batches in flight finish, the shards reload) if it saves more than that costs")

    run.add_argument("--launch-dir", help=argparse.SUPPRESS)  # set by `edgeshard launch` (launcher.py)

    launch = sub.add_parser("launch", allow_abbrev=False,
                            help="run a job under mpiexec and, when a device is lost, again on the survivors "
                                 "(not under mpiexec; other options go to `edgeshard run`)")
    launch.add_argument("job", help="job file (TOML)")
    launch.add_argument("-f", "--hostfile", dest="hosts", help="hostfile (default: the job's)")
    launch.add_argument("-n", type=int, dest="ranks", help="ranks: the hostfile's first N slots (default: all)")
    launch.add_argument("--max-restarts", type=_count, metavar="K",
                        help="runs again after a loss at most K times (default: MAX_RESTARTS, else 3)")
    launch.add_argument("--grace", type=_seconds, default=0.0, metavar="T",
                        help="after a loss, wait T seconds and ask the lost devices' hosts: a device whose host "
                             "answers runs again (default 0: dropped at once)")
    launch.add_argument("--step-timeout", type=_seconds, default=25.0, metavar="S",
                        help="as for run; rank 0 silent for S + 3 seconds is hung, and the job runs again")
    launch.add_argument("--output", help="results HDF5 file (default: the job's)")
    launch.add_argument("--launch-dir", help="folder of the launch's state and log (default: the results file "
                                             "+ .launch)")

    bench = sub.add_parser("bench", help="run the job's prompts under several plans and schedules (under mpiexec)")
    bench.add_argument("job")
    bench.add_argument("--hostfile")
    _profile_load_option(bench)
    bench.add_argument("--configs", help="comma-separated objective:schedule pairs (default: "
                       + ",".join(f"{o}:{s}" for o, s in BENCH_DEFAULT) + ")")
    bench.add_argument("--micro-batches", type=int, help="micro-batches in flight (default: the job's, else twice the stages)")
    bench.add_argument("--admission", choices=list(ADMISSIONS), help="row or batch (default: the job's)")
    bench.add_argument("--prefill-chunk", type=_tokens, metavar="N",
                       help="prompt tokens a step prefills of a long prompt; 0: whole (default: the job's, else "
                            "64 on a pipeline of more than one stage and 0 on one)")
    bench.add_argument("--profile", help="profile JSON to plan from (default: a saved matching one, else measure)")
    bench.add_argument("--json", help="also save the rows as JSON to this file")
    bench.add_argument("--compile", action="store_true", default=None,
                       help="torch.compile each stage's decode step before each run (default: the job's compile)")
    bench.add_argument("--step-timeout", type=_seconds, default=25.0, metavar="S",
                       help="end the job when no tokens reach rank 0 for S seconds (default 25; 0 = never)")

    prof = sub.add_parser("profile", help="measure units and links on every rank (under mpiexec)")
    prof.add_argument("job", nargs="?", help="job file: model, dtype, prompts (for shapes), micro-batch size, hostfile")
    prof.add_argument("--compare", nargs=2, metavar=("OLD", "NEW"),
                      help="print what moved between two saved profiles of one cluster (no mpiexec, no job)")
    prof.add_argument("--hostfile")
    prof.add_argument("--out", help="profile JSON to write (default: profiles/measured/<key>.json)")
    prof.add_argument("--repeats", type=int, default=5, help="runs per measurement; the median is kept")
    _profile_load_option(prof)

    plan = sub.add_parser("plan", help="plan from a profile and print the plan")
    plan.add_argument("--profile", required=True)
    plan.add_argument("--objective", default="throughput", choices=list(OBJECTIVES))
    plan.add_argument("--kv-tokens", type=int, help="KV-cache tokens each unit must hold "
                      "(default: micro-batch x context of the profile)")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    plan.add_argument("--out", help="save the plan as JSON (for run --plan)")
    _job_shape_args(plan)

    sim = sub.add_parser("simulate", help="replay the schedules on a profile and a plan: predicted figures")
    sim.add_argument("--profile", required=True)
    how = sim.add_mutually_exclusive_group()
    how.add_argument("--objective", choices=list(OBJECTIVES), help="plan for this objective (default: throughput)")
    how.add_argument("--plan", help="plan JSON to simulate instead")
    sim.add_argument("--schedule", choices=list(SCHEDULES), help="one schedule (default: all three)")
    sim.add_argument("--kv-tokens", type=int, help="KV-cache tokens each unit must hold (planning)")
    _job_shape_args(sim)
    sim.add_argument("--trace", help="write the simulated timeline (one schedule) as a Chrome trace JSON")
    sim.add_argument("--json", action="store_true", help="print the figures as JSON")

    show = sub.add_parser("show", help="print the requests of a results file, or draw a timeline")
    show.add_argument("results", nargs="?", help="results HDF5 file")
    show.add_argument("--json", action="store_true", help="one JSON object per line")
    show.add_argument("--runs", action="store_true",
                      help="the runs (epochs) of a job under `edgeshard launch`: why each began, its devices, its plan")
    show.add_argument("--timeline", metavar="RESULT_OR_TRACE",
                      help="draw the timeline of a trace JSON (or of the run that wrote a results file)")
    show.add_argument("--out", help="PNG to draw the timeline into (default: the trace's name with .png)")
    show.add_argument("--window", help="only START:END seconds of the timeline")

    export = sub.add_parser("export", help="write a results file as OpenAI batch output or flat JSON lines")
    export.add_argument("results", help="results HDF5 file")
    export.add_argument("--format", choices=["openai", "jsonl", "parquet"], default="openai",
                        help="openai: one batch response line a request (chat.completion or text_completion, or "
                             "its error); jsonl: one flat record a line; parquet: the flat records as a Parquet "
                             "table (needs pyarrow: the parquet extra). All in the prompt file's order")
    export.add_argument("--out", help="file to write (default: standard output; parquet needs one)")

    model = sub.add_parser("model", help="prepare or describe a model")
    msub = model.add_subparsers(dest="model_command", required=True)
    prep = msub.add_parser("prepare", help="prepare a preset, convert a GGUF file (or check a folder); print its folder")
    prep.add_argument("model")
    info = msub.add_parser("info", help="list the model's units and their bytes")
    info.add_argument("model")
    info.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    info.add_argument("--quantize", choices=["int8"], help="weight-only int8 matrices, one scale a row")
    return p


def _count(text: str) -> int:
    """A whole number >= 0 (restarts)."""
    if not text.strip().isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 0")
    return int(text)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds >= 0")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < 100:
        raise argparse.ArgumentTypeError(f"{text!r} is not a fraction > 0 (0.25 = 25%)")
    return value


def _tokens(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of tokens >= 0")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, rest = parser.parse_known_args(argv)
    if rest and args.command != "launch":  # launch passes what it does not know on to `run`
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "launch":
        passed = parser.parse_args(["run", args.job, *rest])  # what goes on to `run` must be its options: checked now
        if len(passed.job) > 1:
            parser.error(f"launch: one job, not {len(passed.job)} (to run several in one launch: mpiexec ... run A B)")
        if args.max_restarts is None:
            try:
                args.max_restarts = _count(os.environ.get("MAX_RESTARTS", "3"))
            except argparse.ArgumentTypeError as e:
                parser.error(f"MAX_RESTARTS: {e}")
        return _launch(args, rest)
    if args.command == "profile" and args.compare:
        try:
            return _compare(*args.compare)
        except _USER_ERRORS as e:
            print(f"edgeshard: error: {e}", file=sys.stderr)
            return 1
    if args.command == "profile" and not args.job:
        parser.error("profile: give a job file, or --compare OLD NEW")
    if args.command in ("run", "profile", "bench"):
        return _mpi_command(args)
    try:
        if args.command == "show":
            return _show(args)
        if args.command == "export":
            return _export(args)
        if args.command == "plan":
            return _plan(args)
        if args.command == "simulate":
            return _simulate(args)
        if args.command == "model":
            return _model(args)
    except (*_USER_ERRORS, ValueError) as e:  # these commands run no model: a ValueError is a bad argument
        print(f"edgeshard: error: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `edgeshard show F | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing more to flush at exit
        return 0
    raise AssertionError(args.command)


def _launch(args, rest: list[str]) -> int:
    import shlex

    from .launcher import LaunchOptions, launch

    try:
        hosts = args.hosts
        if not hosts:
            from .jobs import Job

            hosts = Job.load(args.job).hostfile
            if not hosts:
                raise JobError(f"{args.job}: no hostfile: give -f HOSTFILE")
        mpiexec = (*shlex.split(os.environ.get("MPIEXEC", "mpiexec")), *shlex.split(os.environ.get("MPIEXEC_ARGS", "")))
        return launch(LaunchOptions(args.job, hosts, args.ranks, max_restarts=args.max_restarts, grace=args.grace,
                                    step_timeout=args.step_timeout, output=args.output, folder=args.launch_dir,
                                    run_args=tuple(rest), mpiexec=mpiexec,
                                    python=os.environ.get("PYTHON", sys.executable)))
    except (*_USER_ERRORS, ValueError) as e:
        print(f"edgeshard launch: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # the job was ended with it (launcher._run); what it wrote is kept
        print("edgeshard launch: interrupted; the results so far are kept: launch again to resume", file=sys.stderr)
        return 130


def _mpi_command(args) -> int:
    from .comm import Comm, RankLost

    comm = Comm()
    try:
        from .runner import RunOptions, SetupFailed, bench_job, between_jobs, profile_job, run_job

        if args.command == "bench":
            configs = BENCH_DEFAULT
            if args.configs:
                configs = tuple(tuple(c.split(":", 1)) for c in args.configs.split(","))
                for c in configs:
                    if len(c) != 2 or c[0] not in OBJECTIVES or c[1] not in SCHEDULES:
                        raise SetupFailed(f"--configs: {':'.join(c)!r} is not objective:schedule "
                                          f"(objectives: {', '.join(OBJECTIVES)}; schedules: {', '.join(SCHEDULES)})",
                                          quiet=comm.rank != 0)
            rows = bench_job(comm, args.job, RunOptions(hostfile=args.hostfile, profile=args.profile,
                                                        micro_batches=args.micro_batches, compile=args.compile,
                                                        admission=args.admission,
                                                        prefill_chunk=args.prefill_chunk,
                                                        step_timeout=args.step_timeout or None,
                                                        profile_load=args.profile_load), configs)
            if rows is not None:
                _print_bench(rows)
                if args.json:
                    with open(args.json, "w") as f:
                        json.dump(rows, f, indent=1)
            return 0
        if args.command == "profile":
            prof = profile_job(comm, args.job, RunOptions(hostfile=args.hostfile, repeats=args.repeats,
                                                          profile_load=args.profile_load), args.out)
            if prof is not None:
                _print_profile(prof)
            return 0
        opts = RunOptions(hostfile=args.hostfile, plan=args.plan, objective=args.objective, profile=args.profile,
                          output=args.output, overwrite=args.overwrite, resume=args.resume, schedule=args.schedule,
                          admission=args.admission, prefill_chunk=args.prefill_chunk,
                          micro_batches=args.micro_batches, progress=not args.no_progress, trace=args.trace,
                          step_timeout=args.step_timeout or None, compile=args.compile, strict=args.strict,
                          retry_errors=args.retry_errors, drift=args.drift, replan=args.replan,
                          profile_load=args.profile_load, launch_dir=args.launch_dir)
        if len(args.job) > 1:
            named = [o for o, v in (("--output", args.output), ("--trace", args.trace),
                                    ("--launch-dir", args.launch_dir)) if v]
            if named:  # one file for several jobs: each would overwrite the last
                raise SetupFailed(f"{', '.join(named)} names one file: give one job, not {len(args.job)}",
                                  quiet=comm.rank != 0)
        failed = 0
        for i, job in enumerate(args.job):
            if i:
                between_jobs()
            try:
                summary = run_job(comm, job, opts)
            except SetupFailed as e:  # every rank knows, and goes on to the next job
                if not e.quiet:
                    where = f" run {job}: " if len(args.job) > 1 else ": "
                    print(f"edgeshard{where}error: {e}", file=sys.stderr, flush=True)
                failed += 1
                continue
            if summary is not None:
                _print_summary(summary, job if len(args.job) > 1 else None)
        if failed and comm.rank == 0 and len(args.job) > 1:
            print(f"edgeshard run: {failed} of {len(args.job)} jobs could not start", file=sys.stderr, flush=True)
        return 1 if failed else 0
    except SetupFailed as e:  # every rank knows; all leave normally, nothing to abort
        if not e.quiet:
            print(f"edgeshard: error: {e}", file=sys.stderr, flush=True)
        return 1
    except BaseException as e:  # any rank's failure ends the whole job, never a hang
        if isinstance(e, RankLost) and e.ranks and getattr(args, "launch_dir", None):
            from .launcher import Heartbeat  # the launcher runs the job again without them

            Heartbeat(args.launch_dir).lost(e.ranks, [comm.names[r] for r in e.ranks])
        if isinstance(e, _USER_ERRORS + (RankLost, OSError)):
            msg = str(e)  # the message names the rank, device or file; a traceback would add nothing
        else:
            msg = f"{type(e).__name__}: {e}"
            if os.environ.get("EDGESHARD_DEBUG"):
                traceback.print_exc()
        print(f"edgeshard: error on rank {comm.rank} of {comm.size}: {msg}", file=sys.stderr, flush=True)
        time.sleep(0.3)  # let mpiexec forward the message before the abort tears the job down
        comm.abort(1)
        return 1


def _print_summary(s, job: str | None = None) -> None:
    errors = f" ({s.errors} could not run: errors in the results file)" if s.errors else ""
    head = f"edgeshard run {job}" if job else "edgeshard run"  # a launch of several jobs names each
    print(f"{head}: {s.requests} requests{errors}, {s.tokens} tokens in {s.seconds:.2f} s: "
          f"{s.tokens_per_s:.1f} tokens/s, {s.ms_per_token:.1f} ms/token (decode), "
          f"{s.ttft_ms:.0f} ms to first token; {s.rows_per_step:.2f} rows a step ({s.admission} admission"
          + (f", {s.chunked} joined by chunks of {s.prefill_chunk} tokens" if s.chunked else "") + ")")
    p = s.predicted
    if p:
        print(f"predicted (simulated on the profile, same plan, schedule and requests): "
              f"{p['tokens_per_s']:.1f} tokens/s, {p['ms_per_token']:.1f} ms/token, {p['ttft_ms']:.0f} ms to first "
              f"token; measured / predicted: tokens/s {s.tokens_per_s / p['tokens_per_s']:.2f}, "
              f"ms/token {s.ms_per_token / p['ms_per_token']:.2f}")
    print(f"{'stage':>5}  {'rank':>4}  {'device':<14} {'units':<30} {'weights':>11}  {'compute s':>9}  {'busy':>5}"
          + ("  predicted" if p else ""))
    for i, st in enumerate(s.stages):
        units = f"{st['units']} ({st['first']}..{st['last']})"
        print(f"{i:>5}  {st['rank']:>4}  {st['device']:<14} {units:<30} "
              f"{format_bytes(st['bytes']):>11}  {st['compute_s']:>9.2f}  {st['compute_s'] / s.seconds:>5.0%}"
              + (f"  {p['busy'][i]:>9.0%}" if p else ""))
    for i, seg in enumerate(s.segments):  # a run that moved to new plans: each plan's part
        stages = ", ".join(f"{st['device']} {st['first']}..{st['last']}" for st in seg["stages"])
        print(f"plan {i + 1} of {len(s.segments)}: {stages}: {seg['requests']} requests, {seg['tokens']} tokens in "
              f"{seg['seconds']:.2f} s ({seg['tokens_per_s']:.1f} tokens/s), loaded in {seg['load_s']:.2f} s")
    late = [st for st in s.stages if st.get("late_steps")]
    if late:  # clock=work could not hold these steps to the profile's time: the host was too busy
        print("steps whose compute outlasted their clock=work time: " + ", ".join(
            f"rank {st['rank']} {st['late_steps']} of {st['steps']}" for st in late))
    compiled = [st for st in s.stages if "compile_s" in st]
    if compiled:  # before the clock started: not in the figures above
        from .compiling import cache_dir

        print("compiled decode steps, before the run: " + ", ".join(
            f"rank {st['rank']} {st['compile_s']:.1f} s ({st['compile_graphs']} graphs)" for st in compiled)
            + f"; cached in {cache_dir()}")


def _show(args) -> int:
    from .results import read_results

    if args.timeline:
        return _timeline(args)
    if not args.results:
        raise ValueError("show: give a results file, or --timeline RESULT_OR_TRACE")
    if args.runs:
        from .launcher import describe_runs
        from .results import read_attrs

        runs = json.loads(read_attrs(args.results).get("runs", "[]"))
        if not runs:
            print(f"{args.results}: no runs recorded (the job did not run under `edgeshard launch`)")
        for line in describe_runs(runs):
            print(line)
        return 0

    for r in read_results(args.results):
        if args.json:
            d = dict(r.__dict__)
            for k in ("ttft_ms", "ms_per_token"):
                if math.isnan(d[k]):
                    d[k] = None
            print(json.dumps(d, ensure_ascii=False))
        elif r.status == "error":
            print(f"--- {r.id} ({r.where}) [error]")
            print(f"error:  {r.error}")
        else:
            choice = f"choice {r.choice}, " if r.choice else ""
            print(f"--- {r.id} ({r.where}) [{choice}{r.finish_reason}, {r.output_tokens} tokens]")
            print(f"prompt: {r.prompt}")
            print(f"text:   {r.text}")
    return 0


def _export(args) -> int:
    import datetime

    from .openai_batch import export_flat, export_openai
    from .results import read_attrs, read_results

    records = read_results(args.results)
    if args.format == "parquet":
        try:
            import pyarrow
            import pyarrow.parquet
        except ImportError:
            raise ResultsError("export --format parquet needs pyarrow: pip install -e \".[parquet]\"") from None
        if not args.out:
            raise ResultsError("export --format parquet writes a file: give --out FILE.parquet")
        pyarrow.parquet.write_table(pyarrow.Table.from_pylist(list(export_flat(records))), args.out)
        return 0
    if args.format == "openai":
        attrs = read_attrs(args.results)
        model = json.loads(attrs.get("model", "{}")).get("name", "edgeshard")
        try:  # the run's start, as the responses' `created`
            created = int(datetime.datetime.strptime(attrs.get("created", ""), "%Y-%m-%dT%H:%M:%S%z").timestamp())
        except ValueError:
            created = 0
        lines = export_openai(records, model, created, _token_text(attrs) if any(r.logprobs for r in records) else None)
    else:
        lines = export_flat(records)
    out = open(args.out, "w", encoding="utf-8") if args.out else sys.stdout
    try:
        for line in lines:
            out.write(json.dumps(line, ensure_ascii=False) + "\n")
    finally:
        if args.out:
            out.close()
    return 0


def _token_text(attrs: dict):
    """A token id's text, from the run's tokenizer (its model folder, as the results file names it)."""
    from transformers import AutoTokenizer

    path = json.loads(attrs.get("model", "{}")).get("path")
    if not path or not os.path.isdir(path):
        raise ResultsError(f"the results name the model folder {path!r}, which is not here: its tokenizer "
                           "names the tokens of logprobs")
    tok = AutoTokenizer.from_pretrained(path)
    return lambda t: tok.decode([t])


def _model(args) -> int:
    from .models import ModelSpec, prepare

    path = prepare(args.model)
    if args.model_command == "prepare":
        print(path)
        return 0
    spec = ModelSpec.load(path, args.dtype, quantize=args.quantize)
    stored = f"{args.dtype}, int8 matrices" if args.quantize else args.dtype
    print(f"{spec.name}: {spec.family}, {spec.num_units} units ({spec.num_layers} blocks), context {spec.context}, "
          f"{stored}, {format_bytes(spec.bytes_of(0, spec.num_units - 1))}")
    if spec.source:
        types = ", ".join(f"{n} {t}" for t, n in spec.source["tensor_types"].items())
        print(f"converted from {spec.source['gguf']} ({types} tensors); quantized tensors were dequantized, "
              f"saved as {spec.source['saved_dtype']}, loaded as {args.dtype}")
    print(f"{'unit':>4}  {'name':<10} {'weights':>11}  {'KV/token':>9}  {'KV window':>9}  {'out/token':>9}")
    for u in spec.units:
        window = "" if u.kv_window is None else u.kv_window
        print(f"{u.index:>4}  {u.name:<10} {format_bytes(u.param_bytes):>11}  {u.kv_bytes_per_token:>9}  "
              f"{window:>9}  {u.out_bytes_per_token:>9}")
    return 0


def _compare(old_path: str, new_path: str) -> int:
    """`edgeshard profile --compare OLD NEW`: each device's and link's figures, old and new, the largest
    moves first."""
    from .profiler import Profile, compare

    old, new = Profile.load(old_path), Profile.load(new_path)
    print(f"{old.source} ({old.created or 'undated'}) -> {new.source} ({new.created or 'undated'})")
    if old.model.get("fingerprint") != new.model.get("fingerprint") or old.shapes != new.shapes:
        print(f"note: model or shapes differ ({old.model.get('name')} {old.shapes} -> {new.model.get('name')} "
              f"{new.shapes}): the figures measure other work")

    def change(a, b) -> float:
        if a is None or b is None:  # an unlimited link
            return 0.0 if a == b else float("inf")
        return b / a - 1 if a else (0.0 if b == a else float("inf"))

    def shown(what: str, x) -> str:
        if x is None:
            return "unlimited"
        if what.endswith("bandwidth"):
            return f"{x * 8 / 1e6:.1f} Mbit/s"
        return f"{x * 1e3:.2f} ms"

    rows = sorted(compare(old, new), key=lambda r: -abs(change(r[1], r[2])))
    print(f"{'what':<44} {'old':>14} {'new':>14} {'change':>8}")
    for what, a, b in rows:
        print(f"{what:<44} {shown(what, a):>14} {shown(what, b):>14} {change(a, b):>+8.1%}")
    return 0


def _print_profile(prof) -> None:
    s = prof.shapes
    print(f"profile of {prof.model['name']} ({prof.model['dtype']}) on {len(prof.devices)} devices, "
          f"micro-batch {s['micro_batch_size']}, prompt {s['prompt_tokens']} tokens, context {s['context']}: "
          f"{prof.source}")
    print(f"{'rank':>4}  {'device':<14} {'slowdown':>8} {'prefill ms':>10} {'decode ms':>10} {'spread':>7}")
    for r, (d, spread) in enumerate(zip(prof.devices, prof.spreads())):
        out = sum(t is None for t in d["decode_s"])
        print(f"{r:>4}  {d['name']:<14} {d.get('slowdown', 1.0):>8.2f} {prof.total_s(r, 'prefill') * 1e3:>10.2f} "
              f"{prof.total_s(r) * 1e3:>10.2f} {'-' if spread is None else f'{spread:.0%}':>7}"
              + (f"  ({out} unit(s) larger than its memory, not timed)" if out else ""))
    print("links (one-way latency ms / bandwidth Mbit/s), row = from, column = to:")
    for k in range(len(prof.devices)):
        cells = []
        for j in range(len(prof.devices)):
            bw = prof.bandwidth[k][j]
            cells.append("-" if k == j else
                         f"{prof.latency[k][j] * 1e3:.2f}/{'inf' if bw is None else f'{bw * 8 / 1e6:.1f}'}")
        print(f"{k:>4}  " + "  ".join(f"{c:>14}" for c in cells))


def _timeline(args) -> int:
    from pathlib import Path

    from .trace import draw_timeline, load_trace

    tracks, meta = load_trace(args.timeline)
    start = end = None
    if args.window:
        try:
            start, end = (float(x) for x in args.window.split(":"))
        except ValueError:
            raise ValueError(f"--window {args.window!r}: expected START:END in seconds") from None
    out = args.out or str(Path(args.timeline).with_suffix(".png"))
    title = f"{meta.get('model', '')} {meta.get('schedule', '')}, {meta.get('in_flight', '?')} micro-batches in flight"
    print(draw_timeline(tracks, out, title.strip(), start, end))
    return 0


def _shape(args, prof, stages: int) -> dict:
    """The job shape to simulate: the arguments, else the job the profile was measured for."""
    sh = prof.shapes
    prompt = args.prompt_tokens or sh["prompt_tokens"]
    new = args.new_tokens or max(1, 2 * (sh["context"] - sh["prompt_tokens"]))
    in_flight = in_flight_for("no-bubbles", stages, args.in_flight)
    batches = args.micro_batches or in_flight
    for name, v in (("--prompt-tokens", prompt), ("--new-tokens", new), ("--in-flight", in_flight),
                    ("--micro-batches", batches)):
        if v < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    return {"prompt_tokens": prompt, "new_tokens": new, "in_flight": in_flight, "micro_batches": batches,
            "micro_batch_size": sh["micro_batch_size"]}


def _simulate_plan(prof, plan, shape: dict, schedules, trace: bool = False) -> list:
    from .simulate import StepCosts, simulate, uniform_requests

    costs = StepCosts.from_profile(prof, plan)
    reqs = uniform_requests(shape["micro_batches"] * shape["micro_batch_size"], shape["prompt_tokens"],
                            shape["new_tokens"])
    return [simulate(costs, reqs, micro_batch_size=shape["micro_batch_size"], schedule=sch,
                     in_flight=shape["in_flight"], ranks=plan.ranks, trace=trace) for sch in schedules]


def _print_simulations(sims, shape: dict, plan) -> None:
    print(f"simulated: {shape['micro_batches']} micro-batches of {shape['micro_batch_size']}, prompt "
          f"{shape['prompt_tokens']} tokens, {shape['new_tokens']} new tokens, up to {shape['in_flight']} in flight")
    print(f"{'schedule':<11} {'tokens/s':>9} {'ms/token':>9} {'TTFT ms':>9} {'bubbles':>8}  busy share per stage (rank)")
    for r in sims:
        busy = "  ".join(f"r{rank}:{b:.0%}" for rank, b in zip(plan.ranks, r.busy))
        print(f"{r.schedule:<11} {r.tokens_per_s:>9.2f} {r.ms_per_token:>9.1f} {r.ttft_ms:>9.0f} "
              f"{r.bubble_share:>8.0%}  {busy}")


def _simulate(args) -> int:
    from .planner import Plan, plan_for
    from .profiler import Profile
    from .simulate import SCHEDULES as SIM_SCHEDULES

    prof = Profile.load(args.profile)
    if args.plan:
        plan = Plan.load(args.plan, prof.num_units)
    else:
        plan = plan_for(prof.costs(kv_tokens=args.kv_tokens), args.objective or "throughput")
    shape = _shape(args, prof, len(plan.stages))
    schedules = [args.schedule] if args.schedule else list(SIM_SCHEDULES)
    if args.trace and len(schedules) != 1:
        raise ValueError("--trace draws one schedule: give --schedule too")
    sims = _simulate_plan(prof, plan, shape, schedules, trace=bool(args.trace))
    if args.trace:
        from .trace import write_chrome_trace

        tracks = [{"rank": r, "label": f"rank {r} {prof.devices[r]['name']}",
                   "events": [(e["name"], e["ts"], e["dur"], e["slot"], e["step"]) for e in sims[0].events
                              if e["rank"] == r]} for r in plan.ranks]
        write_chrome_trace(args.trace, tracks, {"schedule": schedules[0], "in_flight": shape["in_flight"],
                                                "plan": plan.to_dict(), "model": prof.model["name"], "simulated": True})
    if args.json:
        print(json.dumps({"plan": plan.to_dict(), "shape": shape, "simulations": [r.to_dict() for r in sims]}))
        return 0
    print(f"{plan.objective} plan: " + ", ".join(f"rank {s.rank} ({prof.devices[s.rank]['name']}) units "
                                                f"{s.first}..{s.last}" for s in plan.stages))
    _print_simulations(sims, shape, plan)
    return 0


def _plan(args) -> int:
    from .confidence import confidence
    from .planner import plan_for, predict
    from .profiler import Profile
    from .simulate import SCHEDULES as SIM_SCHEDULES

    prof = Profile.load(args.profile)
    costs = prof.costs(kv_tokens=args.kv_tokens)
    plan = plan_for(costs, args.objective)
    # recorded so that `run --plan` refuses the plan on another model or cluster
    plan = dataclasses.replace(plan, model=prof.model.get("fingerprint", ""), cluster=prof.cluster)
    if args.out:
        plan.save(args.out)
    if args.json:
        print(json.dumps(plan.to_dict()))
        return 0
    p = predict(costs, plan)
    b = prof.shapes["micro_batch_size"]
    print(f"{args.objective} plan for {prof.model['name']} on {len(prof.devices)} devices ({prof.source}), "
          f"micro-batch {b}")
    print(f"{'stage':>5}  {'rank':>4}  {'device':<16} {'units':<12} {'memory used / usable':>26}  "
          f"{'compute ms':>10}  {'send ms':>8}")
    for i, s in enumerate(plan.stages):
        used = p["stage_bytes"][i]  # in the device's own dtype
        mem = costs.device_memory[s.rank]
        usable = "unlimited" if math.isinf(mem) else format_bytes(mem)
        print(f"{i:>5}  {s.rank:>4}  {costs.device_names[s.rank]:<16} {f'{s.first}..{s.last}':<12} "
              f"{format_bytes(used) + ' / ' + usable:>26}  {p['stage_compute_s'][i] * 1e3:>10.2f}  "
              f"{p['stage_send_s'][i] * 1e3:>8.2f}")
    print(f"predicted: sequential {p['latency_s'] * 1e3:.2f} ms/token ({b / p['latency_s']:.2f} tokens/s); "
          f"pipelined {b / p['bottleneck_s']:.2f} tokens/s (bottleneck stage {p['bottleneck_s'] * 1e3:.2f} ms)")
    used = set(plan.ranks)
    for j in range(costs.num_devices):
        if j not in used:
            why = ("its memory cannot hold even the smallest unit" if costs.device_memory[j] < min(costs.bytes_on(j))
                   else f"the {args.objective} optimum is as good or better without it")
            print(f"left out: rank {j} {costs.device_names[j]}: {why}")
    if args.objective in ("latency", "throughput"):  # the baselines follow a rule, not an optimum
        sure = confidence(costs, plan, prof.spreads(), args.objective)
        print(f"confidence: {sure.describe(costs.device_names)}")
    shape = _shape(args, prof, len(plan.stages))
    _print_simulations(_simulate_plan(prof, plan, shape, SIM_SCHEDULES), shape, plan)
    return 0


def _print_bench(rows: list[dict]) -> None:
    print(f"{'plan':<20} {'schedule':<11} {'tokens/s':>9} {'ms/token':>9} {'TTFT ms':>8} {'ideal tok/s':>11} "
          f"{'of ideal':>8}  busy share per stage (rank)")
    predicted = []
    for r in rows:
        if "error" in r:
            print(f"{r['objective']:<20} {r['schedule']:<11} not run: {r['error']}")
            continue
        busy = "  ".join(f"r{st['rank']}:{b:.0%}" for st, b in zip(r["stages"], r["busy"]))
        print(f"{r['objective']:<20} {r['schedule']:<11} {r['tokens_per_s']:>9.2f} {r['ms_per_token']:>9.1f} "
              f"{r['ttft_ms']:>8.0f} {r['ideal_tokens_per_s']:>11.2f} {r['tokens_per_s'] / r['ideal_tokens_per_s']:>8.0%}"
              f"  {busy}")
        if r.get("predicted"):
            predicted.append(r)
    if predicted:
        print("predicted by the simulator (same plans, schedules and requests), and measured / predicted:")
        print(f"{'plan':<20} {'schedule':<11} {'tokens/s':>9} {'ms/token':>9} {'TTFT ms':>8}  {'ratio tok/s':>11} "
              f"{'ratio ms/tok':>12}")
        for r in predicted:
            p = r["predicted"]
            print(f"{r['objective']:<20} {r['schedule']:<11} {p['tokens_per_s']:>9.2f} {p['ms_per_token']:>9.1f} "
                  f"{p['ttft_ms']:>8.0f}  {r['tokens_per_s'] / p['tokens_per_s']:>11.2f} "
                  f"{r['ms_per_token'] / p['ms_per_token']:>12.2f}")
