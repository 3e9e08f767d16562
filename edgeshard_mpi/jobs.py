"""Job files (TOML) and prompt files (JSONL, chat messages, plain text).

A job file, with paths relative to the job file's folder:

    model = "smollm2-135m"           # preset name or a model folder
    dtype = "float32"                # float32 | bfloat16 | float16
    quantize = "int8"                # optional: weight-only int8 matrices (activations stay in dtype)
    compile = true                   # optional: torch.compile each stage's decode step (cached on disk)
    prompts = "prompts/demo.jsonl"   # .jsonl (one {"id", "prompt"|"messages"} a line, or OpenAI batch
                                     # request lines: openai_batch.py) or .txt
    output = "../results/demo.h5"    # default: results/<job name>.h5 under the current folder
    hostfile = "../hostfiles/local3.hosts"   # optional; --hostfile overrides
    micro_batch_size = 4
    micro_batches = 4                # in flight at once (default: twice the pipeline's stages)
    schedule = "no-bubbles"          # no-bubbles (default) | bubbles | sequential
    admission = "row"                # row (default): a finished row's place takes the next prompt at
                                     # once | batch: new prompts only when a whole micro-batch finished
    prefill_chunk = 64               # row admission: a prompt longer than N > 0 tokens prefills N a step
                                     # beside the decode steps (0: in one step; default: 64 on a
                                     # pipeline of more than one stage, 0 on one)
    chat = false                     # apply the chat template to plain "prompt" strings too

    [generation]                     # defaults for every request; a JSONL line may override any
    max_new_tokens = 64
    temperature = 0.0                # 0 = greedy; and every other field of sampling.SamplingParams
    seed = 0
    stop = ["\\n\\n"]                # stop strings: the text ends before the first one

    [plan]                           # optional: how units are split over ranks (default: evenly)
    objective = "throughput"         # plan from a profile: latency | throughput | a baseline name
                                     # or: split = "even", file = "plan.json", stages = [{rank=0, first=0, last=9}, ...]

Pure Python: no MPI, no torch.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import tomllib
from pathlib import Path
from typing import Iterator

from .planner import OBJECTIVES
from .sampling import SamplingParams
from .scheduler import ADMISSIONS, SCHEDULES

__all__ = ["JobError", "Generation", "Job", "Request", "read_prompts", "count_prompts", "SCHEDULES", "BENCH_DEFAULT",
           "MAX_LINE_BYTES"]

# what `edgeshard bench` runs by default: (plan objective, schedule)
BENCH_DEFAULT = (("throughput", "no-bubbles"), ("throughput", "bubbles"), ("throughput", "sequential"),
                 ("even", "no-bubbles"), ("edge-solo", "no-bubbles"))


class JobError(ValueError):
    """A job or prompt file that cannot be used; the message names the file, line and field."""


# A prompt line longer than this is refused before it is held in memory whole: no model this tool
# runs has a context anywhere near 1 MiB of text, and an unbounded line could exhaust rank 0's memory.
MAX_LINE_BYTES = 2**20
_BOM = b"\xef\xbb\xbf"


def _decode(raw: bytes, path, lineno: int = 1) -> str:
    """UTF-8 text of `raw` (which starts at line `lineno` of `path`); an error names the line and column."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = lineno + raw.count(b"\n", 0, e.start)
        column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise JobError(f"{path}:{line}: not UTF-8 (byte 0x{raw[e.start]:02x} at column {column})") from None


@dataclasses.dataclass(frozen=True)
class Generation:
    max_new_tokens: int = 64
    stop: tuple[str, ...] = ()  # stop strings: the text ends before the first one
    sampling: SamplingParams = SamplingParams()
    n: int = 1  # choices to generate for the prompt, each with its own seed (choice_seed)


MAX_CHOICES = 128


