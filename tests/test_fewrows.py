"""Few-row products in either form, in-process: the same values as `linear`, on the same parameters."""

from __future__ import annotations

import dataclasses
import platform
import subprocess
import sys

import pytest
import torch
from torch import nn

from edgeshard_mpi import cpu_kernels
from edgeshard_mpi.attention import SDPA_FP32, SDPA_PACKED
from edgeshard_mpi.fewrows import (MAX_ROWS, WIDE_ROWS, FewRowsLinear, PanelEmbedding, packs_for, reorders, rows_for,
                                   swap_linears, transposed_rows, widens)

EVERY = frozenset(range(1, MAX_ROWS + 1))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("out", [200, 201])  # an even count runs as two halves, an odd one whole
def test_either_form_gives_linears_values(bias, dtype, out):
    torch.manual_seed(0)
    plain = nn.Linear(96, out, bias=bias).to(dtype)
    turned = FewRowsLinear.of(plain, EVERY)
    assert turned.weight is plain.weight and turned.bias is plain.bias  # nothing copied
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for shape in [(1, 1, 96), (3, 1, 96), (7, 96), (2, 5, 96), (MAX_ROWS + 1, 1, 96), (4, 0, 96)]:
        x = torch.randn(*shape).to(dtype)
        want, got = plain(x), turned(x)
        assert got.shape == want.shape and got.is_contiguous()
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)


needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="no oneDNN in this torch")


@needs_onednn
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_reordered_weight_gives_linears_values_and_is_the_only_copy(bias, dtype):
    if not reorders(dtype):
        pytest.skip(f"oneDNN on this CPU does not reorder {dtype} weights (see the test below)")
    torch.manual_seed(0)
    plain = nn.Linear(96, 200, bias=bias).to(dtype)
    packed = FewRowsLinear.of(plain, frozenset(), pack=True)
    assert packed.weight is None and packed.packed.is_mkldnn and packed.bias is plain.bias
    assert [p for p in packed.parameters()] == ([plain.bias] if bias else [])  # no plain matrix kept
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for shape in [(1, 1, 96), (3, 1, 96), (7, 96), (2, 5, 96), (MAX_ROWS + 1, 1, 96), (4, 0, 96)]:
        x = torch.randn(*shape).to(dtype)
        want, got = plain(x), packed(x)
        assert got.shape == want.shape and got.dtype == want.dtype
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    x = torch.randn(6, 192).to(dtype)[:, ::2]  # a strided view, as a layer may hand on
    torch.testing.assert_close(packed(x), plain(x), rtol=tol, atol=tol)


needs_kernels = pytest.mark.skipif(cpu_kernels.available() is not None, reason="the CPU kernels are not built here")


