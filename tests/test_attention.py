"""attention.py: a decode step's query heads packed onto their key heads, where that measures faster."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from edgeshard_mpi import attention, cpu_kernels, fewrows
from edgeshard_mpi.attention import SDPA_FP32, SDPA_PACKED
from edgeshard_mpi.models import ModelSpec
from edgeshard_mpi.shard import Shard
from test_fewrows import _RankZeroOfOne


def _shards(path, dtype: str, monkeypatch) -> tuple[Shard, Shard]:
    """Two shards of the whole model, one taking the packed form and one transformers' sdpa."""
    spec = ModelSpec.load(path, dtype)
    monkeypatch.setattr(fewrows, "bf16_instructions", lambda: True)  # bf16 in torch's own products, not widened
    monkeypatch.setattr(fewrows, "widened_faster", lambda rows: False)
    monkeypatch.setattr(fewrows, "SWAP_BYTES", 0)  # tiny-random takes the forms a large model does
    shards = []
    for packed in (True, False):
        monkeypatch.setattr(attention, "packs_queries", lambda dtype, rows, packed=packed: packed)
        shards.append(Shard(spec, 0, spec.num_units - 1, rows=3))
    return shards[0], shards[1]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_packed_attention_gives_sdpas_logits(tiny_path, dtype, monkeypatch):
    """Rows of one length decode without a mask: the packed form computes each query head against its
    own group's keys, as sdpa does, and hands its heads back in sdpa's order. Padded rows have a mask,
    which the packed form leaves to sdpa, bit for bit."""
    packed, plain = _shards(tiny_path, dtype, monkeypatch)
    assert {layer.self_attn.config._attn_implementation for layer in packed.layers} == {SDPA_PACKED}
    assert {layer.self_attn.config._attn_implementation for layer in plain.layers} == {"sdpa"}
    groups = packed.layers[0].self_attn.num_key_value_groups
    assert groups > 1  # tiny-random has grouped query heads: 4 on 2 key heads
    shapes = []
    sdpa = nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(nn.functional, "scaled_dot_product_attention",
                        lambda q, *a, **k: shapes.append(tuple(q.shape)) or sdpa(q, *a, **k))
    ids = torch.randint(5, 1000, (3, 9), generator=torch.Generator().manual_seed(0))
    for pads in (None, [0, 2, 0]):
        for slot in (packed, plain):
            slot.slots.clear()
        steps = [(ids, pads or [0, 0, 0])] + [(torch.tensor([[20 + i], [30 + i], [40 + i]]), None) for i in range(4)]
        for x, pad in steps:
            shapes.clear()
            a = packed.forward(0, x, pad, 16) if pad else packed.forward(0, x)
            taken = set(shapes)
            shapes.clear()
            b = plain.forward(0, x, pad, 16) if pad else plain.forward(0, x)
            if pads is None and x.shape[1] == 1:  # a decode step without a mask: sdpa's 4 heads of one query
                assert set(shapes) == {(3, 4, 1, 16)}, shapes
                assert taken == {(3, 4 // groups, groups, 16)}, taken  # packed: 2 key heads of 2 queries
                if dtype == "float32":
                    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
                else:  # bf16 rounds each layer's output: a rounding may tip the other way
                    torch.testing.assert_close(a.float(), b.float(), rtol=0, atol=0.04 * b.float().abs().max().item())
            else:  # a prefill, or a mask: sdpa's own, the same call
                assert taken == set(shapes) and torch.equal(a, b)


def test_attention_is_packed_only_on_a_cpu_eager_where_it_measures_faster(smollm_path, tiny_path, monkeypatch):
    cpu, bf16 = torch.device("cpu"), torch.bfloat16
    smol, tiny = ModelSpec.load(smollm_path, "bfloat16"), ModelSpec.load(tiny_path, "bfloat16")
    smol8 = ModelSpec.load(smollm_path, "bfloat16", quantize="int8")
    monkeypatch.setattr(fewrows, "bf16_instructions", lambda: True)  # bf16 not widened
    monkeypatch.setattr(fewrows, "widened_faster", lambda rows: False)
    monkeypatch.setattr(attention, "packs_queries", lambda dtype, rows: True)
    assert attention.form(smol, cpu, bf16, rows=16) == SDPA_PACKED
    assert attention.form(smol8, cpu, bf16, rows=16) == SDPA_PACKED  # int8 shards attend in their dtype
    assert attention.form(smol, cpu, bf16, compile=True, rows=16) == "sdpa"  # a compiled step's is inductor's
    assert attention.form(smol, torch.device("cuda"), bf16, rows=16) == "sdpa"
    assert attention.form(tiny, cpu, bf16, rows=16) == "sdpa"  # a small model keeps sdpa's, as generate has it
    monkeypatch.setattr(attention, "packs_queries", lambda dtype, rows: False)
    assert attention.form(smol, cpu, bf16, rows=16) == "sdpa"
    # widened bf16 (a CPU without bf16 instructions) attends on fp32 copies, compiled or not, whatever its size
    monkeypatch.setattr(fewrows, "bf16_instructions", lambda: False)
    monkeypatch.setattr(cpu_kernels, "available", lambda: None)
    assert attention.form(smol, cpu, bf16, rows=16) == attention.form(smol, cpu, bf16, compile=True) == SDPA_FP32
    assert attention.form(tiny, cpu, bf16, rows=16) == SDPA_FP32
    assert attention.form(ModelSpec.load(smollm_path, "float32"), cpu, torch.float32, rows=16) == "sdpa"


def _timed(*times, out=None):
    """A stand-in for fewrows._best: runs each form once (its result to `out`) and says it took `times` in turn."""
    it = iter(times)
    return lambda fn: (out.append(fn()) if out is not None else fn(), next(it))[1]


def test_packs_queries_measures_once_per_dtype_threads_and_rows(monkeypatch):
    monkeypatch.setattr(attention, "_packing", {})
    outs = []
    monkeypatch.setattr(attention, "_best", _timed(1.0, 0.5, out=outs))
    assert attention.packs_queries(torch.float32, 2)  # the packed form at half the time
    assert attention.packs_queries(torch.float32, 2) and len(outs) == 2  # measured once
    own, packed = outs  # the probe's two forms give the same values, heads in the same order
    torch.testing.assert_close(packed.reshape(own.shape), own, rtol=1e-5, atol=1e-6)
    monkeypatch.setattr(attention, "_best", _timed(1.0, 0.95))
    assert not attention.packs_queries(torch.float32, 3)  # 5% faster is within the noise: not taken


def test_a_run_takes_the_attention_its_profile_recorded(tiny_path, monkeypatch):
    """A profile records each device's attention; a run on it takes that form without measuring, so that
    it computes the step its plan was timed on. None (an older profile) leaves it to this process."""
    from edgeshard_mpi.cluster import Cluster
    from edgeshard_mpi.runner import _adopt_forms

    spec, cluster = ModelSpec.load(tiny_path, "bfloat16"), Cluster.local(1)
    monkeypatch.setattr(attention, "_packing", {})
    for name in ("_chosen", "_packing", "_widening"):  # what _adopt_forms adopts for the products, undone after
        monkeypatch.setattr(fewrows, name, {})
    monkeypatch.setattr(fewrows, "bf16_instructions", lambda: True)
    monkeypatch.setattr(fewrows, "SWAP_BYTES", 0)  # tiny-random takes the forms a large model does

    def run_on(recorded):
        products = {"turned": [], "head": [], "packed": False, "widened": False, "attention": recorded}
        prof = SimpleNamespace(devices=[{"name": cluster.devices[0].name, "products": products}],
                               shapes={"micro_batch_size": 4})
        _adopt_forms(_RankZeroOfOne(), spec, cluster, SimpleNamespace(profile=prof))
        return Shard(spec, 0, spec.num_units - 1, rows=4).attention_form

    def no_measuring(fn):
        raise AssertionError("measured, where the profile said")

    monkeypatch.setattr(attention, "_best", no_measuring)
    assert run_on(SDPA_PACKED) == SDPA_PACKED
    assert run_on("sdpa") == "sdpa"
    monkeypatch.setattr(attention, "_packing", {})
    monkeypatch.setattr(attention, "_best", _timed(1.0, 1.0))  # measures: both forms equally fast
    assert run_on(None) == "sdpa" and attention._packing
