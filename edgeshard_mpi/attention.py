"""A shard's attention in the form this CPU runs fastest.

transformers' sdpa attention hands torch a decode step (one query a row) of a model with grouped
query heads in one of two forms. Without a mask (rows of one length) it asks for `enable_gqa`: each
query head against its group's keys and values. With a mask (left-padded rows) it packs them
(`pack_gqa`): a key head's group of query heads becomes the query positions of that one head, so each
key and value is read once for the group. On the 2-core AMD EPYC with AVX512-BF16 (no AMX), torch's
bf16 kernel runs the first form at a fraction of the second's speed. Per layer at 16 rows it took
0.87 ms over 80 cached tokens, against 0.13 packed, and 4.4 ms over 512 tokens, against 0.70. A
smollm2 step of 16 rows of one length then took 60 ms, against 44 for the same rows padded. In fp32
the first form was the faster there, 0.10 ms against 0.20.

So on a CPU, eager, a shard of a model of at least fewrows.SWAP_BYTES takes the packed form without
a mask too (`SDPA_PACKED`) where it measures faster: once per process, dtype, thread count and row
count (`packs_queries`). A smaller model keeps sdpa's form, and so `generate`'s bf16 roundings, as it
keeps the products' plain forms. The two forms compute the same sums over the same keys. A profile
records the choice, and a run on that profile takes it (`adopt`), as it takes the products' forms
(fewrows.adopt). A compiled step's attention is inductor's.

A shard whose bf16 products are widened to fp32 (fewrows.widens) runs its attention on fp32 copies of
its tensors, cast back after (`SDPA_FP32`). torch's bf16 attention on a CPU without bf16 instructions,
on its causal path (rows without padding, so without a mask), took 1.1 ms a layer at 16 rows,
against 0.3 ms in fp32; with a mask it took as long as fp32.

Each form is a name in transformers' registry of attention functions, set on the config of each of a
shard's own attention modules (`take`). Their masks stay sdpa's.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from .fewrows import _best, is_large, widens

__all__ = ["SDPA_FP32", "SDPA_PACKED", "adopt", "form", "packs_queries", "take"]

SDPA_FP32 = "edgeshard_sdpa_fp32"  # attention on fp32 copies, by name, as transformers looks it up
SDPA_PACKED = "edgeshard_sdpa_packed"  # a decode step's query heads packed onto their key heads
_PROBE = (9, 3, 64, 256)  # query heads, key heads, head size, cached tokens: smollm2's heads mid-context
_packing: dict[tuple, bool] = {}


def _sdpa_in_fp32(sdpa, module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' sdpa attention (`sdpa`, bound once at registration) on fp32 copies of its tensors,
    the output cast back to the query's dtype."""
    wide = lambda t: t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t
    if "position_bias" in kwargs:
        kwargs["position_bias"] = wide(kwargs["position_bias"])
    out, weights = sdpa(module, wide(query), wide(key), wide(value), wide(attention_mask), **kwargs)
    return out.to(query.dtype), weights


def _sdpa_packed(sdpa, module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: torch.Tensor | None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' sdpa attention (`sdpa`), with a decode step's grouped query heads packed onto their
    key heads as its masked path packs them, also where there is no mask. Anything else it is handed
    (a prefill, a mask, a position bias) is sdpa's own."""
    groups = getattr(module, "num_key_value_groups", 1)
    if (groups == 1 or query.shape[2] != 1 or attention_mask is not None or kwargs.get("position_bias") is not None
            or kwargs.get("softcap") is not None or kwargs.get("dropout") or torch.compiler.is_compiling()):
        return sdpa(module, query, key, value, attention_mask, **kwargs)
    rows, heads, _, dim = query.shape
    out = nn.functional.scaled_dot_product_attention(query.reshape(rows, heads // groups, groups, dim), key, value,
                                                     scale=kwargs.get("scaling"))
    return out.reshape(rows, heads, 1, value.shape[-1]).transpose(1, 2).contiguous(), None


_FORMS = {SDPA_FP32: _sdpa_in_fp32, SDPA_PACKED: _sdpa_packed}


def packs_queries(dtype: torch.dtype, rows: int) -> bool:
    """Whether a decode step's attention at `rows` rows without a mask runs faster with its query heads
    packed (`_sdpa_packed`) than with `enable_gqa` here, at this process's thread count: torch's sdpa on
    a probe of _PROBE's shape, each form's best of five, the packed one taken only when at least 10%
    faster. Its queries are a transposed view, and its keys and values views of a longer buffer, as a
    step's are (kv_cache.py)."""
    key = (dtype, torch.get_num_threads(), rows)
    if key not in _packing:
        heads, kv_heads, dim, tokens = _PROBE
        gen = torch.Generator().manual_seed(0)
        query = torch.randn(rows, 1, heads, dim, generator=gen).to(dtype).transpose(1, 2)
        k, v = (torch.randn(rows, kv_heads, 2 * tokens, dim, generator=gen).to(dtype)[:, :, :tokens] for _ in "kv")
        sdpa = nn.functional.scaled_dot_product_attention
        own = _best(lambda: sdpa(query, k, v, enable_gqa=True))
        packed = _best(lambda: sdpa(query.reshape(rows, kv_heads, heads // kv_heads, dim), k, v))
        _packing[key] = packed < 0.9 * own
    return _packing[key]


def form(spec, device: torch.device, dtype: torch.dtype, compile: bool = False, rows: int = 1) -> str:
    """The attention a shard of `spec` whose steps hold up to `rows` rows takes here, as a registered
    name: SDPA_FP32 where its products are widened (fewrows.widens); SDPA_PACKED on a CPU, eager, for a
    model of at least fewrows.SWAP_BYTES (a small one keeps sdpa's, as it keeps the products' plain
    forms), where `packs_queries` measures that faster; else "sdpa", transformers' own."""
    large = is_large(spec)
    if widens(device, dtype, spec.quantize, rows, large):
        return SDPA_FP32
    if device.type == "cpu" and not compile and large and packs_queries(dtype, rows):
        return SDPA_PACKED
    return "sdpa"


def adopt(dtype: torch.dtype, rows: int, recorded: str | None) -> None:
    """Take the attention a run's profile recorded (`form`) in place of measuring it again, as
    fewrows.adopt takes the products'. None (a profile from before it was recorded) and SDPA_FP32
    (which follows the widened form, fewrows.adopt_widened) leave it to this process."""
    if recorded in ("sdpa", SDPA_PACKED):
        _packing[(dtype, torch.get_num_threads(), rows)] = recorded == SDPA_PACKED


def take(module: nn.Module, name: str) -> None:
    """Attention in `module` that takes transformers' sdpa takes the registered form `name` instead. The
    name is set on the module's own config (a shard's modules are copies, each with its own)."""
    if name == "sdpa":
        return
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if name not in ALL_ATTENTION_FUNCTIONS:
        ALL_ATTENTION_FUNCTIONS.register(name, functools.partial(_FORMS[name], sdpa_attention_forward))
        ALL_MASK_ATTENTION_FUNCTIONS.register(name, sdpa_mask)
    for m in module.modules():
        config = getattr(m, "config", None)
        if getattr(config, "_attn_implementation", None) == "sdpa":
            config._attn_implementation = name