def choice_seed(seed: int, choice: int) -> int:
    """Choice k's seed: the request's own for the first, then spread over the seed range (a golden-ratio
    step), so that the choices of one request and nearby seeds of others do not draw the same numbers."""
    return (seed + choice * 0x9E3779B97F4A7C15) % 2**53


# what a job's [generation] table and a prompt line may set: the budget, stop strings, and every
# field of SamplingParams (a new one appears here by itself)
_SAMPLING_FIELDS = {f.name: type(f.default) for f in dataclasses.fields(SamplingParams)}
GENERATION_KEYS = {"max_new_tokens", "stop", "n", *_SAMPLING_FIELDS}


_TYPES = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def _field(table: dict, key: str, typ, default, where: str):
    if key not in table:
        return default
    value = table[key]
    ok = isinstance(value, typ) and not (typ in (int, float) and isinstance(value, bool))
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        raise JobError(f"{where}: field {key!r} must be {_TYPES[typ]}, got {_short(value)}")
    if typ is float and not math.isfinite(value):  # TOML and JSON both allow nan and inf
        raise JobError(f"{where}: field {key!r} must be a finite number, got {value!r}")
    return value


def _short(value, limit: int = 60) -> str:
    """repr of a value, cut so that an error stays one readable line."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _check_keys(table: dict, known: set[str], where: str) -> None:
    unknown = sorted(set(table) - known)
    if unknown:
        raise JobError(f"{where}: unknown field(s) {', '.join(map(repr, unknown))} "
                       f"(known: {', '.join(sorted(known))})")


def _generation(table: dict, where: str, base: Generation = Generation()) -> Generation:
    """`base` with the generation fields of `table` (a [generation] table or a prompt line) over it."""
    values = {}
    for key, typ in _SAMPLING_FIELDS.items():
        if key not in table:
            continue
        if typ is tuple:
            ids = table[key]
            if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
                raise JobError(f"{where}: field {key!r} must be a list of integers, got {_short(ids)}")
            values[key] = tuple(ids)
        else:
            values[key] = _field(table, key, typ, None, where)
    try:
        sampling = dataclasses.replace(base.sampling, **values)
    except ValueError as e:
        raise JobError(f"{where}: {e}") from None
    g = Generation(_field(table, "max_new_tokens", int, base.max_new_tokens, where), base.stop, sampling,
                   _field(table, "n", int, base.n, where))
    if not 1 <= g.n <= MAX_CHOICES:
        raise JobError(f"{where}: field 'n' must be in [1, {MAX_CHOICES}], got {g.n}")
    if "stop" in table:
        stop = table["stop"]
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
            raise JobError(f"{where}: field 'stop' must be a non-empty string or a list of them")
        g = dataclasses.replace(g, stop=tuple(stop))
    if g.max_new_tokens < 1:
        raise JobError(f"{where}: field 'max_new_tokens' must be >= 1, got {g.max_new_tokens}")
    if g.sampling.min_tokens > g.max_new_tokens:
        raise JobError(f"{where}: field 'min_tokens' ({g.sampling.min_tokens}) must be <= max_new_tokens "
                       f"({g.max_new_tokens})")
    return g


@dataclasses.dataclass(frozen=True)
class Job:
    """A parsed, validated job file. Paths are absolute."""

    path: str
    model: str
    prompts: str
    output: str
    dtype: str = "float32"
    quantize: str | None = None  # "int8": weight-only int8 (quant.py)
    compile: bool = False  # torch.compile each stage's decode step (compiling.py)
    hostfile: str | None = None
    micro_batch_size: int = 1
    micro_batches: int | None = None  # in flight; None = twice the plan's stages
    schedule: str = "no-bubbles"
    admission: str = "row"  # scheduler.ADMISSIONS
    prefill_chunk: int | None = None  # prompt tokens a step prefills by chunks; 0: whole; None: the default for
    # the plan (scheduler.prefill_chunk_for)
    chat: bool = False
    generation: Generation = Generation()
    plan: dict | None = None  # {"split": "even"} | {"file": path} | {"stages": [...]}
    text: str = ""  # the job file as written, kept with the results

    @property
    def name(self) -> str:
        return Path(self.path).stem

    @classmethod
    def load(cls, path: str | Path) -> "Job":
        path = Path(path)
        if not path.is_file():
            raise JobError(f"{path}: job file not found")
        data = path.read_bytes()
        if data.startswith(_BOM):  # editors on Windows write one; TOML itself does not allow it
            data = data[len(_BOM):]
        text = _decode(data, path)
        try:
            d = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise JobError(f"{path}: not valid TOML ({e})") from None
        where = str(path)
        _check_keys(d, {"model", "dtype", "quantize", "compile", "prompts", "output", "hostfile", "micro_batch_size", "micro_batches",
                        "schedule", "admission", "prefill_chunk", "chat", "generation", "plan"}, where)
        base = path.parent.resolve()

        def rel(p: str) -> str:
            return str((base / p).resolve())

        for key in ("model", "prompts"):
            if key not in d:
                raise JobError(f"{where}: field {key!r} is required")
        model = _field(d, "model", str, None, where)
        from .models import PRESETS  # names only; importing models does not import torch

        model = model if model in PRESETS else rel(model)
        dtype = _field(d, "dtype", str, "float32", where)
        if dtype not in ("float32", "bfloat16", "float16"):
            raise JobError(f"{where}: field 'dtype' must be float32, bfloat16 or float16, got {dtype!r}")
        quantize = _field(d, "quantize", str, None, where)
        if quantize not in (None, "int8"):
            raise JobError(f"{where}: field 'quantize' must be \"int8\" (or absent), got {quantize!r}")
        mbs = _field(d, "micro_batch_size", int, 1, where)
        if mbs < 1:
            raise JobError(f"{where}: field 'micro_batch_size' must be >= 1, got {mbs}")
        in_flight = _field(d, "micro_batches", int, None, where)
        if in_flight is not None and in_flight < 1:
            raise JobError(f"{where}: field 'micro_batches' must be >= 1, got {in_flight}")
        schedule = _field(d, "schedule", str, "no-bubbles", where)
        if schedule not in SCHEDULES:
            raise JobError(f"{where}: field 'schedule' must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
        admission = _field(d, "admission", str, "row", where)
        if admission not in ADMISSIONS:
            raise JobError(f"{where}: field 'admission' must be one of {', '.join(ADMISSIONS)}, got {admission!r}")
        chunk = _field(d, "prefill_chunk", int, None, where)
        if chunk is not None and chunk < 0:
            raise JobError(f"{where}: field 'prefill_chunk' must be >= 0 tokens (0: no chunks), got {chunk}")
        gen_table = d.get("generation", {})
        if not isinstance(gen_table, dict):
            raise JobError(f"{where}: [generation] must be a table")
        _check_keys(gen_table, GENERATION_KEYS, f"{where}: [generation]")
        plan = d.get("plan")
        if plan is not None:
            if not isinstance(plan, dict):
                raise JobError(f"{where}: [plan] must be a table")
            _check_keys(plan, {"split", "file", "stages", "objective"}, f"{where}: [plan]")
            if len(plan) != 1:
                raise JobError(f"{where}: [plan] takes exactly one of split, file, stages, objective")
            if "objective" in plan and plan["objective"] not in OBJECTIVES:
                raise JobError(f"{where}: [plan] objective must be one of {', '.join(OBJECTIVES)}, "
                               f"got {plan['objective']!r}")
            if "split" in plan and plan["split"] != "even":
                raise JobError(f"{where}: [plan] split must be \"even\", got {plan['split']!r}")
            if "file" in plan:
                plan = {"file": rel(_field(plan, "file", str, None, f"{where}: [plan]"))}
        output = _field(d, "output", str, None, where)
        hostfile = _field(d, "hostfile", str, None, where)
        return cls(
            path=str(path.resolve()), model=model, prompts=rel(_field(d, "prompts", str, None, where)),
            output=rel(output) if output else str(Path("results", path.stem + ".h5").resolve()),
            dtype=dtype, quantize=quantize, compile=_field(d, "compile", bool, False, where), hostfile=rel(hostfile) if hostfile else None, micro_batch_size=mbs,
            micro_batches=in_flight, schedule=schedule, admission=admission, prefill_chunk=chunk,
            chat=_field(d, "chat", bool, False, where),
            generation=_generation(gen_table, f"{where}: [generation]"), plan=plan, text=text)


@dataclasses.dataclass(frozen=True)
class Request:
    """One prompt from a prompt file, with its generation settings."""

    id: str
    where: str  # "file:line", for error messages
    prompt: str | None = None
    messages: tuple | None = None  # chat messages: ({"role": ..., "content": ...}, ...)
    generation: Generation = Generation()
    error: str | None = None  # why this line cannot run (read_prompts with strict=False), with its file:line
    endpoint: str | None = None  # an OpenAI batch line's url (openai_batch.py)


_REQUEST_KEYS = {"id", "prompt", "messages", *GENERATION_KEYS}


def _request_from_json(obj, where: str, default: Generation) -> Request:
    if not isinstance(obj, dict):
        raise JobError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "custom_id" in obj:  # a line of an OpenAI batch file
        from .openai_batch import request_from_batch_line

        return request_from_batch_line(obj, where, default)
    _check_keys(obj, _REQUEST_KEYS, where)
    rid = obj.get("id")
    if rid is None:
        rid = where.rsplit(":", 1)[1]  # the line number
    if not isinstance(rid, (str, int)) or isinstance(rid, bool):
        raise JobError(f"{where}: field 'id' must be a string or an integer")
    if rid == "":
        raise JobError(f"{where}: field 'id' is empty")
    gen = _generation(obj, where, default)
    if ("prompt" in obj) == ("messages" in obj):
        raise JobError(f"{where}: give exactly one of 'prompt' or 'messages'")
    if "prompt" in obj:
        prompt = obj["prompt"]
        if not isinstance(prompt, str):
            raise JobError(f"{where}: field 'prompt' must be a string")
        if not prompt.strip():
            raise JobError(f"{where}: field 'prompt' is empty")
        return Request(str(rid), where, prompt=prompt, generation=gen)
    msgs = obj["messages"]
    if (not isinstance(msgs, list) or not msgs or
            not all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                    for m in msgs)):
        raise JobError(f"{where}: field 'messages' must be a non-empty list of {{role, content}} strings")
    if not any(m["content"].strip() for m in msgs):
        raise JobError(f"{where}: field 'messages' has only empty content")
    return Request(str(rid), where, messages=tuple(msgs), generation=gen)


def _lines(path: Path) -> Iterator[tuple[int, bytes | JobError]]:
    """(lineno, bytes without the line end) of each line, never holding more than MAX_LINE_BYTES of one
    (a longer line is skipped, and comes as the JobError that says so).

    Lines end at "\n"; a "\r" before it (CRLF) and a UTF-8 byte-order mark at the start are dropped.
    """
    with open(path, "rb") as f:
        for lineno in itertools.count(1):
            raw = f.readline(MAX_LINE_BYTES + 2)  # room for the line end after a line of exactly the limit
            if not raw:
                return
            if lineno == 1 and raw.startswith(_BOM):
                raw = raw[len(_BOM):]
            line = raw[:-1] if raw.endswith(b"\n") else raw
            line = line[:-1] if line.endswith(b"\r") else line
            if len(line) > MAX_LINE_BYTES:
                error = JobError(f"{path}:{lineno}: line longer than the {MAX_LINE_BYTES // 2**20} MiB limit "
                                 f"({MAX_LINE_BYTES} bytes)")
                while raw and not raw.endswith(b"\n"):  # the rest of the line, a chunk at a time
                    raw = f.readline(MAX_LINE_BYTES)
                yield lineno, error
                continue
            yield lineno, line


def _parse_json(text: str, where: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise JobError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise JobError(f"{where}: not valid JSON (nested too deeply)") from None
    except ValueError as e:  # an integer of more than 4300 digits; the rest of the message is advice for Python code
        raise JobError(f"{where}: not valid JSON ({str(e).split(':')[0]})") from None


def read_prompts(path: str | Path, default: Generation = Generation(), *, strict: bool = True) -> Iterator[Request]:
    """Yield requests one line at a time (files are streamed, never read whole).

    Blank lines are skipped; each line is at most MAX_LINE_BYTES of UTF-8. Lines are only parsed as
    JSON (or taken as text): nothing in a prompt file is ever evaluated.

    A line that is not a valid request raises a JobError naming it (`strict`), or comes as a Request
    whose `error` says why, with the line's own id if it has a usable one, else its line number.
    A file that cannot be read at all raises either way.
    """
    path = Path(path)
    if not path.is_file():
        raise JobError(f"{path}: prompt file not found")
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".txt"):
        raise JobError(f"{path}: prompt files must be .jsonl or .txt, got {suffix or 'no suffix'!r}")
    seen: dict[str, int] = {}  # id -> the line it came from
    for lineno, raw in _lines(path):
        where = f"{path}:{lineno}"
        try:
            if isinstance(raw, JobError):
                raise raw
            req = _line_request(raw, path, lineno, suffix == ".txt", default)
            if req is None:
                continue
            if req.id in seen:
                raise JobError(f"{where}: id {req.id!r} appears twice in the prompt file "
                               f"(lines {seen[req.id]} and {lineno})")
        except JobError as e:
            if strict:
                raise
            req = Request(_error_id(raw, lineno, seen), where, error=str(e))
        seen[req.id] = lineno
        yield req


def _line_request(raw: bytes, path: Path, lineno: int, text: bool, default: Generation) -> Request | None:
    """The request on one line (None when it is blank), or a JobError naming the line."""
    where = f"{path}:{lineno}"
    line = _decode(raw, path, lineno)
    if not line.strip():
        return None
    if text:
        return Request(str(lineno), where, prompt=line, generation=default)
    obj = _parse_json(line, where)
    try:
        # JSON may spell a lone surrogate ("\ud800"): valid JSON, but not text that can be
        # tokenised or written to the results file, so refuse it here rather than mid-run
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise JobError(f"{where}: a string holds an unpaired surrogate (\\ud800-\\udfff), "
                       "which is not text") from None
    return _request_from_json(obj, where, default)


def _error_id(raw, lineno: int, seen: dict) -> str:
    """A failed line's id: its own when it has one that is free, else its line number."""
    try:
        obj = json.loads(raw)
        rid = obj.get("custom_id", obj.get("id"))  # an OpenAI batch line's id is its custom_id
        if isinstance(rid, (str, int)) and not isinstance(rid, bool) and str(rid) and str(rid) not in seen:
            return str(rid)
    except Exception:  # not JSON, not an object: the line number it is
        pass
    return str(lineno) if str(lineno) not in seen else f"line {lineno}"


def count_prompts(path: str | Path) -> int:
    """Lines with something other than whitespace, counted in fixed-size chunks (a long line costs no memory)."""
    count, content = 0, False  # content: the current line has a non-blank byte so far
    with open(path, "rb") as f:
        first = True
        while chunk := f.read(2**20):
            if first and chunk.startswith(_BOM):
                chunk = chunk[len(_BOM):]
            first = False
            parts = chunk.split(b"\n")
            for i, part in enumerate(parts):
                content = content or bool(part.strip())
                if i < len(parts) - 1:  # the line ends in this chunk
                    count += content
                    content = False
    return count + content
