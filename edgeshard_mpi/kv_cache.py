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

A compiled decode step (`static_slot_cache`) needs shapes that do not change from step to step, so
there the layers are transformers' static ones, as `generate` uses under `torch.compile`: attention
runs over all `capacity` positions, the ones not yet written masked out. The sums then run over
more (zero) terms, so logits may differ from `DynamicCache`'s in the last bits.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import (Cache, DynamicLayer, DynamicSlidingWindowLayer, StaticLayer,
                                     get_layer_types_and_kwargs)

__all__ = ["slot_cache", "static_slot_cache", "add_rows", "join_rows", "relayout", "STATIC_ROUND"]

# A static slot's capacity is rounded up to this. Its dimension is dynamic in the compiled graph, so a
# coarser rounding saves no compiles, and attention runs over the whole capacity every step: at 16 rows,
# 256 instead of the 96 a request needed made a compiled fp32 step 1.8x slower than an eager one.
STATIC_ROUND = 16


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

    def relayout(self, trim: int, capacity: int) -> None:
        """Drop every row's first `trim` columns (negative: add that many zero columns first), into
        buffers of `capacity` columns. Masked columns hold zeros or old values, never uninitialised
        memory: attention weighs them by exactly 0, and 0 x NaN would not be 0."""
        if not self.is_initialized:
            return
        self.k_buf, self.v_buf = (_relaid(b, self.length, trim, capacity) for b in (self.k_buf, self.v_buf))
        self.capacity, self.length = capacity, self.length - trim
        self.keys, self.values = self.k_buf[:, :, :self.length], self.v_buf[:, :, :self.length]

    def write_rows(self, places: list[int], keys: torch.Tensor, values: torch.Tensor, real: list[int]) -> None:
        """Rows `places` take the last `real[j]` columns of keys/values[j], ending at the newest column."""
        _write_rows((self.k_buf, self.v_buf), self.length, places, (keys, values), real)

    def add_rows(self, n: int) -> None:
        """n rows of zeros after the others (rows joining by chunks): one copy of the buffers."""
        if self.is_initialized:
            self.k_buf, self.v_buf = (_with_rows(b, n) for b in (self.k_buf, self.v_buf))
            self.keys, self.values = self.k_buf[:, :, :self.length], self.v_buf[:, :, :self.length]


def _with_rows(buf: torch.Tensor, n: int) -> torch.Tensor:
    return torch.cat([buf, buf.new_zeros(n, *buf.shape[1:])])


def _write_rows(bufs, length: int, places: list[int], new, real: list[int]) -> None:
    for j, (p, n) in enumerate(zip(places, real)):
        if n:
            for buf, add in zip(bufs, new):
                buf[p, :, length - n:length].copy_(add[j, :, add.shape[2] - n:])


def _relaid(buf: torch.Tensor, length: int, trim: int, capacity: int) -> torch.Tensor:
    """A copy of columns 0..length of `buf` with the first `trim` dropped (or -trim zero columns added)."""
    out = buf.new_zeros(*buf.shape[:2], capacity, buf.shape[3])
    if trim >= 0:
        out[:, :, :length - trim].copy_(buf[:, :, trim:length])
    else:
        out[:, :, -trim:length - trim].copy_(buf[:, :, :length])
    return out


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