@needs_kernels
@pytest.mark.parametrize("pack", [False, True], ids=["rows", "panels"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("block", [None, 50])  # rows of the matrix widened at once for many rows: all, or 50
def test_the_widened_form_gives_linears_values_in_fp32_sums(bias, block, pack, monkeypatch):
    """bf16 weights, products summed in fp32 and rounded once: the kernel's few rows and the widened
    copies' many rows both give the fp32 product of the same bf16 values, rounded to bf16 (but for a
    rounding that an fp32 sum in another order may tip by one bf16 step), on the weight as it is or
    as the kernel's panels."""
    import edgeshard_mpi.fewrows as fewrows

    if block:
        monkeypatch.setattr(fewrows, "WIDE_BYTES", block * 96 * 4)
    torch.manual_seed(0)
    plain = nn.Linear(96, 201, bias=bias).bfloat16()
    wide = FewRowsLinear.of(plain, frozenset(), pack=pack, widen=True)
    if pack:
        assert wide.weight is None and wide.bias is plain.bias and wide.panels.shape == (9, 96, 24)
    else:
        assert wide.weight is plain.weight and wide.bias is plain.bias and wide.panels is None  # nothing copied
    for shape in [(1, 1, 96), (3, 1, 96), (7, 96), (2, 5, 96), (MAX_ROWS + 1, 1, 96), (WIDE_ROWS + 3, 96),
                  (4, 0, 96)]:
        x = torch.randn(*shape).bfloat16()
        exact = nn.functional.linear(x.float(), plain.weight.float(), None if plain.bias is None else plain.bias.float())
        got = wide(x)
        assert got.shape == exact.shape and got.dtype == torch.bfloat16 and got.is_contiguous()
        torch.testing.assert_close(got.float(), exact.bfloat16().float(), rtol=2**-7, atol=1e-6)
        assert (got != exact.bfloat16()).sum() <= 0.01 * got.numel()  # nearly all rounded as the exact sum is


@needs_kernels
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("block", [None, 50])  # rows of the matrix copied back at once for many rows: all, or 50
def test_fp32_panels_give_linears_values(bias, block, monkeypatch):
    """fp32 weights held as the kernel's panels, the only copy: a few rows in the kernel and many (a
    prefill) in fp32's gemm on rows copied back from the panels give `linear`'s values, but for the
    order of fp32 sums."""
    import edgeshard_mpi.fewrows as fewrows

    if block:
        monkeypatch.setattr(fewrows, "WIDE_BYTES", block * 96 * 4)
    torch.manual_seed(0)
    plain = nn.Linear(96, 201, bias=bias)
    held = FewRowsLinear.of(plain, frozenset(), pack=True, panel=True)
    assert held.weight is None and held.bias is plain.bias and held.panels.dtype == torch.float32
    assert held.panels.shape == (9, 96, 24) and [p for p in held.parameters()] == ([plain.bias] if bias else [])
    for shape in [(1, 1, 96), (3, 1, 96), (7, 96), (2, 5, 96), (MAX_ROWS + 1, 1, 96), (WIDE_ROWS + 3, 96),
                  (4, 0, 96)]:
        x = torch.randn(*shape)
        want, got = plain(x), held(x)
        assert got.shape == want.shape and got.dtype == torch.float32 and got.is_contiguous()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_an_embedding_on_its_heads_panels_looks_up_the_matrixs_rows(dtype):
    """Every row, those of the last, padded panel too (100 rows: 4 panels of 24 and 4 rows), at any shape
    of ids, exactly as the embedding on the matrix itself."""
    embedding = nn.Embedding(100, 40).to(dtype)
    panels = cpu_kernels.to_panels(embedding.weight)
    assert panels.shape[0] * cpu_kernels.PANEL > 100
    on_panels = PanelEmbedding(embedding, panels)
    for ids in (torch.arange(100), torch.tensor([[99, 0, 24, 23], [97, 96, 48, 5]]), torch.tensor([[7]])):
        got = on_panels(ids)
        assert got.dtype == dtype and torch.equal(got, embedding(ids))


def test_bf16_widens_without_bf16_instructions_and_where_it_measures_faster_with_them(monkeypatch):
    import edgeshard_mpi.fewrows as fewrows
    from edgeshard_mpi.runner import _bf16_without_instructions

    cpu, bf16 = torch.device("cpu"), torch.bfloat16
    monkeypatch.setattr(fewrows, "bf16_instructions", lambda: False)
    monkeypatch.setattr(cpu_kernels, "available", lambda: None)
    assert widens(cpu, bf16)
    assert not widens(cpu, torch.float32) and not widens(cpu, torch.float16)
    assert not widens(cpu, bf16, "int8") and not widens(torch.device("cuda"), bf16)
    assert _bf16_without_instructions("cpu", "bfloat16", None) is None  # widened: nothing to warn of
    monkeypatch.setattr(cpu_kernels, "available", lambda: "no compiler")
    assert not widens(cpu, bf16)
    if platform.machine() in ("x86_64", "AMD64"):  # torch's own bf16 products: a rank says so at the start
        isa = torch.backends.cpu.get_cpu_capability()
        assert _bf16_without_instructions("cpu", "bfloat16", None) == f"{isa}: no compiler"
    assert _bf16_without_instructions("cpu", "bfloat16", "int8") is None
    assert _bf16_without_instructions("cpu", "float32", None) is None
    monkeypatch.setattr(cpu_kernels, "available", lambda: None)
    monkeypatch.setattr(fewrows, "bf16_instructions", lambda: True)
    # with bf16 instructions, at the row counts where the widened form measures faster (widened_faster)
    monkeypatch.setattr(fewrows, "widened_faster", lambda rows: rows == 1)
    assert widens(cpu, bf16, rows=1) and not widens(cpu, bf16, rows=16)
    assert not widens(cpu, bf16, rows=1, large=False)  # a small model keeps torch's products, as generate has them
    assert not widens(cpu, bf16, "int8", rows=1) and not widens(torch.device("cuda"), bf16, rows=1)
    assert _bf16_without_instructions("cpu", "bfloat16", None) is None  # it has bf16 instructions


def test_widened_faster_measures_against_the_forms_a_shard_would_take_instead(monkeypatch):
    """At one row a shard never reorders its weights (packs_for), so the widened form is timed against
    `linear` and the transposed form only; past one row against oneDNN's reordered weights too. Each
    row count is measured once."""
    import edgeshard_mpi.fewrows as fewrows

    monkeypatch.setattr(fewrows, "_wide_rows", {})
    monkeypatch.setattr(cpu_kernels, "available", lambda: None)
    monkeypatch.setattr(fewrows, "reorders", lambda dtype: True)
    monkeypatch.setattr(fewrows, "_pack", lambda w: w)
    reordered, kernel = [], []
    monkeypatch.setattr(fewrows, "_packed",
                        lambda x, w, bias, n: reordered.append(len(x)) or nn.functional.linear(x, w))
    monkeypatch.setattr(cpu_kernels, "to_panels", lambda w: w)
    monkeypatch.setattr(cpu_kernels, "bf16_panels_mm", lambda x, w, bias, n: kernel.append(len(x)) or x @ w.t())
    times = []
    monkeypatch.setattr(fewrows, "_best", lambda fn: (fn(), times.pop(0))[1])
    times[:] = [1.0, 1.0, 0.8]  # linear, transposed, the kernel
    assert fewrows.widened_faster(1) and reordered == [] and kernel == [1] and not times
    assert fewrows.widened_faster(1) and kernel == [1]  # measured once
    times[:] = [1.0, 1.0, 0.5, 0.8]  # linear, transposed, reordered, the kernel
    assert not fewrows.widened_faster(2) and reordered == [2] and kernel == [1, 2] and not times


@needs_kernels
def test_a_widened_bf16_shard_keeps_the_models_logits(tiny_path, monkeypatch):
    """A shard whose every matrix and attention takes the widened form against one on torch's bf16
    products: both sum in fp32 and round to bf16, so their logits differ only where a rounding tipped
    the other way."""
    import edgeshard_mpi.fewrows as fewrows
    from edgeshard_mpi.models import ModelSpec
    from edgeshard_mpi.shard import Shard

    spec = ModelSpec.load(tiny_path, "bfloat16")
    monkeypatch.setattr(fewrows, "bf16_instructions", lambda: False)
    wide = Shard(spec, 0, spec.num_units - 1)
    monkeypatch.setattr(fewrows, "bf16_instructions", lambda: True)
    monkeypatch.setattr(fewrows, "widened_faster", lambda rows: False)  # torch's own bf16 products
    plain = Shard(spec, 0, spec.num_units - 1)
    linears = lambda s: [m for layer in [s.lm_head, *s.layers] for m in layer.modules() if isinstance(m, nn.Linear)]
    assert wide.widened and all(type(m) is FewRowsLinear and m.widened for m in linears(wide))
    # every matrix held as the kernel's panels, a tied head's too (tiny-random's): the embedding reads them
    assert all(m.panels is not None and m.weight is None for layer in [wide.lm_head, *wide.layers]
               for m in layer.modules() if isinstance(m, nn.Linear))
    assert isinstance(wide.embed, PanelEmbedding) and wide.embed.panels is wide.lm_head.panels
    assert wide.param_bytes == plain.param_bytes  # the panels' padding is not the model's
    assert not plain.widened and {type(m) for m in linears(plain)} == {nn.Linear}
    # attention in fp32 on the widened shard's own layers; the masks, built from the shared config, stay sdpa's
    assert {layer.self_attn.config._attn_implementation for layer in wide.layers} == {SDPA_FP32}
    # the plain one's as this CPU attends in bf16 (attention.py)
    assert {layer.self_attn.config._attn_implementation for layer in plain.layers} == {plain.attention_form}
    assert plain.attention_form in ("sdpa", SDPA_PACKED) and wide.config._attn_implementation == "sdpa"
    ids = torch.randint(5, 1000, (3, 9), generator=torch.Generator().manual_seed(0))
    fp32 = Shard(ModelSpec.load(tiny_path, "float32"), 0, spec.num_units - 1)
    steps = [(ids, [0, 2, 0])] + [(torch.tensor([[20 + i], [30 + i], [40 + i]]), None) for i in range(4)]
    for x, pads in steps:
        a, b, c = (s.forward(0, x, pads, 16) if pads else s.forward(0, x) for s in (wide, plain, fp32))
        # each as near the fp32 shard's logits as the other: bf16's rounding, not the form, sets the error
        assert (a.float() - c).abs().max() <= 2 * (b.float() - c).abs().max() + 1e-2
        # and near each other: bf16 keeps 8 bits, and its roundings of the hidden states, which differ
        # between the forms (oneDNN's AVX512-BF16 products round in pairs), move logits by up to ~2% of
        # their scale (1.3-1.9% measured on an AMD EPYC with AVX512-BF16)
        torch.testing.assert_close(a.float(), b.float(), rtol=0, atol=0.04 * c.abs().max().item())


def test_a_dtype_oneDNN_cannot_reorder_here_is_never_reordered(monkeypatch):
    """bf16 reordering raises on a CPU without AVX-512 (an AVX2-only EPYC): measuring there must say
    no, not fail the shard. Asked as that CPU would answer, the measurement never reorders."""
    import edgeshard_mpi.fewrows as fewrows

    monkeypatch.setattr(fewrows, "_packing", {})
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    assert fewrows.reorders(torch.float32) == torch.backends.mkldnn.is_available()
    assert not fewrows.reorders(torch.bfloat16)
    assert not fewrows.packs(torch.bfloat16, 8)  # no probe was reordered: it would raise on that CPU


def test_only_several_rows_of_a_large_eager_cpu_model_reorder(smollm_path, monkeypatch):
    import edgeshard_mpi.fewrows as fewrows
    from edgeshard_mpi.models import ModelSpec

    spec = ModelSpec.load(smollm_path, "float32")
    cpu = torch.device("cpu")
    monkeypatch.setattr(fewrows, "packs", lambda dtype, rows: True)  # as if measured faster at every count
    monkeypatch.setattr(fewrows, "paneled", lambda dtype, rows: False)  # and the panels slower
    assert packs_for(spec, cpu, torch.float32, rows=8)
    assert not packs_for(spec, cpu, torch.float32, rows=1)  # one row: the transposed form's
    assert not packs_for(spec, cpu, torch.float32, compile=True, rows=8)  # inductor's own products
    assert not packs_for(spec, torch.device("cuda"), torch.float32, rows=8)
    assert not packs_for(dataclasses.replace(spec, quantize="int8"), cpu, torch.float32, rows=8)
    monkeypatch.setattr(fewrows, "SWAP_BYTES", spec.bytes_of(0, spec.num_units - 1) + 1)
    assert not packs_for(spec, cpu, torch.float32, rows=8)  # a small model's matrices sit in the caches


def test_only_fp32_of_a_large_eager_cpu_model_holds_panels_and_then_no_reordered_weight(smollm_path, monkeypatch):
    import edgeshard_mpi.fewrows as fewrows
    from edgeshard_mpi.fewrows import panels_for
    from edgeshard_mpi.models import ModelSpec

    spec = ModelSpec.load(smollm_path, "float32")
    cpu = torch.device("cpu")
    monkeypatch.setattr(fewrows, "packs", lambda dtype, rows: True)
    monkeypatch.setattr(fewrows, "paneled", lambda dtype, rows: True)  # as if measured faster than every form
    assert panels_for(spec, cpu, torch.float32, rows=2) and panels_for(spec, cpu, torch.float32, rows=8)
    assert not panels_for(spec, cpu, torch.float32, rows=1)  # one row: the transposed form's
    assert not packs_for(spec, cpu, torch.float32, rows=8)  # one form a matrix: the panels
    assert panels_for(spec, cpu, torch.float32, compile=True, rows=8)  # a compiled step calls the kernel
    assert not panels_for(spec, torch.device("cuda"), torch.float32, rows=8)
    assert not panels_for(spec, cpu, torch.bfloat16, rows=8)  # bf16's panels are the widened form's
    assert not panels_for(dataclasses.replace(spec, quantize="int8"), cpu, torch.float32, rows=8)
    monkeypatch.setattr(fewrows, "SWAP_BYTES", spec.bytes_of(0, spec.num_units - 1) + 1)
    assert not panels_for(spec, cpu, torch.float32, rows=8)


@needs_kernels
def test_the_panels_choice_is_measured_once_and_only_for_fp32(monkeypatch):
    import edgeshard_mpi.fewrows as fewrows

    monkeypatch.setattr(fewrows, "_paneling", {})
    first = fewrows.paneled(torch.float32, 4)
    assert fewrows._paneling == {(torch.float32, torch.get_num_threads(), 4): first}
    monkeypatch.setattr(fewrows, "_best", lambda fn: pytest.fail("measured again"))
    assert fewrows.paneled(torch.float32, 4) is first and not fewrows.paneled(torch.bfloat16, 4)


def test_only_the_chosen_row_counts_take_the_transposed_form(monkeypatch):
    calls = []
    import edgeshard_mpi.fewrows as fewrows

    real = fewrows._transposed
    monkeypatch.setattr(fewrows, "_transposed", lambda x2, w: calls.append(x2.shape[0]) or real(x2, w))
    layer = FewRowsLinear.of(nn.Linear(8, 4), frozenset({1, 3}))
    for rows in (1, 2, 3, 4):
        layer(torch.randn(rows, 1, 8))
    assert calls == [1, 3]


def test_swap_reaches_every_plain_linear_and_nothing_else():
    class Scaled(nn.Linear):  # a family's own subclass does more than a product: left alone
        pass

    model = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 4), Scaled(4, 4)), nn.LayerNorm(4))
    weights = [m.weight for m in model.modules() if isinstance(m, nn.Linear)]
    swapped = swap_linears(model, frozenset({1}))
    kinds = [type(m) for m in swapped.modules() if isinstance(m, nn.Linear)]
    assert kinds == [FewRowsLinear, FewRowsLinear, Scaled]
    assert [m.weight for m in swapped.modules() if isinstance(m, nn.Linear)] == weights
    assert type(swap_linears(nn.Linear(2, 2), frozenset({1}))) is FewRowsLinear
    alone = nn.Linear(2, 2)
    assert swap_linears(alone, frozenset()) is alone  # no row count faster: nothing swapped


