"""Weight-only int8: each output channel (a matrix row) scaled to [-127, 127], quantized once at load.

As gpt-fast's `WeightOnlyInt8QuantHandler`: the matrices of every `nn.Linear` (projections, MLP, LM
head) and a plain `nn.Embedding` are stored as int8 with one scale per row; norms, biases and a
family's own embedding subclass (Gemma's scaled one) stay in the job's dtype. A decode step reads a
quarter of fp32's bytes. On a CPU a decode step's few rows take this project's AVX2 kernel
(`cpu_kernels`: int8 weights against int16 activations, about twice aten's speed at one row, see
BENCHMARKS.md), and a prefill's many rows, or a CPU without it, `aten._weight_int8pack_mm` (bf16
activations); elsewhere, gpt-fast's `linear(x, w.to(x.dtype)) * scales`.
"""

from __future__ import annotations

import torch
from torch import nn

from . import cpu_kernels

__all__ = ["SCALE_BYTES", "Int8Embedding", "Int8Linear", "int8_bytes", "int8_keys", "int8_shell", "quantizable",
           "quantize_rows"]

SCALE_DTYPE = torch.bfloat16  # what _weight_int8pack_mm takes on a CPU, and cpu_kernels.int8_mm too
SCALE_BYTES = 2


def quantizable(module: nn.Module) -> bool:
    """Whether `module`'s weight is stored int8: exactly a Linear or an Embedding, not a subclass that
    does more with its weight than a lookup or a matmul."""
    return type(module) in (nn.Linear, nn.Embedding)


def int8_keys(model: nn.Module) -> set[str]:
    """The state-dict keys of `model` (a meta skeleton will do) stored int8: its quantizable modules' weights."""
    return {f"{name}.weight" for name, m in model.named_modules() if quantizable(m)}


def int8_bytes(shape: list[int]) -> int:
    """Bytes of a (rows, cols) matrix stored int8, with its per-row scales."""
    rows, cols = shape
    return rows * cols + rows * SCALE_BYTES


def quantize_rows(w: torch.Tensor, rows: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 matrix, per-row scales) with w ~= q * scales[:, None]; symmetric, so zero stays exact.
    `rows` at a time, so that the fp32 temporaries stay small beside a large embedding."""
    q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    scales = torch.empty(w.shape[0], dtype=SCALE_DTYPE, device=w.device)
    for i in range(0, w.shape[0], rows):
        part = w[i:i + rows].float()
        s = (part.abs().amax(dim=1) / 127).clamp(min=1e-12).to(SCALE_DTYPE)
        q[i:i + rows] = torch.round(part / s.float()[:, None]).clamp(-127, 127)
        scales[i:i + rows] = s
    return q, scales


class Int8Linear(nn.Module):
    """`nn.Linear` with an int8 weight and per-output-channel scales; output in the input's dtype."""

    def __init__(self, in_features: int, out_features: int, bias: bool, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(out_features, dtype=SCALE_DTYPE, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu":
            x2 = x.reshape(-1, x.shape[-1])
            if x2.shape[0] <= cpu_kernels.MAX_ROWS and cpu_kernels.available() is None:
                y = cpu_kernels.int8_mm(x2.float().contiguous(), self.weight, self.scales)
            else:
                y = torch.ops.aten._weight_int8pack_mm(x2.to(SCALE_DTYPE), self.weight, self.scales)
            y = y.reshape(*x.shape[:-1], -1).to(x.dtype)
        else:
            y = nn.functional.linear(x, self.weight.to(x.dtype)) * self.scales.to(x.dtype)
        return y if self.bias is None else y + self.bias


class Int8Embedding(nn.Module):
    """`nn.Embedding` with int8 rows and per-row scales: a lookup, then the row times its scale."""

    def __init__(self, num_embeddings: int, embedding_dim: int, dtype, device=None):
        super().__init__()
        self.dtype = dtype
        self.register_buffer("weight", torch.empty(num_embeddings, embedding_dim, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(num_embeddings, dtype=SCALE_DTYPE, device=device))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.weight[ids].to(self.dtype) * self.scales[ids, None].to(self.dtype)


def int8_shell(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """`module` with every quantizable module in it (itself included) swapped for an empty int8 one
    on the meta device, to be given its tensors with `load_state_dict(assign=True)`."""
    def swap(m: nn.Module) -> nn.Module:
        if type(m) is nn.Linear:
            return Int8Linear(m.in_features, m.out_features, m.bias is not None, "meta", dtype)
        return Int8Embedding(m.num_embeddings, m.embedding_dim, dtype, "meta")

    if quantizable(module):
        return swap(module)
    for name, child in list(module.named_modules()):
        if name and quantizable(child):
            parent, _, leaf = name.rpartition(".")
            setattr(module.get_submodule(parent) if parent else module, leaf, swap(child))
    return module
