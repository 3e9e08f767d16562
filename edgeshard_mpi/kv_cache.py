"""A micro-batch slot's KV cache: one buffer per layer, allocated once, written in place.

transformers' `DynamicCache` concatenates every step, so each decode step copies the whole cache of
every layer. Here each layer of a slot gets buffers of `(rows, kv_heads, capacity, head_dim)` when the
slot's first step arrives, with `capacity` the slot's longest request (prompt + new tokens), and a
step writes its tokens in place. Attention is handed a view of exactly the tokens `DynamicCache` would
hand it (the same values, the same length), so the tokens stay equal to `generate`'s.

A sliding-window layer keeps, as `DynamicSlidingWindowLayer` does, the last `window - 1` tokens
and returns them followed by the new ones. Its buffer holds up to twice the window: the live tokens
move back to the front when the end is reached, one copy of `window - 1` tokens every `window` steps.

Rows that finish leave by index (`batch_select_indices`), once, not every step.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer, DynamicSlidingWindowLayer, get_layer_types_and_kwargs

__all__ = ["slot_cache"]


class _FullLayer(DynamicLayer):
    """Full attention: tokens `0..length` of the buffers are live."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity
        self.start = self.length = 0  # the live tokens are start..length (start moves in sliding layers)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        rows, heads, _, dim = key_states.shape
        self.k_buf = key_states.new_empty(rows, heads, self.capacity, dim)
        self.v_buf = value_states.new_empty(rows, heads, self.capacity, value_states.shape[-1])
        self.is_initialized = True

    def _move(self, capacity: int) -> None:
        """The live tokens to the front of buffers of `capacity` tokens (new ones if it changes)."""
        live = self.length - self.start
        if capacity != self.capacity:
            k, v = self.k_buf, self.v_buf
            self.capacity = capacity
            self.lazy_initialization(k[:, :, :0], v[:, :, :0])
            self.k_buf[:, :, :live].copy_(k[:, :, self.start:self.length])
            self.v_buf[:, :, :live].copy_(v[:, :, self.start:self.length])
        elif self.start:  # clone: the two ranges may overlap
            self.k_buf[:, :, :live].copy_(self.k_buf[:, :, self.start:self.length].clone())
            self.v_buf[:, :, :live].copy_(self.v_buf[:, :, self.start:self.length].clone())
        self.start, self.length = 0, live

    def _append(self, key_states: torch.Tensor, value_states: torch.Tensor):
        """Write the step's tokens after the live ones; return views of the live tokens and the new ones."""
        at, end = self.length, self.length + key_states.shape[-2]
        self.k_buf[:, :, at:end].copy_(key_states)
        self.v_buf[:, :, at:end].copy_(value_states)
        return self.k_buf[:, :, self.start:end], self.v_buf[:, :, self.start:end]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self.capacity:  # only when the caller gave no capacity (profiling, tests): grow by doubling
            self._move(max(end, 2 * self.capacity))
        self.keys, self.values = self._append(key_states, value_states)
        self.length = end
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self.k_buf, self.v_buf = self.k_buf[indices], self.v_buf[indices]
            self.keys, self.values = self.k_buf[:, :, :self.length], self.v_buf[:, :, :self.length]


class _WindowLayer(_FullLayer, DynamicSlidingWindowLayer):
    """Sliding window: tokens `start..length` of the buffers (at most `window - 1`) are live.

    `cumulative_length` (every token seen) drives the mask sizes, as in `DynamicSlidingWindowLayer`.
    """

    is_sliding = True

    def __init__(self, capacity: int, sliding_window: int):
        DynamicSlidingWindowLayer.__init__(self, sliding_window=sliding_window)
        self.capacity = min(capacity, 2 * sliding_window)
        self.start = self.length = 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        keep, T = self.sliding_window - 1, key_states.shape[-2]
        self.cumulative_length += T
        if self.length + T > self.capacity:
            need = self.length - self.start + T
            # grow up to twice the window; past that, move the live tokens back to the front
            self._move(max(self.capacity, min(max(need, 2 * self.capacity), 2 * self.sliding_window)))
            if need > self.capacity:  # a prompt longer than twice the window: attend over all of it, once
                k = torch.cat([self.k_buf[:, :, :self.length], key_states], dim=-2)
                v = torch.cat([self.v_buf[:, :, :self.length], value_states], dim=-2)
                self.length = min(keep, k.shape[-2])
                self.k_buf[:, :, :self.length].copy_(k[:, :, k.shape[-2] - self.length:])
                self.v_buf[:, :, :self.length].copy_(v[:, :, v.shape[-2] - self.length:])
                return k, v
        k, v = self._append(key_states, value_states)
        self.length += T
        self.start = max(self.start, self.length - keep)
        return k, v

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self.k_buf, self.v_buf = self.k_buf[indices], self.v_buf[indices]


def slot_cache(config, layer_ids: list[int], capacity: int) -> Cache:
    """A cache for the layers `layer_ids` (global indices) of one slot, `capacity` tokens per row.

    The other layers' entries are empty `DynamicLayer`s that are never written: transformers indexes
    a cache by global layer index, and mask helpers ask it about this shard's layers only.
    """
    types, kwargs = get_layer_types_and_kwargs(config.get_text_config(decoder=True))
    mine = set(layer_ids)
    layers = []
    for i, (t, kw) in enumerate(zip(types, kwargs)):
        if i not in mine:
            layers.append(DynamicLayer())
        elif t == "full_attention":
            layers.append(_FullLayer(capacity))
        elif t == "sliding_attention":
            layers.append(_WindowLayer(capacity, kw["sliding_window"]))
        else:  # families.py admits only these two
            raise ValueError(f"layer {i}: attention type {t!r} has no slot cache")
    return Cache(layers=layers)