def test_the_choice_is_measured_once_and_within_the_bounds():
    first = transposed_rows(torch.float32)
    assert first <= EVERY and transposed_rows(torch.float32) is first


def test_a_large_models_shard_swaps_and_keeps_the_models_logits(smollm_path, monkeypatch):
    # whatever this CPU chose: one shard as if every row count ran faster transposed, one as if none did
    import edgeshard_mpi.fewrows as fewrows
    from edgeshard_mpi.fewrows import SWAP_BYTES
    from edgeshard_mpi.models import ModelSpec
    from edgeshard_mpi.shard import Shard

    spec = ModelSpec.load(smollm_path, "float32")
    assert spec.bytes_of(0, spec.num_units - 1) >= SWAP_BYTES
    threads = torch.get_num_threads()
    blocks, head = (torch.float32, threads, fewrows._PROBE), (torch.float32, threads, fewrows.head_shape(spec))

    for rows in (1, 3):  # the forms below, whatever this CPU measured; a shard on panels is added after
        monkeypatch.setitem(fewrows._paneling, (torch.float32, threads, rows), False)

    def shard(block_rows, head_rows):
        monkeypatch.setitem(fewrows._chosen, blocks, block_rows)
        monkeypatch.setitem(fewrows._chosen, head, head_rows)
        return Shard(spec, 0, spec.num_units - 1)

    turned, plain = shard(EVERY, EVERY), shard(frozenset(), frozenset())
    mixed = shard(frozenset(), EVERY)  # the head measured on its own matrix: its forms are its own
    shards = [turned, plain, mixed]
    linears = lambda s: [m for layer in [s.lm_head, *s.layers] for m in layer.modules() if isinstance(m, nn.Linear)]
    assert turned.turned == EVERY and {type(m) for m in linears(turned)} == {FewRowsLinear}
    assert plain.turned == frozenset() and {type(m) for m in linears(plain)} == {nn.Linear}
    assert type(mixed.lm_head) is FewRowsLinear and mixed.lm_head.turned == EVERY == mixed.head_turned
    assert {type(m) for m in linears(mixed)[1:]} == {nn.Linear}
    assert turned.lm_head.weight is turned.embed.weight  # the tied head still reads the embedding
    if torch.backends.mkldnn.is_available():  # and one whose micro-batches of 3 rows reorder their weights
        monkeypatch.setitem(fewrows._packing, (torch.float32, torch.get_num_threads(), 3), True)
        packed = Shard(spec, 0, spec.num_units - 1, rows=3)
        blocks = [m for layer in packed.layers for m in layer.modules() if isinstance(m, nn.Linear)]
        assert packed.packed and all(m.packed is not None and m.weight is None for m in blocks)
        assert packed.lm_head.weight is packed.embed.weight  # the tied head: no second copy
        # reordered matrices never take the transposed form; the tied head, kept plain, takes its own rows
        assert packed.turned == frozenset() and packed.head_turned == EVERY == packed.lm_head.turned
        assert packed.param_bytes == plain.param_bytes  # the reordered copies counted, the plain ones gone
        shards.append(packed)
    if cpu_kernels.available() is None:  # and one holding its matrices as fp32 panels
        monkeypatch.setitem(fewrows._paneling, (torch.float32, threads, 3), True)
        # nothing on panels takes the transposed form, so no probe of it runs (seconds a rank)
        monkeypatch.setattr(fewrows, "transposed_rows", lambda *a: pytest.fail("a shard on panels probed"))
        paneled = Shard(spec, 0, spec.num_units - 1, rows=3)
        assert paneled.turned == frozenset() == paneled.head_turned
        blocks = [m for layer in paneled.layers for m in layer.modules() if isinstance(m, nn.Linear)]
        assert paneled.paneled and not paneled.packed
        assert all(m.panels is not None and m.panels.dtype == torch.float32 and m.weight is None for m in blocks)
        # the tied head on panels too, which the embedding reads: no second copy
        assert paneled.lm_head.weight is None and paneled.embed.panels is paneled.lm_head.panels
        assert paneled.param_bytes == plain.param_bytes
        shards.append(paneled)
    ids = torch.tensor([[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12], [13, 14, 15, 16, 17, 18]])
    for s in shards:
        s.forward(0, ids, [0, 0, 0])
    for step in range(3):  # decode steps of 3 rows, then of one
        x = torch.tensor([[20 + step], [30 + step], [40 + step]])
        want = plain.forward(0, x)
        for s in shards[:1] + shards[2:]:
            torch.testing.assert_close(s.forward(0, x), want, rtol=1e-4, atol=1e-4)
    for s in shards:
        s.select(0, [1])
    want = plain.forward(0, torch.tensor([[50]]))
    for s in shards[:1] + shards[2:]:
        torch.testing.assert_close(s.forward(0, torch.tensor([[50]])), want, rtol=1e-4, atol=1e-4)


