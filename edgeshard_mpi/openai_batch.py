"""OpenAI Batch API files: request lines in, response lines out (the format `vllm run-batch` reads and writes).

A prompt line with a `custom_id` is a batch request:

    {"custom_id": "q1", "method": "POST", "url": "/v1/chat/completions",
     "body": {"model": "...", "messages": [...], "max_tokens": 64, "temperature": 0.7, "seed": 1}}

`custom_id` is the request's id. The body's generation fields are those of a job's [generation]
table (sampling.SamplingParams), with `max_tokens` or `max_completion_tokens` for `max_new_tokens`;
a field the body does not give takes the job's value (so a request without `temperature` is greedy
when the job is, not OpenAI's 1.0). `body.model` may name any model: the job's model answers every
request, and each response names the model that did. A body field not supported here makes that
request an error; none is ignored. Chat's `logprobs`/`top_logprobs` and a completion's `logprobs: N`
become SamplingParams.logprobs.

`export_openai` writes one response line per record, in the prompt file's order: a `chat.completion`
or `text_completion` body with its usage, or, for a request that could not run, `response: null`
and the error, as OpenAI's batch output does.

Pure Python: no torch, no MPI.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Callable, Iterable, Iterator

__all__ = ["ENDPOINTS", "request_from_batch_line", "export_openai", "export_flat"]

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
ENDPOINTS = (CHAT, COMPLETIONS)
_SAME = {"n", "temperature", "top_p", "seed", "stop", "top_k", "min_p", "repetition_penalty", "presence_penalty",
         "frequency_penalty", "min_tokens", "stop_token_ids", "ignore_eos"}  # named as in a job's [generation]
_ACCEPTED = {"model", "max_tokens", "max_completion_tokens", "logprobs", "top_logprobs", "stream", "user"}
_FINISH = {"eos": "stop", "stop": "stop", "length": "length"}


def request_from_batch_line(obj: dict, where: str, default):
    """The Request of one batch request line (jobs.Request), or a JobError naming what is wrong."""
    from .jobs import JobError, _check_keys, _generation, _request_from_json

    _check_keys(obj, {"custom_id", "method", "url", "body"}, where)
    cid, body, url = obj.get("custom_id"), obj.get("body"), obj.get("url")
    if not isinstance(cid, str) or not cid:
        raise JobError(f"{where}: field 'custom_id' must be a non-empty string")
    if obj.get("method", "POST") != "POST":
        raise JobError(f"{where}: field 'method' must be \"POST\", got {obj.get('method')!r}")
    if url not in ENDPOINTS:
        raise JobError(f"{where}: field 'url' must be one of {', '.join(ENDPOINTS)}, got {url!r}")
    if not isinstance(body, dict):
        raise JobError(f"{where}: field 'body' must be an object")
    text_field = "messages" if url == CHAT else "prompt"
    unknown = sorted(set(body) - _SAME - _ACCEPTED - {text_field})
    if unknown:
        raise JobError(f"{where}: body field(s) {', '.join(map(repr, unknown))} not supported for {url} "
                       f"(supported: {', '.join(sorted(_SAME | _ACCEPTED | {text_field}))})")
    if text_field not in body:
        raise JobError(f"{where}: body field {text_field!r} is required for {url}")
    if body.get("stream"):
        raise JobError(f"{where}: body field 'stream' = {body['stream']!r}: a batch does not stream")
    if "model" in body and not isinstance(body["model"], str):
        raise JobError(f"{where}: body field 'model' must be a string")
    gen = {k: body[k] for k in _SAME if k in body}
    if "logprobs" in body or "top_logprobs" in body:
        gen["logprobs"] = _logprobs(body, url, where)
    budget = [body[k] for k in ("max_completion_tokens", "max_tokens") if body.get(k) is not None]
    if budget:
        gen["max_new_tokens"] = budget[0]  # OpenAI's newer name first, as its API reads them
    line = {"id": cid, text_field: body[text_field], **gen}
    return dataclasses.replace(_request_from_json(line, where, default), endpoint=url)


def _logprobs(body: dict, url: str, where: str) -> int:
    """SamplingParams.logprobs from a body: chat's `logprobs` (true/false) with `top_logprobs` (how many),
    or a completion's `logprobs` (how many); -1 when none are asked for."""
    from .jobs import JobError

    lp, top = body.get("logprobs"), body.get("top_logprobs")
    if url == CHAT:
        if lp not in (None, True, False):
            raise JobError(f"{where}: body field 'logprobs' must be true or false for {url}, got {lp!r}")
        if top is not None and not lp:
            raise JobError(f"{where}: body field 'top_logprobs' needs 'logprobs': true")
        if top is not None and (not isinstance(top, int) or isinstance(top, bool)):
            raise JobError(f"{where}: body field 'top_logprobs' must be an integer, got {top!r}")
        return (top or 0) if lp else -1
    if top is not None:
        raise JobError(f"{where}: body field 'top_logprobs' is for {CHAT}; {url} takes 'logprobs': N")
    if lp is not None and (not isinstance(lp, int) or isinstance(lp, bool)):
        raise JobError(f"{where}: body field 'logprobs' must be an integer for {url}, got {lp!r}")
    return -1 if lp is None else lp


