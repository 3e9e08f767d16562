"""A JSON object read from a file, with errors that name the file (plans, profiles, model configs)."""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["read_object"]


def read_object(path: str | Path, error: type[Exception], what: str = "a JSON object") -> dict:
    """The object in `path`, or `error` naming the file: not UTF-8 or not JSON (the first line of why,
    too deep nesting and huge integers included), or JSON that is not an object (`what` was expected)."""
    try:
        d = json.loads(Path(path).read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise error(f"{path}: not valid JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(d, dict):
        raise error(f"{path}: expected {what}, got {type(d).__name__}")
    return d