def test_under_compile_one_row_turns_and_other_counts_share_one_graph():
    """A compiled graph serves one row alone and any other count of rows as a symbol: the transposed
    form (a bmm) at one row, `linear` for the rest, the same values, and no graph per row count (a
    test of the symbol against `turned` would specialize the graph to each count)."""
    torch.manual_seed(0)
    layer = FewRowsLinear.of(nn.Linear(64, 32, bias=False), EVERY)
    graphs = []

    def keep(gm, example_inputs):  # a backend that records each graph dynamo hands it and runs it as is
        graphs.append({str(n.target) for n in gm.graph.nodes if n.op == "call_function"})
        return gm.forward

    torch._dynamo.reset()
    step = torch.compile(lambda x: layer(x) * 2, backend=keep, dynamic=None)
    for rows in (1, 2, 3, 5, 1, 4):
        x = torch.randn(rows, 1, 64)
        torch._dynamo.maybe_mark_dynamic(x, 0)
        torch.testing.assert_close(step(x), 2 * nn.functional.linear(x, layer.weight), rtol=1e-5, atol=1e-5)
    assert len(graphs) == 2, "one graph for one row, one for every other count"
    one, rest = (" ".join(g) for g in graphs)
    assert "bmm" in one and "linear" not in one, one
    assert "linear" in rest and "bmm" not in rest, rest


