"""GGUF files in: converted once into a safetensors model folder, which every rank then reads as any other.

    edgeshard model prepare ~/llms/qwen2.5-0.5b-instruct-q8_0.gguf     # converts, prints the folder
    model = "qwen2.5-0.5b-instruct-q8_0.gguf"                           # in a job: converted on first use

transformers' GGUF reader gives the config, the tokenizer and the weights, each quantized tensor
dequantized. The folder keeps them in fp32, which holds every dequantized value exactly, or in the
file's own 16-bit float type when nothing in it is quantized; a job then casts them to its dtype.
`source.json` in the folder records the file and its tensor types, for `edgeshard model info`.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
from pathlib import Path

__all__ = ["is_gguf", "gguf_tensor_types", "convert_gguf"]

_MAGIC = b"GGUF"
_FLOAT_TYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def is_gguf(name: str | Path) -> bool:
    return str(name).lower().endswith(".gguf")


def gguf_tensor_types(src: Path, error: type[Exception]) -> dict[str, int]:
    """How many tensors of each GGML type the file holds ("Q4_1": 120, "F32": 61); reads the header only."""
    with open(src, "rb") as f:
        head = f.read(4)
    if head != _MAGIC:
        raise error(f"{src}: not a GGUF file (it starts with {head!r}, not {_MAGIC!r})")
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(src))
        return dict(collections.Counter(t.tensor_type.name for t in reader.tensors))
    except Exception as e:  # a truncated or damaged file: numpy and gguf raise many kinds
        raise error(f"{src}: not a readable GGUF file, truncated or damaged ({type(e).__name__}: {e})") from None


def _save_dtype(types: dict[str, int]) -> str:
    """fp32 if anything is quantized (dequantized values are exact in it), else the file's 16-bit type
    if it has one (an F16 file keeps its norms in F32, and doubling its matrices for them would not pay)."""
    if any(t not in _FLOAT_TYPES for t in types):
        return "float32"
    return next((_FLOAT_TYPES[t] for t in ("BF16", "F16") if t in types), "float32")


@contextlib.contextmanager
def _one_parse():
    """transformers parses the file anew for the config, the tokenizer and the weights, and each parse
    walks the vocabulary field by field in Python (6 s for SmolLM2's 49,152 tokens here): within this
    block every reader of one file is the first one. gguf's readers only read, so sharing one is safe."""
    import gguf

    made, readers = gguf.GGUFReader, {}

    def reader(path, mode="r"):
        key = (os.path.realpath(path), mode)
        if key not in readers:
            readers[key] = made(path, mode)
        return readers[key]

    gguf.GGUFReader = reader  # transformers imports it from gguf at each call
    try:
        yield
    finally:
        gguf.GGUFReader = made


def convert_gguf(src: Path, out: Path, supported: tuple[str, ...], error: type[Exception]) -> None:
    """Write the GGUF file `src` into the empty folder `out`: config, generation config, tokenizer,
    model.safetensors and source.json. A family outside `supported` is refused before any weight is read."""
    with _one_parse():
        _convert(src, out, supported, error)


def _convert(src: Path, out: Path, supported: tuple[str, ...], error: type[Exception]) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    types = gguf_tensor_types(src, error)
    where = dict(pretrained_model_name_or_path=str(src.parent), gguf_file=src.name)
    try:
        config = AutoConfig.from_pretrained(**where)
    except Exception as e:
        raise error(f"{src}: transformers cannot read a model config from it ({type(e).__name__}: {e})") from None
    if config.model_type not in supported:
        raise error(f"{src}: model_type {config.model_type!r} is not supported (supported: {', '.join(supported)})")
    dtype = _save_dtype(types)
    try:
        tok = AutoTokenizer.from_pretrained(**where)
        model = AutoModelForCausalLM.from_pretrained(**where, config=config, dtype=getattr(torch, dtype))
    except Exception as e:
        raise error(f"{src}: transformers cannot load it ({type(e).__name__}: {e})") from None
    # save_pretrained refuses a model loaded from GGUF, so write the plain pieces ourselves.
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # tied: the head reads the embedding matrix
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the saved weights are plain floats, not GGUF blocks
    config.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    tok.save_pretrained(out)
    st = src.stat()
    (out / "source.json").write_text(json.dumps(
        {"gguf": str(src), "size": st.st_size, "tensor_types": types, "saved_dtype": dtype}, indent=1) + "\n")
