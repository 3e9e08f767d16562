"""The CPU kernels (`cpu_kernels`: `csrc/int8_mm.c`, `csrc/bf16_mm.c` and `csrc/panels_mm.c` as the ops
`edgeshard::int8_mm`, `edgeshard::bf16_mm`, `edgeshard::bf16_panels_mm` and `edgeshard::f32_panels_mm`):
their products against exact ones, a compiled graph calling them, and aten's products where they cannot
be built.

The kernel rounds each row of activations to int16 with a scale of its own and sums exactly in int32,
so its only error is that rounding: |y - exact| <= scale_r * sum_k |w_rk| * step_m / 2, with step_m
= max|x_m| / 32767, plus fp32's rounding of the sums and scales. The shapes cover a column tail
that is not a multiple of the 32 a vector step takes, more columns than an int32 lane may sum
(4096), and row counts that take the 4-, 2- and 1-row paths.
"""

import shutil

import pytest
import torch

from edgeshard_mpi import cpu_kernels
from edgeshard_mpi.quant import Int8Linear, quantize_rows

HAS_AVX2 = torch.backends.cpu.get_cpu_capability().startswith(("AVX2", "AVX512"))
builds = pytest.mark.skipif(not (HAS_AVX2 and shutil.which("cc") and shutil.which("c++")),
                            reason="needs AVX2 and C and C++ compilers")


@pytest.fixture(autouse=True)
def _kernels_loaded():
    """The ops exist once the kernels are loaded: each test, run alone, finds them as in the whole file."""
    if HAS_AVX2 and shutil.which("cc") and shutil.which("c++"):
        cpu_kernels.available()


@builds
def test_the_kernel_builds_where_it_can():
    assert cpu_kernels.available() is None


@builds
@pytest.mark.parametrize("m,n,k", [(1, 67, 96), (2, 130, 100), (3, 64, 4144), (7, 5, 33), (16, 200, 576)])
def test_products_are_exact_but_for_the_activations_rounding(m, n, k):
    gen = torch.Generator().manual_seed(m * 1000 + n + k)
    w = torch.randn(n, k, generator=gen) * torch.logspace(-2, 1, n)[:, None]
    q, scales = quantize_rows(w)
    x = torch.randn(m, k, generator=gen) * 3
    x[0, 5] = 40.0  # an outlier sets the row's step
    if m > 1:
        x[1] = 0.0  # a row of zeros keeps a usable scale
    got = cpu_kernels.int8_mm(x, q, scales)
    s = scales.double()
    exact = (x.double() @ q.double().T) * s
    step = x.abs().amax(1).double() / 32767
    bound = (q.double().abs().sum(1) * s)[None, :] * step[:, None] / 2 + 1e-6 * exact.abs() + 1e-7
    assert got.dtype == torch.float32 and got.shape == (m, n)
    assert torch.all((got.double() - exact).abs() <= bound)
    if m > 1:
        assert torch.all(got[1] == 0)


@builds
def test_a_compiled_graph_calls_the_kernel_as_one_op_and_matches_eager():
    lin = Int8Linear(96, 40, bias=True, dtype=torch.float32)
    q, scales = quantize_rows(torch.randn(40, 96, generator=torch.Generator().manual_seed(2)))
    lin.load_state_dict({"weight": q, "scales": scales, "bias": torch.randn(40)})
    x = torch.randn(1, 3, 96)
    with torch.no_grad():
        assert torch.equal(torch.compile(lin, fullgraph=True)(x), lin(x))  # fullgraph: no break at the op


@builds
@pytest.mark.parametrize("panels", [False, True], ids=["rows", "panels"])
@pytest.mark.parametrize("m,n,k", [(1, 67, 96), (2, 130, 100), (3, 64, 4144), (7, 5, 33), (9, 41, 8), (16, 200, 576),
                                   (40, 24, 97), (6, 48, 1)])
