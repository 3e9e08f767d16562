"""This project's CPU products for a decode step's few rows, built once per machine as the torch ops
`edgeshard::int8_mm` (`csrc/int8_mm.c`), `edgeshard::bf16_mm` (`csrc/bf16_mm.c`) and
`edgeshard::bf16_panels_mm` and `edgeshard::f32_panels_mm` (`csrc/panels_mm.c`), registered by
`csrc/ops.cpp`.

A decode step reads every matrix once for a few rows, so its speed is the speed of reading the
weights. For int8 weights aten's `_weight_int8pack_mm` reads them well below the memory's speed on
an AVX2 CPU; `int8_mm` about twice as fast (`benchmarks/int8_products.py`, BENCHMARKS.md). For bf16
weights on a CPU without bf16 instructions, aten's product past a row or two takes a slow path;
`bf16_mm` widens each weight to fp32 in a register and computes as fp32 does, on half fp32's bytes
(fewrows.py's widened form). `bf16_panels_mm` does the same on the weight held as panels
(`to_panels`): runs of 24 rows stored column by column, so that each weight loaded meets up to 4 rows
of x with no sum across lanes. It is the faster at every row count (`benchmarks/bf16_panels.py`).
`f32_panels_mm` is the same product on fp32 panels: on an AVX2 CPU it took a smollm2 step's layer
products at 16 rows in 0.65-0.70x the time of torch's fastest form (`benchmarks/f32_panels.py`);
where it is faster is measured (fewrows.py).

It needs AVX2, a C and a C++ compiler (`$CC`, `$CXX`, else `cc` and `c++`) and torch's headers, which
a CPU build of torch ships and inductor needs too. It is compiled at first use into the user's
cache, under a name that holds a hash of the sources, the flags and the torch version, so that a
changed source or another torch builds anew, and ranks that start together do not write over each
other's file. Being C++ ops, they are called without Python in between, from eager code and from a
compiled graph's C++ wrapper alike: as a Python op over ctypes the int8 product cost about 13 us a
call, 1.4 ms of a smollm2 step. Where they cannot be built or loaded (no compiler, another CPU,
`EDGESHARD_CPU_KERNELS=aten`), `quant.Int8Linear` keeps aten's kernel and bf16 products aten's;
`available()` says why.
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

__all__ = ["MAX_ROWS", "PANEL", "available", "bf16_mm", "bf16_panels_mm", "f32_panels_mm", "from_panels", "int8_mm",
           "panels_mm", "to_panels"]

PANEL = 24  # a weight's rows in a panel (csrc/panels_mm.c: 3 AVX2 vectors a step of k)
MAX_ROWS = 16  # more rows (a prefill) take aten's kernel: past a few rows this one is bound by its arithmetic
CSRC = Path(__file__).with_name("csrc")
C_SOURCES = ("int8_mm.c", "bf16_mm.c", "panels_mm.c")
C_FLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp", "-fPIC"]
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
    """The ops' library, compiled if this machine has no copy of these sources for this torch yet."""
    cc, cxx = _compiler("CC", "cc"), _compiler("CXX", "c++")
    torch_dir = Path(torch.__file__).parent
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch.compiled_with_cxx11_abi())}"
    cxx_flags = [*CXX_FLAGS, abi, f"-I{torch_dir / 'include'}"]
    links = [f"-L{torch_dir / 'lib'}", "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{torch_dir / 'lib'}"]
    key = b"".join((CSRC / f).read_bytes() for f in (*C_SOURCES, "ops.cpp"))
    key += " ".join([cc, cxx, torch.__version__, *C_FLAGS, *cxx_flags]).encode()
    lib = _cache_dir() / f"kernels-{hashlib.sha256(key).hexdigest()[:16]}.so"
    if not lib.exists():
        lib.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:
            objs = [str(Path(tmp) / f"{Path(c).stem}.o") for c in C_SOURCES]
            for c, obj in zip(C_SOURCES, objs):
                _run([cc, *C_FLAGS, "-c", str(CSRC / c), "-o", obj])
            out = Path(tmp) / "kernels.so"
            _run([cxx, *cxx_flags, str(CSRC / "ops.cpp"), *objs, *links, "-o", str(out)])
            os.replace(out, lib)  # atomic: a rank building beside this one finds a whole file or none
    return lib


