"""Seeded random-weight models of every supported family, and a GGUF writer, for the tests.

Each family's config is small (6 layers, hidden 64) and exercises what sets it apart: Llama 3
rope_scaling with an untied head, Mistral's sliding window on every layer, Qwen2's sliding layers
from max_window_layers with q/k/v biases and a tied head, Qwen3's q/k norms and explicit head_dim,
Phi-3's fused projections, Gemma 2's soft-caps and alternating sliding layers, Gemma 3's local and
global RoPE. Windows are 16 tokens, so that a long prompt really slides. The tokenizer is SmolLM2's
real one, borrowed from the embedded GGUF, so that prompts and chat templates are real.
"""

from __future__ import annotations

import functools
from pathlib import Path

WINDOW = 16
BASE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=512, rms_norm_eps=1e-5, initializer_range=0.1)
FAMILY_CONFIGS = {
    "llama": dict(tie_word_embeddings=False, rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64)),
    "mistral": dict(sliding_window=WINDOW, tie_word_embeddings=False),
    "qwen2": dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=3, tie_word_embeddings=True),
    "qwen3": dict(head_dim=32, tie_word_embeddings=True),
    "phi3": dict(tie_word_embeddings=False),
    "gemma2": dict(sliding_window=WINDOW, head_dim=16, final_logit_softcapping=3.0, attn_logit_softcapping=5.0,
                   tie_word_embeddings=True, hidden_activation="gelu_pytorch_tanh"),
    "gemma3_text": dict(sliding_window=WINDOW, head_dim=16, final_logit_softcapping=3.0, tie_word_embeddings=True,
                        layer_types=["sliding_attention", "full_attention"] * 3),
}


def smollm2_gguf() -> Path:
    from edgeshard_mpi.models import _smollm2_gguf

    return _smollm2_gguf()


@functools.cache
def tokenizer():
    """SmolLM2's tokenizer, from the tiny-random preset's folder (reading it from the GGUF file takes seconds)."""
    from transformers import AutoTokenizer

    from edgeshard_mpi.models import prepare

    return AutoTokenizer.from_pretrained(prepare("tiny-random"))


def random_model(family: str, seed: int = 0):
    """(model, tokenizer): the family's ForCausalLM with seeded random weights."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    tok = tokenizer()
    config = CONFIG_MAPPING[family].from_dict({
        **BASE, **FAMILY_CONFIGS[family], "vocab_size": len(tok), "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id})
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval(), tok


def save_family(family: str, out: Path) -> Path:
    model, tok = random_model(family)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _llama_permute(w, n_head: int):
    """llama.cpp's convert_hf_to_gguf order of q/k rows, which transformers' GGUF reader undoes."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(model, arch: str, out: Path, quant: str = "F32") -> Path:
    """Write `model` (llama or qwen2) as a GGUF file, as llama.cpp's converter does, with SmolLM2's
    tokenizer; quant "Q8_0" stores the 2-D weights quantized."""
    import gguf
    import numpy as np

    c = model.config
    w = gguf.GGUFWriter(str(out), arch)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(float(c.rope_parameters["rope_theta"]))
    w.add_vocab_size(c.vocab_size)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if quant == "Q8_0" else gguf.LlamaFileType.ALL_F32)
    src = gguf.GGUFReader(str(smollm2_gguf()))
    for name, field in src.fields.items():
        if name.startswith("tokenizer."):
            vtype = field.types[0]
            if vtype == gguf.GGUFValueType.ARRAY:
                w.add_key_value(name, field.contents(), vtype, sub_type=field.types[-1])
            else:
                w.add_key_value(name, field.contents(), vtype)
    names = gguf.get_tensor_name_map({v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[arch], c.num_hidden_layers)
    state = model.state_dict()
    if c.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    for key, t in state.items():
        a = t.detach().float().numpy()
        if arch == "llama" and key.endswith("self_attn.q_proj.weight"):
            a = _llama_permute(a, c.num_attention_heads)
        elif arch == "llama" and key.endswith("self_attn.k_proj.weight"):
            a = _llama_permute(a, c.num_key_value_heads)
        gname = names.get_name(key, try_suffixes=(".weight", ".bias"))
        assert gname is not None, key
        if quant == "Q8_0" and a.ndim == 2:
            w.add_tensor(gname, gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0),
                         raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(gname, np.ascontiguousarray(a, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out
