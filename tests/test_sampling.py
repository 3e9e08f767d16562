from __future__ import annotations

import pytest
import torch

from edgeshard_mpi.sampling import Sampler, SamplingParams


def test_greedy_is_argmax():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    assert torch.equal(Sampler([SamplingParams()] * 3)(logits), logits.argmax(-1))


def test_seeded_rows_do_not_depend_on_their_neighbours():
    g = torch.Generator().manual_seed(1)
    steps = [torch.randn(3, 100, generator=g) for _ in range(20)]
    p = SamplingParams(temperature=1.0, top_k=20, top_p=0.9, seed=42)
    alone = Sampler([p])
    mixed = Sampler([SamplingParams(), p, SamplingParams(temperature=0.5, seed=3)])
    a = [int(alone(s[1:2])[0]) for s in steps]
    b = [int(mixed(s)[1]) for s in steps]
    assert a == b
    assert len(set(a)) > 1


def test_top_k_and_top_p_restrict_the_choice():
    logits = torch.tensor([[5.0, 4.0, 3.0, -10.0, -10.0, -10.0]])
    seen_k = {int(Sampler([SamplingParams(temperature=5.0, top_k=2, seed=s)])(logits)[0]) for s in range(200)}
    assert seen_k == {0, 1}
    # probabilities about 0.665, 0.245, 0.09: top_p=0.8 keeps the first two only
    seen_p = {int(Sampler([SamplingParams(temperature=1.0, top_p=0.8, seed=s)])(logits)[0]) for s in range(300)}
    assert seen_p == {0, 1}


@pytest.mark.parametrize("kw", [dict(temperature=-1), dict(top_k=-1), dict(top_p=0), dict(top_p=1.5), dict(seed=-1)])
def test_bad_params(kw):
    with pytest.raises(ValueError):
        SamplingParams(**kw)
