"""The slot KV cache hands attention exactly what transformers' DynamicCache would, step for step."""

import pytest
import torch
from transformers import DynamicCache, LlamaConfig

from edgeshard_mpi.kv_cache import slot_cache

WINDOW = 6


def _config(sliding: bool) -> LlamaConfig:
    config = LlamaConfig(num_hidden_layers=3, num_key_value_heads=2, num_attention_heads=2, hidden_size=8)
    if sliding:  # the middle layer slides, as Gemma's alternate
        config.sliding_window = WINDOW
        config.layer_types = ["full_attention", "sliding_attention", "full_attention"]
    return config


# (capacity given to the slot, tokens per step): a sized slot, one that must grow, a prompt longer
# than twice the window, and rows leaving mid-way
@pytest.mark.parametrize("sliding", [False, True])
@pytest.mark.parametrize("capacity, steps", [(40, [9] + [1] * 30), (3, [2] + [1] * 30), (64, [17] + [1] * 20),
                                             (8, [1] * 25)])
def test_same_views_and_mask_sizes_as_dynamic_cache(sliding, capacity, steps):
    config = _config(sliding)
    ours, theirs = slot_cache(config, [1, 2], capacity), DynamicCache(config=config)
    gen = torch.Generator().manual_seed(0)
    rows = 4
    for n, T in enumerate(steps):
        if n == 12:  # rows 1 and 3 finished
            idx = torch.tensor([0, 2])
            ours.batch_select_indices(idx)
            theirs.batch_select_indices(idx)
            rows = 2
        for layer in (1, 2):
            assert ours.get_mask_sizes(T, layer) == theirs.get_mask_sizes(T, layer)
            k, v = torch.randn(rows, 2, T, 4, generator=gen), torch.randn(rows, 2, T, 4, generator=gen)
            got, want = ours.update(k, v, layer), theirs.update(k, v, layer)
            for g, w in zip(got, want):
                assert torch.equal(g, w)
        assert ours.get_seq_length(1) == theirs.get_seq_length(1)
    assert ours.is_sliding == theirs.is_sliding


def test_a_sized_slot_allocates_once():
    cache = slot_cache(_config(True), [0, 1, 2], 30)
    layers = cache.layers
    for T in [10] + [1] * 19:
        for i in range(3):
            cache.update(torch.zeros(1, 2, T, 4), torch.zeros(1, 2, T, 4), i)
        if T == 10:
            buffers = [layer.k_buf.data_ptr() for layer in layers]
    assert [layer.k_buf.data_ptr() for layer in layers] == buffers
    assert [layer.k_buf.shape[2] for layer in layers] == [30, 2 * WINDOW, 30]
