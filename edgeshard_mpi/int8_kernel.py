"""The CPU's int8 product for a decode step's few rows: `csrc/int8_mm.c`, built once per machine.

A decode step reads every int8 matrix once for a few rows, so its speed is the speed of reading the
weights. aten's `_weight_int8pack_mm` took smollm2's 211 matrices at one row in 15.7 ms on a 2-core
AMD EPYC (AVX2), about 9 GB/s; this kernel took them in 8.5 ms, and 1.4-1.6x less than aten's at 2 to
16 rows (`benchmarks/int8_products.py`, BENCHMARKS.md). It needs AVX2 and a C compiler: it is compiled at first use, with the compiler
in `$CC` (else `cc`), into the user's cache, under a name that holds a hash of the source and the
flags, so that a new source builds anew and ranks that start together do not write over each other's
file. Where it cannot be built or loaded (no compiler, another CPU, `EDGESHARD_INT8_KERNEL=aten`),
`quant.Int8Linear` keeps aten's kernel; `available()` says why.

The product is the custom op `edgeshard::int8_mm`, so that a compiled graph calls it as one node.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

__all__ = ["MAX_ROWS", "available", "int8_mm", "product"]

MAX_ROWS = 16  # more rows (a prefill) take aten's kernel: past a few rows this one is bound by its arithmetic
SOURCE = Path(__file__).with_name("csrc") / "int8_mm.c"
FLAGS = ["-O3", "-mavx2", "-fopenmp", "-shared", "-fPIC"]
_lib: ctypes.CDLL | None = None
_why_not: str | None = None


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "edgeshard-mpi"


def _build() -> ctypes.CDLL:
    """The kernel's library, compiled if this machine has no copy of this source yet."""
    cc = shutil.which(os.environ.get("CC", "cc"))
    if cc is None:
        raise RuntimeError(f"no C compiler: {os.environ.get('CC', 'cc')!r} is not on PATH")
    source = SOURCE.read_bytes()
    digest = hashlib.sha256(source + " ".join(FLAGS).encode()).hexdigest()[:16]
    lib = _cache_dir() / f"int8_mm-{digest}.so"
    if not lib.exists():
        lib.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=lib.parent)
        os.close(fd)
        try:
            done = subprocess.run([cc, *FLAGS, str(SOURCE), "-o", tmp], capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"{cc} failed on {SOURCE}: {done.stderr.strip()[-400:]}")
            os.replace(tmp, lib)  # atomic: a rank building beside this one finds a whole file or none
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    handle = ctypes.CDLL(str(lib))  # torch's OpenMP is loaded already, so the kernel shares its threads
    handle.int8_mm.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3 + [ctypes.c_int]
    handle.int8_mm.restype = ctypes.c_int
    return handle


def available() -> str | None:
    """None when the kernel is loaded and ready, else why this process uses aten's."""
    global _lib, _why_not
    if _lib is None and _why_not is None:
        if os.environ.get("EDGESHARD_INT8_KERNEL", "") == "aten":
            _why_not = "EDGESHARD_INT8_KERNEL=aten"
        elif not torch.backends.cpu.get_cpu_capability().startswith(("AVX2", "AVX512")):
            _why_not = f"this CPU has no AVX2 ({torch.backends.cpu.get_cpu_capability()})"
        else:
            try:
                _lib = _build()
            except (OSError, RuntimeError) as e:
                _why_not = f"the int8 kernel could not be built: {e}"
                warnings.warn(f"{_why_not}; int8 products take aten's _weight_int8pack_mm", stacklevel=2)
    return _why_not


def product(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """(x @ weight.T) * scales in fp32, for fp32 rows x (m x k), an int8 weight (n x k) and bf16 per-row
    scales (n), all contiguous on the CPU; `available()` must have returned None."""
    m, k = x.shape
    y = torch.empty(m, weight.shape[0], dtype=torch.float32)
    if _lib.int8_mm(x.data_ptr(), weight.data_ptr(), scales.data_ptr(), y.data_ptr(), m, weight.shape[0], k,
                    torch.get_num_threads()) != 0:
        raise MemoryError(f"int8_mm: no memory for {m} x {k} quantized activations")
    return y


# A compiled graph calls the product as the op edgeshard::int8_mm; eager code calls `product` itself.
# A plain library op's dispatch costs about 5 us a call here, where torch.library.custom_op's costs
# about 20: 1 ms against 4 over smollm2's 211 matrices a step.
_ops = torch.library.Library("edgeshard", "DEF")
_ops.define("int8_mm(Tensor x, Tensor weight, Tensor scales) -> Tensor")
_ops.impl("int8_mm", product, "CPU")
int8_mm = torch.ops.edgeshard.int8_mm


@torch.library.register_fake("edgeshard::int8_mm")
def _(x, weight, scales):
    return x.new_empty(x.shape[0], weight.shape[0], dtype=torch.float32)
