"""`torch.compile` of a shard's decode step, as gpt-fast does: where a one-token step's time goes
beyond the matmuls (a few thousand small ops and their dispatch) is fused into a few kernels.

Only decode steps (one token a row) are compiled; a prefill runs eagerly, its length changing from
micro-batch to micro-batch. The slot's KV cache is then transformers' static one (kv_cache.py), and
the batch and capacity dimensions are dynamic: one graph serves micro-batches of 2 rows and more at
any capacity, and one more serves a single row (torch specializes size 1).

Compiled code is cached on disk by inductor (`TORCHINDUCTOR_CACHE_DIR`, by default a folder beside
the prepared models), so a second run of the same stage loads it instead of compiling. On a CPU the
generated code is called from C++ (`cpp_wrapper`), which takes longer to build once and removes
most of the per-kernel Python that remains.
"""

from __future__ import annotations

import os
import time
from typing import Callable

import torch

__all__ = ["CompiledStep", "cache_dir"]


def cache_dir() -> str:
    """Where inductor keeps compiled code: the user's TORCHINDUCTOR_CACHE_DIR, else beside the models
    (where it outlives /tmp). Importing transformers sets the variable to inductor's default, so that
    value counts as not chosen."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    from .models import models_dir

    chosen = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if chosen and os.path.abspath(chosen) != os.path.abspath(default_cache_dir()):
        return chosen
    return str(models_dir() / "inductor-cache")


class CompiledStep:
    """`fn(x, pos, mask, cache)` compiled for decode steps; `seconds` is the wall time spent in calls
    that compiled (or loaded compiled code from the cache), `graphs` how many graphs those were."""

    def __init__(self, fn: Callable, device: torch.device):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache_dir()  # inductor reads it whenever it compiles
        import torch._inductor.config as inductor

        if device.type == "cpu":
            inductor.cpp_wrapper = True
        self.fn = torch.compile(fn, dynamic=None)
        self.seconds = 0.0
        self.graphs = 0

    def __call__(self, x: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor | None, cache) -> torch.Tensor:
        x = x.clone()  # a view here and a plain tensor there would be two graphs (views are guarded by base)
        for t in (x, pos):
            torch._dynamo.maybe_mark_dynamic(t, 0)  # rows leave; the KV buffers' rows are dynamic too
        before = _graphs()
        t0 = time.perf_counter()
        out = self.fn(x, pos, mask, cache)
        if _graphs() != before:
            self.seconds += time.perf_counter() - t0
            self.graphs += _graphs() - before
        return out


def _graphs() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]