def test_bf16_products_are_fp32_sums_rounded_once(m, n, k, panels):
    """The bf16 kernels widen bf16 weights to fp32 exactly and sum in fp32: within fp32's summation
    error of the exact product, and bf16 rows give that fp32 result rounded once to bf16. The shapes
    take every row count of a block (1-4, and 8 for the weight as rows), column tails that are not a
    multiple of 8, and panels padded past the weight's last row."""
    gen = torch.Generator().manual_seed(m * 1000 + n + k)
    w = (torch.randn(n, k, generator=gen) * torch.logspace(-2, 1, n)[:, None]).bfloat16()
    x = torch.randn(m, k, generator=gen).bfloat16()
    bias = torch.randn(n, generator=gen).bfloat16()
    if panels:
        p = cpu_kernels.to_panels(w)
        assert p.shape == (-(-n // cpu_kernels.PANEL), k, cpu_kernels.PANEL)
        product = lambda x, bias=None: cpu_kernels.bf16_panels_mm(x, p, bias, n)
    else:
        product = lambda x, bias=None: cpu_kernels.bf16_mm(x, w, bias)
    got = product(x.float(), bias)
    exact = x.double() @ w.double().T + bias.double()
    bound = 2 * k * 2.0**-24 * (x.double().abs() @ w.double().abs().T + bias.double().abs()) + 1e-30
    assert got.dtype == torch.float32 and got.shape == (m, n)
    assert torch.all((got.double() - exact).abs() <= bound)
    assert torch.equal(product(x, bias), got.bfloat16())  # bf16 in, bf16 out: rounded once
    assert torch.equal(product(x), product(x.float()).bfloat16())


@builds
@pytest.mark.parametrize("m,n,k", [(1, 67, 96), (2, 130, 100), (3, 64, 4144), (7, 5, 33), (16, 200, 576), (6, 48, 1)])
def test_fp32_panel_products_are_within_fp32_sums_error(m, n, k):
    """fp32 weights as panels: every row count of a block (1-4), padded panels, one column."""
    gen = torch.Generator().manual_seed(m * 1000 + n + k)
    w = torch.randn(n, k, generator=gen) * torch.logspace(-2, 1, n)[:, None]
    x, bias = torch.randn(m, k, generator=gen), torch.randn(n, generator=gen)
    p = cpu_kernels.to_panels(w)
    assert p.dtype == torch.float32 and p.shape == (-(-n // cpu_kernels.PANEL), k, cpu_kernels.PANEL)
    got = cpu_kernels.f32_panels_mm(x, p, bias, n)
    exact = x.double() @ w.double().T + bias.double()
    bound = 2 * k * 2.0**-24 * (x.double().abs() @ w.double().abs().T + bias.double().abs()) + 1e-30
    assert got.dtype == torch.float32 and got.shape == (m, n)
    assert torch.all((got.double() - exact).abs() <= bound)
    assert torch.equal(cpu_kernels.panels_mm(x, p, None, n), cpu_kernels.f32_panels_mm(x, p, None, n))


def test_panels_hold_the_weight_and_give_back_any_run_of_its_rows():
    """`to_panels` and `from_panels` (what a prefill widens) are inverse on every run of whole panels."""
    w = torch.randn(53, 7).bfloat16()
    p = cpu_kernels.to_panels(w)
    assert p.dtype == torch.bfloat16 and p.is_contiguous() and p.shape == (3, 7, cpu_kernels.PANEL)
    assert torch.equal(p[0, :, 5], w[5]) and torch.equal(p[2, :, 4], w[52]) and not p[2, :, 5:].any()
    for start, stop in [(0, 53), (24, 53), (0, 24), (24, 48), (48, 53), (0, 1)]:
        part = cpu_kernels.from_panels(p, start, stop)
        assert part.dtype == torch.float32 and part.is_contiguous() and torch.equal(part, w[start:stop].float())


@builds
@pytest.mark.parametrize("dtype,pack", [(torch.bfloat16, False), (torch.bfloat16, True), (torch.float32, True)],
                         ids=["bf16 rows", "bf16 panels", "fp32 panels"])
def test_a_compiled_graph_calls_the_panel_and_bf16_kernels_as_one_op_and_matches_eager(dtype, pack):
    from edgeshard_mpi.fewrows import FewRowsLinear

    assert cpu_kernels.available() is None  # loaded (as a widened shard has it) before the graph is traced
    plain = torch.nn.Linear(96, 40, bias=True).to(dtype)
    lin = FewRowsLinear.of(plain, frozenset(), pack=pack, widen=dtype == torch.bfloat16, panel=dtype == torch.float32)
    x = torch.randn(1, 3, 96).to(dtype)
    with torch.no_grad():
        assert torch.equal(torch.compile(lin, fullgraph=True)(x), lin(x))  # fullgraph: no break at the op


def test_without_the_kernel_int8_takes_atens(monkeypatch):
    lin = Int8Linear(64, 24, bias=False, dtype=torch.float32)
    q, scales = quantize_rows(torch.randn(24, 64, generator=torch.Generator().manual_seed(3)))
    lin.load_state_dict({"weight": q, "scales": scales})
    x = torch.randn(2, 64)
    monkeypatch.setattr(cpu_kernels, "available", lambda: "not here")
    aten = torch.ops.aten._weight_int8pack_mm(x.bfloat16(), q, scales).float()
    assert torch.equal(lin(x), aten)


def test_a_missing_compiler_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", "no-such-cc")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    with pytest.raises(RuntimeError, match=r"no compiler: \$CC or 'no-such-cc' is not on PATH"):
        cpu_kernels._build()


@builds
def test_a_compiled_int8_shard_decodes_as_the_eager_one(tiny_path):
    # the compiled one-row step (inductor's C++ wrapper) calls the op: greedy tokens as the eager shard's
    from test_compile import _greedy

    from edgeshard_mpi.models import ModelSpec
    from edgeshard_mpi.shard import Shard

    spec = ModelSpec.load(tiny_path, "float32", quantize="int8")
    eager = Shard(spec, 0, spec.num_units - 1)
    compiled = Shard(spec, 0, spec.num_units - 1, compile=True)
    compiled.warm_up(1)
    ids = torch.randint(5, 1000, (1, 12), generator=torch.Generator().manual_seed(0))
    want = _greedy(eager, ids, [0], 24, 40)
    got = _greedy(compiled, ids, [0], 24, 40)
    assert compiled.compiled.graphs == 1 and torch.equal(got[1], want[1])


@builds
def test_a_compiled_fp32_shard_on_panels_decodes_as_the_eager_one(tiny_path, monkeypatch):
    # a shard of micro-batches of 3 holding fp32 panels (as if measured faster, and the tiny model as
    # large as one that swaps): its compiled steps call the kernel; greedy tokens as the eager shard's
    from test_compile import _greedy

    import edgeshard_mpi.fewrows as fewrows
    from edgeshard_mpi.models import ModelSpec
    from edgeshard_mpi.shard import Shard

    monkeypatch.setattr(fewrows, "SWAP_BYTES", 0)
    monkeypatch.setitem(fewrows._paneling, (torch.float32, torch.get_num_threads(), 3), True)
    spec = ModelSpec.load(tiny_path, "float32")
    eager = Shard(spec, 0, spec.num_units - 1, rows=3)
    compiled = Shard(spec, 0, spec.num_units - 1, compile=True, rows=3)
    assert eager.paneled and compiled.paneled
    compiled.warm_up(3)
    ids = torch.randint(5, 1000, (3, 12), generator=torch.Generator().manual_seed(0))
    want = _greedy(eager, ids, [0, 2, 0], 16, 40, leave_at=5)
    got = _greedy(compiled, ids, [0, 2, 0], 16, 40, leave_at=5)
    assert got[0] == want[0] and torch.equal(got[1], want[1])