class _StaticRows:
    """What a static layer needs beyond transformers': rows that leave by index, and dynamic shapes.

    The batch and capacity dimensions are marked dynamic, so that one compiled graph serves every
    micro-batch size above 1 and every capacity, instead of one compile per shape.
    """

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self._mark()

    def _mark(self) -> None:
        if torch.compiler.is_compiling():
            return
        for t in (self.keys, self.values):
            torch._dynamo.maybe_mark_dynamic(t, 0)
            torch._dynamo.maybe_mark_dynamic(t, 2)
            # transformers marks them static (for CUDA graphs); a graph would then be bound to these
            # very buffers, and every new slot and every row change would compile again
            if hasattr(t, "_dynamo_static_input_type"):
                del t._dynamo_static_input_type

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self.keys, self.values = self.keys[indices], self.values[indices]
            self._mark()

    def relayout(self, trim: int, capacity: int) -> None:
        """As `_FullLayer.relayout`, for the static buffers and their write position."""
        if not self.is_initialized:
            return
        capacity = -(-capacity // STATIC_ROUND) * STATIC_ROUND
        length = int(self.cumulative_length)
        self.keys, self.values = (_relaid(b, length, trim, capacity) for b in (self.keys, self.values))
        self.max_cache_len = capacity
        self.cumulative_length.fill_(length - trim)
        self._mark()

    def write_rows(self, places: list[int], keys: torch.Tensor, values: torch.Tensor, real: list[int]) -> None:
        _write_rows((self.keys, self.values), int(self.cumulative_length), places, (keys, values), real)

    def add_rows(self, n: int) -> None:
        if self.is_initialized:
            self.keys, self.values = _with_rows(self.keys, n), _with_rows(self.values, n)
            self._mark()

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # the buffer's (dynamic) size rather than the Python count, which a graph would be bound to
        return (self.keys.shape[-2] if self.is_initialized else self.max_cache_len), 0


class _StaticFull(_StaticRows, StaticLayer):
    pass


def static_slot_cache(config, layer_ids: list[int], capacity: int) -> Cache:
    """As `slot_cache`, with static layers for a compiled decode step; `capacity` is rounded up to
    `STATIC_ROUND` tokens.

    A sliding layer keeps every token too, and its mask (the family's sliding one) shows it only its
    window. transformers' static sliding layer rolls its buffer by a Python count that every step
    would compile again for; this costs a sliding layer its capacity instead of its window.
    """
    capacity = -(-capacity // STATIC_ROUND) * STATIC_ROUND
    return _cache(config, layer_ids, lambda: _StaticFull(capacity), lambda window: _StaticFull(capacity))


def slot_cache(config, layer_ids: list[int], capacity: int) -> Cache:
    """A cache for the layers `layer_ids` (global indices) of one slot, `capacity` tokens per row.

    The other layers' entries are empty `DynamicLayer`s that are never written: transformers indexes
    a cache by global layer index, and mask helpers ask it about this shard's layers only.
    """
    return _cache(config, layer_ids, lambda: _FullLayer(capacity), lambda window: _WindowLayer(capacity, window))


def join_rows(cache: Cache, new: Cache, layer_ids: list[int], places: list[int], real: list[int]) -> None:
    """Rows `places` of `cache` take the prefilled tokens of `new`'s rows (the last `real[j]` columns
    of row j), ending at the newest column. A sliding layer's window moves, so it takes no rows:
    the scheduler admits whole micro-batches there (families.has_sliding_layers)."""
    for i in layer_ids:
        layer, add = cache.layers[i], new.layers[i]
        if isinstance(layer, _WindowLayer):
            raise ValueError(f"layer {i} is a sliding-window layer: rows cannot join its cache")
        if add.is_initialized:
            layer.write_rows(places, add.k_buf[:, :, :add.length], add.v_buf[:, :, :add.length], real)


def add_rows(cache: Cache, layer_ids: list[int], n: int) -> None:
    """Every layer of this shard: n rows of zeros after the others, for rows that join there."""
    for i in layer_ids:
        cache.layers[i].add_rows(n)


def relayout(cache: Cache, layer_ids: list[int], trim: int, capacity: int) -> None:
    """Every layer of this shard: drop `trim` columns on the left (or add -trim), room for `capacity`."""
    for i in layer_ids:
        cache.layers[i].relayout(trim, capacity)


def _cache(config, layer_ids: list[int], full, sliding) -> Cache:
    types, kwargs = get_layer_types_and_kwargs(config.get_text_config(decoder=True))
    mine = set(layer_ids)
    layers = []
    for i, (t, kw) in enumerate(zip(types, kwargs)):
        if i not in mine:
            layers.append(DynamicLayer())
        elif t == "full_attention":
            layers.append(full())
        elif t == "sliding_attention":
            layers.append(sliding(kw["sliding_window"]))
        else:  # families.py admits only these two
            raise ValueError(f"layer {i}: attention type {t!r} has no slot cache")
    return Cache(layers=layers)