class _RankZeroOfOne:
    """The one rank of a world of one: a broadcast hands back what it was given, a gather a list of it."""

    rank, size = 0, 1

    def bcast(self, obj):
        return obj

    def gather(self, obj):
        return [obj]


def test_a_run_takes_the_product_forms_its_profile_recorded(smollm_path, monkeypatch):
    """A choice made within its 10% margin may come out otherwise when measured again minutes later:
    a run on a profile computes in the forms that profile timed, without measuring them."""
    from types import SimpleNamespace

    import edgeshard_mpi.fewrows as fewrows
    from edgeshard_mpi.cluster import Cluster
    from edgeshard_mpi.models import ModelSpec
    from edgeshard_mpi.runner import _adopt_forms

    spec, cpu, cluster = ModelSpec.load(smollm_path, "float32"), torch.device("cpu"), Cluster.local(1)
    monkeypatch.setattr(fewrows, "_chosen", {})
    monkeypatch.setattr(fewrows, "_packing", {})

    def measured(*args, **kwargs):
        raise AssertionError("measured again")

    monkeypatch.setattr(fewrows, "_best", measured)
    name = cluster.devices[0].name
    monkeypatch.setattr(fewrows, "_paneling", {})
    for turned, head, packed, panels in (([1, 3], [1, 2, 3], True, False), ([2], [], False, False),
                                         ([], [1], False, True)):
        products = {"turned": turned, "head": head, "packed": packed, "panels": panels}
        prof = SimpleNamespace(devices=[{"name": name, "products": products}], shapes={"micro_batch_size": 8})
        _adopt_forms(_RankZeroOfOne(), spec, cluster, SimpleNamespace(profile=prof))
        assert rows_for(spec, cpu, torch.float32) == frozenset(turned)
        assert rows_for(spec, cpu, torch.float32, head=True) == frozenset(head)
        assert packs_for(spec, cpu, torch.float32, rows=8) == packed
        assert fewrows.panels_for(spec, cpu, torch.float32, rows=8) == panels
    # one from before the head's forms were recorded: the head's are measured, the others taken
    monkeypatch.setattr(fewrows, "_chosen", {})
    blocks_only = {"turned": [2], "packed": False}
    prof = SimpleNamespace(devices=[{"name": name, "products": blocks_only}], shapes={"micro_batch_size": 8})
    _adopt_forms(_RankZeroOfOne(), spec, cluster, SimpleNamespace(profile=prof))
    assert rows_for(spec, cpu, torch.float32) == frozenset([2])
    with pytest.raises(AssertionError, match="measured again"):
        rows_for(spec, cpu, torch.float32, head=True)
    # a profile from before the forms were recorded: the shard measures its own
    old = SimpleNamespace(devices=[{"name": name}], shapes={"micro_batch_size": 4})
    _adopt_forms(_RankZeroOfOne(), spec, cluster, SimpleNamespace(profile=old))
    with pytest.raises(AssertionError, match="measured again"):
        packs_for(spec, cpu, torch.float32, rows=4)