def _line(where: str) -> int:
    tail = where.rsplit(":", 1)[-1]
    return int(tail) if tail.isdigit() else 0


def _in_input_order(records: Iterable) -> list:
    return sorted(records, key=lambda r: (r.where.rsplit(":", 1)[0], _line(r.where), r.choice))


def export_openai(records: Iterable, model: str, created: int,
                  token_text: Callable[[int], str] | None = None) -> Iterator[dict]:
    """OpenAI batch output lines, one a request with its `n` choices, in the prompt file's order.
    `model`: the model that answered; `token_text`: a token id's text, for requests with logprobs."""
    for i, (_, group) in enumerate(itertools.groupby(_in_input_order(records), key=lambda r: (r.where, r.id))):
        group = list(group)
        rid, first = f"{i:08d}", group[0]
        failed = [r for r in group if r.status == "error"]
        if failed:
            yield {"id": f"batch_req_{rid}", "custom_id": first.id, "response": None,
                   "error": {"code": "invalid_request", "message": failed[0].error}}
            continue
        completion = sum(r.output_tokens for r in group)
        usage = {"prompt_tokens": first.prompt_tokens, "completion_tokens": completion,
                 "total_tokens": first.prompt_tokens + completion}
        chat = first.endpoint == CHAT
        choices = []
        for r in group:
            lp = _choice_logprobs(r, token_text, chat) if r.logprobs else None
            finish = _FINISH.get(r.finish_reason, "stop")
            choices.append({"index": r.choice, "message": {"role": "assistant", "content": r.text},
                            "finish_reason": finish, "logprobs": lp} if chat else
                           {"index": r.choice, "text": r.text, "finish_reason": finish, "logprobs": lp})
        body = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{rid}", "object": "chat.completion" if chat else
                "text_completion", "created": created, "model": model, "choices": choices, "usage": usage}
        yield {"id": f"batch_req_{rid}", "custom_id": first.id,
               "response": {"status_code": 200, "request_id": f"req_{rid}", "body": body}, "error": None}


def _choice_logprobs(r, token_text: Callable[[int], str] | None, chat: bool) -> dict:
    """A choice's `logprobs` object, chat's or a completion's shape."""
    if token_text is None:
        raise ValueError("records with logprobs need token_text to name their tokens")
    n = len(r.logprobs)
    k = len(r.top_ids) // n if n else 0
    texts = [token_text(t) for t in r.token_ids[:n]]
    tops = [[(token_text(t), float(v)) for t, v in zip(r.top_ids[j * k:(j + 1) * k], r.top_logprobs[j * k:(j + 1) * k])]
            for j in range(n)]
    if chat:
        entry = lambda text, lp: {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}  # noqa: E731
        return {"content": [{**entry(text, lp), "top_logprobs": [entry(t, v) for t, v in top]}
                            for text, lp, top in zip(texts, r.logprobs, tops)], "refusal": None}
    offsets = list(itertools.accumulate((len(t) for t in texts[:-1]), initial=0))
    return {"tokens": texts, "token_logprobs": list(r.logprobs), "top_logprobs": [dict(top) for top in tops],
            "text_offset": offsets}


def export_flat(records: Iterable) -> Iterator[dict]:
    """One flat object a record, in the prompt file's order (times that do not exist are null)."""
    for r in _in_input_order(records):
        d = dict(r.__dict__)
        for k, v in d.items():
            if isinstance(v, float) and math.isnan(v):
                d[k] = None
        yield d
