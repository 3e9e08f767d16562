"""A decode step's matmuls, of a few rows each, in the form this CPU runs fastest.

Each weight matrix W (out x in) of a decode step meets only the step's rows x (one a sequence), so
the step is bound by reading W from memory. `linear` computes x @ W.T, and on some CPUs its sgemm
takes a few rows far below the memory's speed: on a 2-core AMD EPYC, smollm2's head (W 49152 x 576,
fp32) took 10 ms at 1 row, 35 ms at 3 and 17 ms at 8, where the same product as (W @ x.T).T took
3.6 ms at 2 rows and 4.9 ms at 3. The transposed product runs as two, one per half of W's rows, in
one `bmm`, which takes them one a thread (`_transposed`). The two forms give the same values but for the order of fp32
sums, as `linear`'s own products of one row at different row counts do. On the Intel Xeon this
project measured before, `linear` at one row was near the memory's speed already. So which form a
row count runs in is measured, once per process, dtype and thread count (`transposed_rows`), on one
matrix as large as a CPU's last-level cache, and for the LM head on the head's own shape
(`head_shape`), and `FewRowsLinear` takes the faster one for each count up to MAX_ROWS.

Only models of at least SWAP_BYTES of weights are swapped (`Shard`): on a smaller one the
matrices sit in the caches, where the forms differ little, and measuring would cost every rank of a
small job more than it saves. A shard compiled with `torch.compile` takes the transposed form at
one row only, where torch specializes a graph of its own; its graph for any other count of rows keeps
`linear`, whose kernel inductor picks, unless the shard holds fp32 panels (below). Compiled,
smollm2's single stream then decodes at 1.09-1.20x llama.cpp's F32 ms/token, against 2.77x with
`linear` at one row (BENCHMARKS.md).

A shard whose steps hold several rows (a micro-batch of more than one) may instead hold its weights
reordered once for oneDNN's kernel (`_pack`). On that EPYC it took the 204 block products of a
smollm2 step at 8 rows in 27 ms, where `linear` took 45 and the transposed form 47, and a prefill's
many rows faster too; at one row it took 30 ms against the transposed form's 21.5. A reordered matrix is a copy, and a
shard holds one form of each weight, not both: whether to reorder is measured, once per process,
dtype, thread count and row count, at the micro-batch's rows (`packs`). A tied head, which reads
the embedding's matrix, keeps it as it is there: reordered, it would be a second copy.

On a CPU without bf16 instructions (AVX512-BF16, AMX), torch's bf16 product past a row or two takes
a slow path, 4x fp32's time at 16 rows. There a bf16 shard's matrices take the widened form (`widens`),
which computes in fp32 on the bf16 weights, as torch's bf16 product sums in fp32 before it rounds: a
few rows in the project's kernel, which widens each weight in a register and so reads bf16's bytes,
half of fp32's, and more rows (a prefill) in fp32's own gemm on widened copies of the matrix, a
block of rows at a time. The shard holds such a matrix as the kernel's panels
(`cpu_kernels.to_panels`), on which a smollm2 decode step at 16 rows took 0.83-0.87x the time it
took on the rows (`cpu_kernels.bf16_mm`).
Its attention runs on fp32 copies of its tensors (attention.py). Where the kernel cannot be built,
the products stay torch's.

A CPU with bf16 instructions need not read bf16 weights at the memory's speed either: on an AMD EPYC
with AVX512-BF16 (no AMX) a smollm2 bf16 step at one row took 44 ms in torch's products, 1.5x fp32's,
and 20 ms widened. There the widened form is measured against torch's, once per process, thread count
and row count (`widened_faster`), and taken where it is 10% faster: at one row there, not at 16.

An fp32 shard may instead hold its matrices as the kernel's panels (`cpu_kernels.f32_panels_mm`, the
same layout as bf16's, in fp32): on that EPYC a smollm2 step's 210 layer products took 35-38 ms at 16
rows, where oneDNN on reordered weights took 48-56 and `linear` 63-69 (benchmarks/f32_panels.py); at
one row, no faster than the transposed form in a whole step, they are not taken (`panels_for`). On a
CPU with AVX-512 torch's own kernels are twice as wide as this AVX2 one, so whether to hold panels is
measured, once per process, thread count and row count, on the probe matrix against the fastest of
the other forms (`paneled`). A prefill's many rows take fp32's gemm on whole panels copied back to
rows, a block at a time, as bf16's do.

In either dtype a tied head beside its embedding (a shard holding the whole model) holds their matrix as
panels too, the one copy, and the embedding gathers its rows from them (`PanelEmbedding`): smollm2's
head (49152 x 576) at 16 rows took 8.0-8.7 ms on fp32 panels against 18.2-18.4 in the transposed form
and 24-26 in `linear`, and 6.2-6.4 ms on bf16 panels against 7.9-8.0 on bf16 rows.

A profile records the forms it measured in (`forms`), and a run on that profile takes them (`adopt`)
rather than measuring again: the run then computes the step its plan and prediction were made from.
A shard whose matrices are reordered or held as panels asks for no transposed row counts (`Shard`),
so a run without a profile times only the forms it can take.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from . import cpu_kernels

__all__ = ["MAX_ROWS", "SWAP_BYTES", "FewRowsLinear", "PanelEmbedding", "adopt", "adopt_widened", "bf16_instructions",
           "can_widen", "forms", "head_shape", "is_large", "packs", "packs_for", "paneled", "panels_for", "reorders", "rows_for",
           "swap_linears", "transposed_rows", "widened_faster", "widens"]

MAX_ROWS = 16  # more rows than this take `linear` (its gemm is then at the memory's speed, or the compute's)
# the widened form's rows up to which its kernel is faster than fp32's gemm on a widened copy of the
# matrix: about 64 for a layer's matrix (1536 x 576), 200 for a head's (49152 x 576) on an AVX2 EPYC
WIDE_ROWS = 64
WIDE_BYTES = 32 << 20  # the most of a matrix widened to fp32 at once for more rows than that
SWAP_BYTES = 64 << 20  # a model's weights from which its shards take the faster form
_PROBE = (8192, 1024)  # out x in: 32 MiB in fp32, at or past most CPUs' last-level cache (smollm2's head: 108 MiB)
_chosen: dict[tuple, frozenset[int]] = {}
_packing: dict[tuple, bool] = {}
_paneling: dict[tuple, bool] = {}
_widening: dict[torch.dtype, bool] = {}  # the widened form a profile timed, by dtype (adopt_widened)
_wide_rows: dict[tuple, bool] = {}  # whether widened bf16 is the faster where bf16 has instructions (widened_faster)


def _transposed(x2: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x2 @ weight.T as (weight @ x2.T).T. With an even number of outputs, as a batch of two products,
    one per half of the weight's rows: torch runs a batch's products side by side, one a thread, each a
    gemm of its own, where one gemm of the whole matrix, at a few columns, reads it well below the
    memory's speed (smollm2's 211 matrices at one row: 25 ms against 34 ms as one product of the row
    doubled, on the 2-core AMD EPYC). Otherwise one product, one row doubled into two (a copy: an
    expanded view, of stride 0, takes a slow path)."""
    m, n = x2.shape[0], weight.shape[0]
    if n % 2 == 0:
        halves = torch.bmm(weight.view(2, n // 2, weight.shape[1]), x2.t().expand(2, -1, -1))
        return halves.view(n, m).t().contiguous()
    if m == 1:
        x2 = torch.cat([x2, x2])
    return (weight @ x2.t()).t()[:m].contiguous()


def _pack(weight: torch.Tensor) -> torch.Tensor:
    """`weight` (out x in) reordered into the blocked layout oneDNN's kernel reads (an opaque tensor)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)


def _packed(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out: int) -> torch.Tensor:
    """x @ W.T (+ bias) with W as `_pack` left it; any leading dimensions, as `linear`."""
    if x.numel() == 0:  # no rows: oneDNN is not asked for an empty product
        return x.new_zeros(*x.shape[:-1], out)
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, bias, "none", [], "")


def transposed_rows(dtype: torch.dtype, shape: tuple[int, int] = _PROBE) -> frozenset[int]:
    """The row counts (1..MAX_ROWS) whose product runs faster as (W @ x.T).T than as `linear` here, at
    this process's thread count, for a matrix W of `shape` (out x in): each form's best of five on such a
    matrix (by default one as large as a last-level cache), the transposed one taken only when at least
    10% faster, so that noise leaves `linear`."""
    key = (dtype, torch.get_num_threads(), tuple(shape))
    if key not in _chosen:
        gen = torch.Generator().manual_seed(0)
        w = torch.randn(*shape, generator=gen).to(dtype)
        faster = set()
        for m in range(1, MAX_ROWS + 1):
            x = torch.randn(m, shape[1], generator=gen).to(dtype)
            plain, turned = (_best(lambda: f(x, w)) for f in (nn.functional.linear, _transposed))
            if turned < 0.9 * plain:
                faster.add(m)
        _chosen[key] = frozenset(faster)
    return _chosen[key]


def head_shape(spec) -> tuple[int, int]:
    """The LM head's matrix (vocabulary x hidden): by far a model's largest, and one whose best form at
    a few rows the probe does not tell. On the 2-core AMD EPYC at one thread, smollm2's head (49152 x
    576) took the transposed form in 0.62x and 0.52x `linear`'s time at 2 and 3 rows, where the probe
    (8192 x 1024) measured 1.04-1.12x and 0.85-0.88x: `linear` kept at 3 rows made a step of 3 rows on
    the head's stage cost twice one of 4."""
    return int(spec.config["vocab_size"]), int(spec.config["hidden_size"])


def reorders(dtype: torch.dtype) -> bool:
    """Whether oneDNN here can reorder a weight of `dtype` at all: fp32 wherever torch has oneDNN,
    bf16 only on a CPU with AVX-512 (BW, VL, DQ) or AVX-NE-CONVERT, where it raises otherwise."""
    if not torch.backends.mkldnn.is_available():
        return False
    return dtype == torch.float32 or (dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def packs(dtype: torch.dtype, rows: int) -> bool:
    """Whether products of `rows` rows run faster with the weights reordered for oneDNN (`_pack`) than
    in the faster of the plain forms here, at this process's thread count: on the probe matrix, each
    form's best of five, the reordered one taken only when at least 10% faster."""
    key = (dtype, torch.get_num_threads(), rows)
    if key not in _packing:
        _packing[key] = False
        if reorders(dtype):
            gen = torch.Generator().manual_seed(0)
            w = torch.randn(*_PROBE, generator=gen).to(dtype)
            x = torch.randn(rows, _PROBE[1], generator=gen).to(dtype)
            plain = min(_best(lambda: f(x, w)) for f in (nn.functional.linear, _transposed))
            p = _pack(w)
            _packing[key] = _best(lambda: _packed(x, p, None, _PROBE[0])) < 0.9 * plain
    return _packing[key]


def paneled(dtype: torch.dtype, rows: int) -> bool:
    """Whether products of `rows` rows run faster on fp32 weights held as the kernel's panels
    (`cpu_kernels.f32_panels_mm`) than in the fastest of the other forms here (`_beats_torch`). Only
    fp32, where the kernel is built."""
    key = (dtype, torch.get_num_threads(), rows)
    if key not in _paneling:
        _paneling[key] = dtype == torch.float32 and _beats_torch(dtype, rows, cpu_kernels.f32_panels_mm)
    return _paneling[key]


def widened_faster(rows: int) -> bool:
    """Whether bf16 products of `rows` rows run faster widened, on the kernel's panels
    (`cpu_kernels.bf16_panels_mm`), than in the fastest of torch's own forms here (`_beats_torch`), on
    a CPU with bf16 instructions. On the 2-core AMD EPYC with AVX512-BF16 (no AMX), torch's bf16
    product of one row reads the weights far below the memory's speed: a smollm2 bf16 step at one row
    took 44 ms there, against 20 widened (and 29 in fp32); at 16 rows, where the arithmetic bounds it,
    torch's took 47 ms against 55 widened."""
    key = (torch.get_num_threads(), rows)
    if key not in _wide_rows:
        _wide_rows[key] = _beats_torch(torch.bfloat16, rows, cpu_kernels.bf16_panels_mm)
    return _wide_rows[key]


def _beats_torch(dtype: torch.dtype, rows: int, kernel) -> bool:
    """Whether `kernel` (x, panels, bias, n) on the probe matrix held as the kernel's panels is at least
    10% faster than the fastest of torch's forms a shard would take instead (`linear`, transposed, and
    past one row reordered for oneDNN where it can, as `packs_for`) at `rows` rows, at this process's
    thread count: each form's best of five. False where the kernel is not built."""
    if cpu_kernels.available() is not None:
        return False
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(*_PROBE, generator=gen).to(dtype)
    x = torch.randn(rows, _PROBE[1], generator=gen).to(dtype)
    others = [nn.functional.linear, _transposed]
    if rows > 1 and reorders(dtype):
        p = _pack(w)
        others.append(lambda x, w: _packed(x, p, None, _PROBE[0]))
    best = min(_best(lambda: f(x, w)) for f in others)
    panels = cpu_kernels.to_panels(w)
    return _best(lambda: kernel(x, panels, None, _PROBE[0])) < 0.9 * best


def adopt(dtype: torch.dtype, rows: int, turned, packed: bool, head=None, shape=None, panels=None) -> None:
    """Take these forms (a profile's `products`, as `forms` measured them) in place of measuring them
    again in this process: a run computes in the forms its profile timed. Measured twice, minutes
    apart, a choice within the noise of its 10% margin could differ, and a run would then compute
    another step than the one its plan and prediction were made from. `head`: the head's own row
    counts, for its matrix of `shape` (head_shape); a profile without them leaves the head's to be
    measured, as do `turned` None and `head` None (not measured, since no shard there takes them). `panels`:
    whether its fp32 matrices were held as panels (`paneled`), taken only where the kernel loads here (it
    is loaded now); None (a profile from before they were recorded) leaves that to be measured. Whether
    its bf16 products were widened: `adopt_widened`."""
    threads = torch.get_num_threads()
    if turned is not None:  # None: not measured, the profile's matrices all held in another form (`forms`)
        _chosen[(dtype, threads, _PROBE)] = frozenset(turned)
    if head is not None and shape is not None:
        _chosen[(dtype, threads, tuple(shape))] = frozenset(head)
    _packing[(dtype, threads, rows)] = bool(packed)
    if panels is not None:  # the kernel loaded now, as `paneled` loads it: a run takes panels with no probe
        _paneling[(dtype, threads, rows)] = bool(panels) and cpu_kernels.available() is None


def adopt_widened(dtype: torch.dtype, widened: bool | None) -> None:
    """Take the widened form (`widens`) as a run's profile timed it: a profile timed without it (the
    kernel not built then) keeps the run from taking it. None (no profile, or one from before it was
    recorded) leaves it to this process, whatever a launch's earlier job adopted."""
    if widened is None:
        _widening.pop(dtype, None)
    else:
        _widening[dtype] = bool(widened)


def forms(spec, device: torch.device, dtype: torch.dtype, rows: int) -> dict:
    """The forms an eager shard of `spec` whose steps hold up to `rows` rows takes here, as a profile
    records them: the row counts in the transposed form, the head's own (head_shape), whether its
    weights are reordered, whether they are held as fp32 panels, and whether its products are widened.
    Row counts no shard here would take, its matrices all held reordered or as panels, are not measured
    (seconds a rank) and recorded as None."""
    packed, panels = packs_for(spec, device, dtype, rows=rows), panels_for(spec, device, dtype, rows=rows)
    widened = widens(device, dtype, spec.quantize, rows, is_large(spec))
    held = packed or panels or widened
    turned = None if held else sorted(rows_for(spec, device, dtype, rows=rows))
    head = None
    if _head_may_stay_plain(spec, held, panels or widened):
        head = sorted(rows_for(spec, device, dtype, head=True, rows=rows))
    return {"turned": turned, "head": head, "packed": packed, "panels": panels, "widened": widened}


def _head_may_stay_plain(spec, held: bool, on_panels: bool) -> bool:
    """Whether some shard of `spec` holding the LM head keeps its plain weight, and so takes the head's
    transposed row counts, where its matrices are `held` (reordered or as panels, `on_panels` the
    latter): as `Shard` builds them, only a head tied to the embedding, beside it, keeps the embedding's
    matrix, unless both take panels, which a plain embedding reads (`PanelEmbedding`)."""
    from .families import build_skeleton, unit_modules

    if not held:
        return True
    skeleton = build_skeleton(spec.config)
    embed_name, _, _, head_name = unit_modules(skeleton)
    tied = f"{head_name}.weight" not in spec.units[-1].tensors
    return tied and not (on_panels and type(skeleton.get_submodule(embed_name)) is nn.Embedding)


def bf16_instructions() -> bool:
    """Whether this CPU computes bf16 products with instructions of their own (AVX512-BF16 or AMX)."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def widens(device: torch.device, dtype: torch.dtype, quantize: str | None = None, rows: int = 1,
           large: bool = True) -> bool:
    """Whether a shard's matrices here, whose steps hold up to `rows` rows, take the widened form: bf16
    weights, unquantized, where this project's kernel is built (`can_widen`), on a CPU without bf16
    instructions always, on one with them for a `large` model (`is_large`) where it measures faster at
    those rows (`widened_faster`); unless the profile a run took its forms from recorded otherwise
    (`adopt_widened`). A small model keeps torch's bf16 products there, as it keeps the other forms."""
    if not can_widen(device, dtype, quantize):
        return False
    if dtype in _widening:
        return _widening[dtype]
    return not bf16_instructions() or (large and widened_faster(rows))


def is_large(spec) -> bool:
    """Whether a model's weights reach SWAP_BYTES, from which its shards take the forms measured faster."""
    return spec.bytes_of(0, spec.num_units - 1) >= SWAP_BYTES


def can_widen(device: torch.device, dtype: torch.dtype, quantize: str | None = None) -> bool:
    """Whether this machine could compute such products widened, whatever a profile timed (`widens`)."""
    if device.type != "cpu" or dtype != torch.bfloat16 or quantize:
        return False
    return cpu_kernels.available() is None


def packs_for(spec, device: torch.device, dtype: torch.dtype, compile: bool = False, rows: int = 1) -> bool:
    """Whether a shard of `spec` whose steps hold up to `rows` rows reorders its weights for oneDNN:
    only on a CPU, unquantized, eager (a compiled graph's products are inductor's), for a model of at
    least SWAP_BYTES, at more than one row, and where that measures faster (`packs`), unless it holds
    panels (`panels_for`)."""
    if device.type != "cpu" or spec.quantize or compile or rows < 2 or widens(device, dtype, spec.quantize, rows,
                                                                                is_large(spec)):
        return False
    if not is_large(spec) or panels_for(spec, device, dtype, compile, rows):
        return False
    return packs(dtype, rows)


def panels_for(spec, device: torch.device, dtype: torch.dtype, compile: bool = False, rows: int = 1) -> bool:
    """Whether a shard of `spec` in fp32 whose steps hold up to `rows` rows holds its matrices as the
    kernel's panels: only on a CPU, unquantized, for a model of at least SWAP_BYTES, at more than one
    row, and where that measures faster (`paneled`). Compiled too: a compiled step calls the kernel as
    one op, as bf16's widened form does: inductor's own products of 16 rows took smollm2's step as long
    as eager's on the EPYC (104.9 and 105.4 ms a token), compiled on panels 75.1. At one row the
    transposed form reads the weights near the memory's speed already: on the 2-core EPYC the panels
    took smollm2's layer products in 0.87x its time but whole steps in the same, so that ranks measuring
    side by side chose either way, and a profile's devices would be timed in different forms."""
    if device.type != "cpu" or dtype != torch.float32 or spec.quantize or rows < 2:
        return False
    return is_large(spec) and paneled(dtype, rows)


def rows_for(spec, device: torch.device, dtype: torch.dtype, compile: bool = False,
             head: bool = False, rows: int = 1) -> frozenset[int]:
    """The row counts a shard of `spec` in `dtype` on `device`, whose steps hold up to `rows` rows,
    takes in the transposed form, in its LM head with `head` (measured on the head's own shape), else
    in its other matrices: none on a GPU, quantized (quant.Int8Linear has its own kernel), widened
    (`widens`) or for a model under SWAP_BYTES. A compiled shard takes it at one row at most: torch
    specializes a graph for one row, while its other graph serves any count of rows, whose products
    stay `linear`'s (inductor's own)."""
    if device.type != "cpu" or spec.quantize or not is_large(spec):
        return frozenset()
    if widens(device, dtype, spec.quantize, rows, is_large(spec)):
        return frozenset()
    turned = transposed_rows(dtype, head_shape(spec) if head else _PROBE)
    return turned & {1} if compile else turned


def _best(fn, repeats: int = 5) -> float:
    fn()  # the first call may allocate or pick a kernel
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


class FewRowsLinear(nn.Linear):
    """`nn.Linear` whose product of a few rows runs in the faster form (`transposed_rows`), or whose
    weight is held reordered for oneDNN (`packed`, in place of `weight`, which is then None), or as the
    kernel's panels (`panels`, in place of `weight`: fp32 ones, `paneled`), or whose bf16 products are
    computed in fp32 (`widened`), on a weight then held as panels where it is reordered."""

    turned: frozenset[int] = frozenset()
    packed: torch.Tensor | None = None
    panels: torch.Tensor | None = None
    widened: bool = False

    @classmethod
    def of(cls, linear: nn.Linear, turned: frozenset[int], pack: bool = False, widen: bool = False,
           panel: bool = False) -> "FewRowsLinear":
        """A FewRowsLinear holding `linear`'s own parameters (nothing is copied), or with `pack` its
        weight reordered (`linear`'s then left to be freed) and its own bias: for oneDNN, or as the
        kernel's panels, widened (`widens`) or with `panel` in fp32."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight, new.bias = linear.weight, linear.bias
        new.turned, new.widened = turned, widen
        if pack and (widen or panel):
            new.panels = cpu_kernels.to_panels(linear.weight)
            new.weight = None
        elif pack:
            new.packed = _pack(linear.weight)
            new.weight = None
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return _packed(x, self.packed, self.bias, self.out_features)
        if self.widened or self.panels is not None:
            return self._in_kernel(x)
        m = x.numel() // x.shape[-1] if x.shape[-1] else 0
        if torch.compiler.is_compiling():  # rows past one are a symbol: testing them would specialize the graph
            turn = m == 1 and 1 in self.turned
        else:
            turn = m in self.turned
        if not turn:
            return nn.functional.linear(x, self.weight, self.bias)
        y = _transposed(x.reshape(m, x.shape[-1]), self.weight)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)


    def _in_kernel(self, x: torch.Tensor) -> torch.Tensor:
        """x @ W.T (+ bias) summed in fp32 on the bf16 or fp32 weight, rounded once to x's dtype. In a
        compiled graph always the kernel: there the rows are a symbol, and testing them would split the graph."""
        x2, panels = x.reshape(-1, x.shape[-1]), self.panels
        if x2.shape[0] <= WIDE_ROWS or torch.compiler.is_compiling():
            if panels is not None:
                y = cpu_kernels.panels_mm(x2, panels, self.bias, self.out_features)
            else:
                y = cpu_kernels.bf16_mm(x2, self.weight, self.bias)
        else:  # a prefill's many rows: fp32's gemm on widened copies of WIDE_BYTES of the matrix at a time,
            # so that a large head's copy stays small (a 256k x 4096 one would be 4 GiB in fp32)
            x32, y = x2.float(), x2.new_empty(x2.shape[0], self.out_features)
            step = max(1, WIDE_BYTES // (4 * self.in_features))
            step = step if panels is None else max(1, step // cpu_kernels.PANEL) * cpu_kernels.PANEL  # whole panels
            for i in range(0, self.out_features, step):
                end = min(i + step, self.out_features)
                w = self.weight[i:end].float() if panels is None else cpu_kernels.from_panels(panels, i, end)
                bias = None if self.bias is None else self.bias[i:end].float()
                y[:, i:end] = nn.functional.linear(x32, w, bias)  # rounded once
        return y.reshape(*x.shape[:-1], self.out_features)


class PanelEmbedding(nn.Module):
    """An embedding whose matrix its tied head holds as the kernel's panels (the shard's `FewRowsLinear`):
    its rows gathered from those panels, so that the matrix is held once, in the head's faster form. A
    plain `nn.Embedding`'s lookup; its padding index only ever mattered to gradients."""

    def __init__(self, embedding: nn.Embedding, panels: torch.Tensor):
        super().__init__()
        self.num_embeddings, self.embedding_dim = embedding.num_embeddings, embedding.embedding_dim
        self.panels = panels

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return cpu_kernels.panel_rows(self.panels, ids)


def swap_linears(module: nn.Module, turned: frozenset[int], pack: bool = False, widen: bool = False,
                 panel: bool = False) -> nn.Module:
    """`module` with each `nn.Linear` in it (itself included) a FewRowsLinear on the same parameters,
    or with `pack` on its weight reordered (for oneDNN, or with `panel` as fp32 panels), or with `widen`
    computing in fp32 (`widens`). Its attention is attention.py's."""
    if not turned and not pack and not widen:
        return module
    if type(module) is nn.Linear:
        return FewRowsLinear.of(module, turned, pack, widen, panel)
    for name, child in list(module.named_modules()):
        if name and type(child) is nn.Linear:
            parent, _, leaf = name.rpartition(".")
            setattr(module.get_submodule(parent) if parent else module, leaf,
                    FewRowsLinear.of(child, turned, pack, widen, panel))
    return module