@needs_kernels
def test_a_fresh_process_adopting_a_profiles_panels_loads_their_kernel(smollm_path):
    """A run on a saved profile takes its panels without probing them, so in a process of its own
    nothing else loads the kernel: adopting them must (it once failed at the first step with
    "'edgeshard' object has no attribute 'f32_panels_mm'")."""
    code = f"""
import torch
from edgeshard_mpi import fewrows
from edgeshard_mpi.models import ModelSpec
from edgeshard_mpi.shard import Shard
spec = ModelSpec.load({str(smollm_path)!r}, "float32")
fewrows.adopt(torch.float32, 2, [], False, [], fewrows.head_shape(spec), True)
shard = Shard(spec, 0, spec.num_units - 1, rows=2)
assert shard.paneled
print(shard.forward(0, torch.tensor([[1, 2, 3], [4, 5, 6]]), [0, 0]).argmax(-1).tolist())
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(eval(done.stdout.strip().splitlines()[-1])) == 2


def test_a_profile_times_no_transposed_rows_that_its_held_matrices_never_take(smollm_path, monkeypatch):
    """A profile records the forms its device takes (`forms`). Matrices held on panels or reordered
    never take the transposed form, so its row counts are not timed (seconds a rank) but recorded as
    None, which a run then leaves to any shard that does need them; smollm2's head, tied to a plain
    embedding, is held as panels beside it, but keeps the embedding's matrix beside reordered ones."""
    import edgeshard_mpi.fewrows as fewrows
    from edgeshard_mpi.models import ModelSpec

    spec, cpu, threads = ModelSpec.load(smollm_path, "float32"), torch.device("cpu"), torch.get_num_threads()
    probes = []
    monkeypatch.setattr(fewrows, "transposed_rows", lambda dtype, shape=fewrows._PROBE: probes.append(shape) or {1})
    monkeypatch.setitem(fewrows._paneling, (torch.float32, threads, 3), True)
    on_panels = fewrows.forms(spec, cpu, torch.float32, 3)
    assert on_panels["panels"] and on_panels["turned"] is None is on_panels["head"] and probes == []
    monkeypatch.setitem(fewrows._paneling, (torch.float32, threads, 4), False)
    monkeypatch.setitem(fewrows._packing, (torch.float32, threads, 4), True)
    reordered = fewrows.forms(spec, cpu, torch.float32, 4)
    assert reordered["packed"] and reordered["turned"] is None and reordered["head"] == [1]
    assert probes == [fewrows.head_shape(spec)]
    one_row = fewrows.forms(spec, cpu, torch.float32, 1)  # nothing held at one row: both measured
    assert not one_row["panels"] and one_row["turned"] == [1] == one_row["head"]
    monkeypatch.setattr(fewrows, "_chosen", {})
    fewrows.adopt(torch.float32, 3, None, False, None, fewrows.head_shape(spec), True)
    assert fewrows._chosen == {}  # and the panels taken where their kernel loads here
    assert fewrows.panels_for(spec, cpu, torch.float32, rows=3) == (cpu_kernels.available() is None)


