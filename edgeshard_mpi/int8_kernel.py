"""The CPU's int8 product for a decode step's few rows: `csrc/int8_mm.c`, built once per machine as
the torch op `edgeshard::int8_mm` (`csrc/int8_op.cpp`).

A decode step reads every int8 matrix once for a few rows, so its speed is the speed of reading the
weights. aten's `_weight_int8pack_mm` took smollm2's 211 matrices at one row in 16.9 ms on a 2-core
AMD EPYC (AVX2), about 8 GB/s; this kernel took them in 8.8 ms, and 1.4-1.7x less than aten's at 2
to 16 rows (`benchmarks/int8_products.py`, BENCHMARKS.md).

It needs AVX2, a C and a C++ compiler (`$CC`, `$CXX`, else `cc` and `c++`) and torch's headers, which
a CPU build of torch ships and inductor needs too. It is compiled at first use into the user's
cache, under a name that holds a hash of the sources, the flags and the torch version, so that a
changed source or another torch builds anew, and ranks that start together do not write over each
other's file. Being a C++ op, it is called without Python in between, from eager code and from a
compiled graph's C++ wrapper alike: as a Python op over ctypes it cost about 13 us a call, 1.4 ms
of a smollm2 step. Where it cannot be built or loaded (no compiler, another CPU,
`EDGESHARD_INT8_KERNEL=aten`), `quant.Int8Linear` keeps aten's kernel; `available()` says why.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

__all__ = ["MAX_ROWS", "available", "int8_mm"]

MAX_ROWS = 16  # more rows (a prefill) take aten's kernel: past a few rows this one is bound by its arithmetic
CSRC = Path(__file__).with_name("csrc")
C_FLAGS = ["-O3", "-mavx2", "-fopenmp", "-fPIC"]
CXX_FLAGS = ["-O2", "-std=c++20", "-fPIC", "-shared", "-fopenmp"]
_loaded = False
_why_not: str | None = None


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "edgeshard-mpi"


def _compiler(env: str, default: str) -> str:
    found = shutil.which(os.environ.get(env, default))
    if found is None:
        raise RuntimeError(f"no compiler: ${env} or {os.environ.get(env, default)!r} is not on PATH")
    return found


def _run(cmd: list[str]) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:1] + cmd[-3:])} failed: {done.stderr.strip()[-400:]}")


def _build() -> Path:
    """The op's library, compiled if this machine has no copy of these sources for this torch yet."""
    cc, cxx = _compiler("CC", "cc"), _compiler("CXX", "c++")
    torch_dir = Path(torch.__file__).parent
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch.compiled_with_cxx11_abi())}"
    cxx_flags = [*CXX_FLAGS, abi, f"-I{torch_dir / 'include'}"]
    links = [f"-L{torch_dir / 'lib'}", "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{torch_dir / 'lib'}"]
    key = b"".join((CSRC / f).read_bytes() for f in ("int8_mm.c", "int8_op.cpp"))
    key += " ".join([cc, cxx, torch.__version__, *C_FLAGS, *cxx_flags]).encode()
    lib = _cache_dir() / f"int8_mm-{hashlib.sha256(key).hexdigest()[:16]}.so"
    if not lib.exists():
        lib.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:
            obj, out = Path(tmp) / "int8_mm.o", Path(tmp) / "int8_mm.so"
            _run([cc, *C_FLAGS, "-c", str(CSRC / "int8_mm.c"), "-o", str(obj)])
            _run([cxx, *cxx_flags, str(CSRC / "int8_op.cpp"), str(obj), *links, "-o", str(out)])
            os.replace(out, lib)  # atomic: a rank building beside this one finds a whole file or none
    return lib


def available() -> str | None:
    """None when the op is loaded and ready, else why this process uses aten's kernel."""
    global _loaded, _why_not
    if not _loaded and _why_not is None:
        if os.environ.get("EDGESHARD_INT8_KERNEL", "") == "aten":
            _why_not = "EDGESHARD_INT8_KERNEL=aten"
        elif not torch.backends.cpu.get_cpu_capability().startswith(("AVX2", "AVX512")):
            _why_not = f"this CPU has no AVX2 ({torch.backends.cpu.get_cpu_capability()})"
        else:
            try:
                torch.ops.load_library(str(_build()))
                torch.library.register_fake("edgeshard::int8_mm", _fake)
                _loaded = True
            except (OSError, RuntimeError) as e:
                _why_not = f"the int8 kernel could not be built: {e}"
                warnings.warn(f"{_why_not}; int8 products take aten's _weight_int8pack_mm", stacklevel=2)
    return _why_not


def _fake(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], weight.shape[0], dtype=torch.float32)


def int8_mm(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """(x @ weight.T) * scales in fp32, for fp32 rows x (m x k), an int8 weight (n x k) and bf16 per-row
    scales (n), all contiguous on the CPU; `available()` must have returned None."""
    return torch.ops.edgeshard.int8_mm(x, weight, scales)
