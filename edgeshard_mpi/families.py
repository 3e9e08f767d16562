"""Model families: transformers' own classes, cut into units, and the few differences per family.

A model is built from its config with transformers' own `...ForCausalLM` class, its parameters on
the meta device (no memory, no initialisation) and its buffers real (rotary frequencies, Gemma's
embedding scale). From that skeleton come the units, their tensor names and shapes, and, on each
rank, the modules a shard keeps; the rest is dropped unread. Every family has the same layout:

    model.embed_tokens   the embedding (Gemma's scales itself)      unit "embed"
    model.layers[i]      decoder block i                            unit "block.i"
    model.norm, lm_head  final norm and LM head                     unit "head"
    model.rotary_emb     rotary tables, kept by every shard that holds a block

What `XModel.forward` and `XForCausalLM.forward` do around those modules is the per-family part,
and it is small: which layers slide and how far (transformers' `get_layer_types_and_kwargs`, the
rule its caches follow), a mask per layer type (transformers' own mask helpers), whether the
rotary tables differ per layer type, and a soft-cap on the final logits. `FAMILIES` holds it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    import torch

__all__ = ["Family", "FAMILIES", "SUPPORTED_MODEL_TYPES", "family_of", "hf_config", "build_skeleton",
           "unit_modules", "layer_types", "sliding_windows", "mask_builder"]


@dataclasses.dataclass(frozen=True)
class Family:
    """What a family's `forward` does that its modules do not; the defaults are Llama's."""

    rotary_by_layer_type: bool = False  # rotary_emb(h, pos, layer_type): local and global RoPE (Gemma 3)
    logit_softcap: Callable[[object], float | None] = lambda config: None  # tanh(logits / c) * c


def _final_softcap(config) -> float | None:
    return getattr(config, "final_logit_softcapping", None)


FAMILIES: dict[str, Family] = {
    "llama": Family(),  # Llama 2/3 (rope_scaling), SmolLM
    "mistral": Family(),  # sliding_window on every layer
    "qwen2": Family(),  # q/k/v biases; use_sliding_window + max_window_layers give layer_types
    "qwen3": Family(),  # q/k norms inside attention, explicit head_dim
    "phi3": Family(),  # fused qkv_proj and gate_up_proj: modules of its own
    "gemma2": Family(logit_softcap=_final_softcap),  # scaled embedding, pre/post norms: modules
    "gemma3_text": Family(rotary_by_layer_type=True, logit_softcap=_final_softcap),
}
SUPPORTED_MODEL_TYPES = tuple(FAMILIES)


def family_of(model_type: str) -> Family:
    return FAMILIES[model_type]


def hf_config(config: dict):
    """config.json's dict -> the family's transformers config object (validated by transformers)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    return CONFIG_MAPPING[config["model_type"]].from_dict(
        {k: v for k, v in config.items() if k not in ("architectures", "transformers_version", "dtype",
                                                       "torch_dtype", "auto_map")})


def build_skeleton(config: dict):
    """The family's `...ForCausalLM` for config.json's dict, parameters on the meta device, buffers
    real, attention as `from_pretrained` would pick it (so that numerics equal `generate`'s).

    Built once per process and config, and shared: a caller that fills modules with tensors takes
    copies of them (`copy.deepcopy` of a meta module costs no memory). The profiler builds a shard
    per unit, and a 30-layer skeleton takes 0.1 s."""
    return _skeleton(json.dumps(config, sort_keys=True))


@functools.lru_cache(maxsize=4)
def _skeleton(config_json: str):
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(hf_config(json.loads(config_json)))
    return model.eval()


def unit_modules(skeleton) -> tuple[str, str, str, str]:
    """Dotted names of the embedding, the decoder-layer list, the final norm and the LM head."""
    names = {id(m): n for n, m in skeleton.named_modules()}
    decoder = skeleton.get_decoder()
    return (names[id(skeleton.get_input_embeddings())], names[id(decoder.layers)], names[id(decoder.norm)],
            names[id(skeleton.get_output_embeddings())])


def layer_types(config) -> list[str]:
    """Attention type of every layer ("full_attention", "sliding_attention"), as the cache builds it."""
    from transformers.cache_utils import get_layer_types_and_kwargs

    return list(get_layer_types_and_kwargs(config)[0])


def sliding_windows(config) -> list[int | None]:
    """Per layer, the tokens its cache holds at most (None: all)."""
    from transformers.cache_utils import get_layer_types_and_kwargs

    return [kw.get("sliding_window") for kw in get_layer_types_and_kwargs(config)[1]]


def mask_builder(layer_type: str) -> Callable[..., "torch.Tensor | None"]:
    """transformers' mask helper for a layer type, as `XModel.forward` picks it."""
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    return {"full_attention": create_causal_mask, "sliding_attention": create_sliding_window_causal_mask}[layer_type]