def test_a_bf16_run_widens_only_where_its_profile_timed_the_widened_form(tiny_path, monkeypatch, capsys):
    """A profile records whether its bf16 products were widened; one timed on torch's own (the kernel
    not built then) keeps a run where the kernel is built now from widening, so that the run computes
    the step its plan was timed on, and rank 0 says how to plan on the faster form."""
    from types import SimpleNamespace

    import edgeshard_mpi.fewrows as fewrows
    from edgeshard_mpi.cluster import Cluster
    from edgeshard_mpi.models import ModelSpec
    from edgeshard_mpi.runner import _adopt_forms
    from edgeshard_mpi.shard import Shard

    spec, cluster = ModelSpec.load(tiny_path, "bfloat16"), Cluster.local(1)
    cpu, bf16 = torch.device("cpu"), torch.bfloat16
    for name in ("_chosen", "_packing", "_widening"):
        monkeypatch.setattr(fewrows, name, {})
    monkeypatch.setattr(fewrows, "bf16_instructions", lambda: False)
    monkeypatch.setattr(cpu_kernels, "available", lambda: None)
    assert fewrows.forms(spec, cpu, bf16, 4)["widened"]
    assert not fewrows.forms(ModelSpec.load(tiny_path, "float32"), cpu, torch.float32, 4)["widened"]

    def run_on(widened):
        products = {"turned": [], "head": [], "packed": False, "widened": widened}
        prof = SimpleNamespace(devices=[{"name": cluster.devices[0].name, "products": products}],
                               shapes={"micro_batch_size": 4})
        _adopt_forms(_RankZeroOfOne(), spec, cluster, SimpleNamespace(profile=prof))
        return Shard(spec, 0, spec.num_units - 1).widened, capsys.readouterr().err

    widened, err = run_on(False)
    assert not widened and not widens(cpu, bf16) and fewrows.can_widen(cpu, bf16)
    assert f"torch's products on {cluster.devices[0].name}" in err and "edgeshard profile" in err
    assert run_on(True) == (True, "")
    assert run_on(None) == (True, "")  # a profile from before it was recorded: this process decides
    run_on(False)
    _adopt_forms(_RankZeroOfOne(), spec, cluster, SimpleNamespace(profile=None, shapes=None))  # no profile
    assert widens(cpu, bf16)  # a launch's next job, on no profile, is not held to the last one's
    monkeypatch.setattr(cpu_kernels, "available", lambda: "no compiler")
    assert run_on(True) == (False, "")  # cannot widen here, whatever the profile timed: nothing to keep from