def available() -> str | None:
    """None when the op is loaded and ready, else why this process uses aten's kernel."""
    global _loaded, _why_not
    if not _loaded and _why_not is None:
        if os.environ.get("EDGESHARD_CPU_KERNELS", "") == "aten":
            _why_not = "EDGESHARD_CPU_KERNELS=aten"
        elif not torch.backends.cpu.get_cpu_capability().startswith(("AVX2", "AVX512")):
            _why_not = f"this CPU has no AVX2 ({torch.backends.cpu.get_cpu_capability()})"
        else:
            try:
                torch.ops.load_library(str(_build()))
                torch.library.register_fake("edgeshard::int8_mm", _fake)
                torch.library.register_fake("edgeshard::bf16_mm", _fake_bf16)
                torch.library.register_fake("edgeshard::bf16_panels_mm", _fake_panels)
                torch.library.register_fake("edgeshard::f32_panels_mm", _fake_panels)
                _loaded = True
            except (OSError, RuntimeError) as e:
                _why_not = f"the CPU kernels could not be built: {e}"
                warnings.warn(f"{_why_not}; int8 products take aten's _weight_int8pack_mm, bf16 ones aten's",
                              stacklevel=2)
    return _why_not


def _fake(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], weight.shape[0], dtype=torch.float32)


def _fake_bf16(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty(x.shape[0], weight.shape[0])


def _fake_panels(x: torch.Tensor, panels: torch.Tensor, bias: torch.Tensor | None, n: int) -> torch.Tensor:
    return x.new_empty(x.shape[0], n)


def int8_mm(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """(x @ weight.T) * scales in fp32, for fp32 rows x (m x k), an int8 weight (n x k) and bf16 per-row
    scales (n), all contiguous on the CPU; `available()` must have returned None."""
    return torch.ops.edgeshard.int8_mm(x, weight, scales)


def bf16_mm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T (+ bias) for rows x (m x k) and a contiguous bf16 weight (n x k) on the CPU, summed in
    fp32 and returned in x's dtype; `available()` must have returned None."""
    return torch.ops.edgeshard.bf16_mm(x, weight, bias)


def bf16_panels_mm(x: torch.Tensor, panels: torch.Tensor, bias: torch.Tensor | None, n: int) -> torch.Tensor:
    """`bf16_mm` for a weight of `n` rows held as `to_panels` leaves it: faster at every row count."""
    return torch.ops.edgeshard.bf16_panels_mm(x, panels, bias, n)


def f32_panels_mm(x: torch.Tensor, panels: torch.Tensor, bias: torch.Tensor | None, n: int) -> torch.Tensor:
    """x @ W.T (+ bias) for fp32 rows x (m x k) and an fp32 weight W of `n` rows held as `to_panels` leaves
    it; `available()` must have returned None."""
    return torch.ops.edgeshard.f32_panels_mm(x, panels, bias, n)


def panels_mm(x: torch.Tensor, panels: torch.Tensor, bias: torch.Tensor | None, n: int) -> torch.Tensor:
    """The product on panels of either dtype: `bf16_panels_mm` or `f32_panels_mm`."""
    if panels.dtype == torch.bfloat16:
        return bf16_panels_mm(x, panels, bias, n)
    return f32_panels_mm(x, panels, bias, n)


def to_panels(weight: torch.Tensor) -> torch.Tensor:
    """A bf16 or fp32 weight (n x k) as panels ([ceil(n / PANEL)][k][PANEL]): each run of PANEL rows stored
    column by column, the last run padded with zero rows; the same bytes, but for the padding."""
    n, k = weight.shape
    full, w = n // PANEL, weight.detach()
    panels = w.new_empty(-(-n // PANEL), k, PANEL)  # the one copy: a large head is not copied twice
    panels[:full].copy_(w[:full * PANEL].view(full, PANEL, k).transpose(1, 2))
    if n > full * PANEL:
        panels[full].zero_()
        panels[full, :, :n - full * PANEL].copy_(w[full * PANEL:].T)
    return panels


def panel_rows(panels: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Rows `ids` (of any shape) of the weight `to_panels` made into `panels`, as ids.shape + (k,): an
    embedding's lookup on the matrix its tied head holds as panels. Row r is column r % PANEL of panel
    r // PANEL."""
    return panels[ids // PANEL, :, ids % PANEL]


def from_panels(panels: torch.Tensor, start: int, stop: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Rows start..stop of the weight `to_panels` made into `panels` (start a multiple of PANEL), as an
    (stop - start) x k matrix in `dtype`, in one copy."""
    first, last = start // PANEL, -(-stop // PANEL)
    part = panels[first:last]
    out = torch.empty(part.shape[0], PANEL, part.shape[1], dtype=dtype)
    out.copy_(part.transpose(1, 2))
    return out.view(-1, part.shape[1])[:stop - start]
