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


def test_params_travel_as_a_row_and_back():
    p = SamplingParams(temperature=0.7, top_k=5, top_p=0.9, min_p=0.05, seed=2**40, repetition_penalty=1.3,
                       presence_penalty=-0.5, frequency_penalty=1.5, min_tokens=3, ignore_eos=True,
                       stop_token_ids=(7, 11, 2**31))
    assert SamplingParams.from_row(p.to_row()) == p
    assert SamplingParams.from_row(SamplingParams().to_row()) == SamplingParams()


@pytest.mark.parametrize("kw", [dict(min_p=-0.1), dict(min_p=1.5), dict(repetition_penalty=0), dict(min_tokens=-1),
                                dict(presence_penalty=2.5), dict(frequency_penalty=-3), dict(stop_token_ids=(-1,))])
def test_bad_new_params(kw):
    with pytest.raises(ValueError, match=next(iter(kw))):
        SamplingParams(**kw)


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits_of_seen_tokens():
    logits = torch.tensor([[2.0, -1.0, 1.9, 0.5, -3.0]])
    s = Sampler([SamplingParams(repetition_penalty=2.0)], prompts=[[0, 1]])
    assert int(s(logits)[0]) == 2  # 0 (in the prompt) drops to 1.0, below 2's 1.9
    from edgeshard_mpi.sampling import _process
    x = _process(logits[0], s.rows[0], ())
    assert torch.allclose(x, torch.tensor([1.0, -2.0, 0.95, 0.5, -3.0]))  # and 2, generated since, too


def test_presence_and_frequency_penalties_subtract_per_generated_token():
    from edgeshard_mpi.sampling import _process
    s = Sampler([SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)])
    for t in (3, 3, 1):  # generated: 3 twice, 1 once
        s(torch.nn.functional.one_hot(torch.tensor([t]), 5).float() * 10)
    x = _process(torch.zeros(5), s.rows[0], ())
    assert torch.allclose(x, torch.tensor([0.0, -0.75, 0.0, -1.0, 0.0]))
    # the prompt does not count for them (OpenAI's definition), unlike the repetition penalty
    s = Sampler([SamplingParams(presence_penalty=1.0)], prompts=[[2]])
    assert int(s(torch.tensor([[0.0, 0.0, 0.5, 0.0, 0.0]]))[0]) == 2


def test_min_tokens_holds_eos_and_stop_ids_back_then_lets_them_through():
    logits = torch.tensor([[0.0, 5.0, 4.0, 1.0]])  # EOS (1) and the stop id (2) are the likeliest
    s = Sampler([SamplingParams(min_tokens=2, stop_token_ids=(2,))], eos={1})
    assert [int(s(logits)[0]) for _ in range(3)] == [3, 3, 1]


def test_min_p_keeps_tokens_at_least_that_share_of_the_likeliest():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    seen = {int(Sampler([SamplingParams(temperature=1.0, min_p=0.25, seed=s)])(logits)[0]) for s in range(300)}
    assert seen == {0, 1, 2}  # 0.05 < 0.25 x 0.5; 0.15 >= 0.125
    seen = {int(Sampler([SamplingParams(temperature=1.0, seed=s)])(logits)[0]) for s in range(300)}
    assert seen == {0, 1, 2, 3}


def test_penalties_shift_a_sampled_distribution_the_way_they_are_defined():
    # one row sampled many times from flat logits: a frequency penalty makes a repeated token rarer
    def repeats(**kw) -> float:
        hits = 0
        for seed in range(200):
            s = Sampler([SamplingParams(temperature=1.0, seed=seed, **kw)])
            first = int(s(torch.zeros(1, 4))[0])
            hits += int(s(torch.zeros(1, 4))[0]) == first
        return hits / 200

    plain, penalized, rewarded = repeats(), repeats(frequency_penalty=2.0), repeats(presence_penalty=-2.0)
    assert penalized < 0.1 < 0.15 < plain < 0.4 < 0.6 < rewarded


def test_the_source_ends_a_request_on_eos_unless_ignored_on_stop_ids_and_never_before_min_tokens():
    from edgeshard_mpi.jobs import Generation, Request
    from edgeshard_mpi.pipeline import Prompt, _Row

    class Tok:
        def decode(self, ids, skip_special_tokens=True):
            return " ".join(map(str, ids))

    def run(tokens, **kw):
        row = _Row(Prompt(Request("r", "test", "x", generation=Generation(8, (), SamplingParams(**kw))), [1], "x"))
        for t in tokens:
            row.add(t, 0.0, {0}, Tok())
            if row.finish:
                break
        return row.tokens, row.finish, row.text

    assert run([5, 0, 6]) == ([5, 0], "eos", "")
    assert run([5, 0, 6, 7, 8, 9, 10, 11], ignore_eos=True)[:2] == ([5, 0, 6, 7, 8, 9, 10, 11], "length")
    assert run([5, 9, 6], stop_token_ids=(9,)) == ([5, 9], "stop", "5")
    assert run([5, 9, 9, 6], stop_token_ids=(9,), min_tokens=3) == ([5, 9, 9], "stop", "5 9")


def test_logprobs_are_the_models_own_distribution_for_rows_that_ask():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 0.0, 3.0, 0.0]])
    s = Sampler([SamplingParams(logprobs=2, repetition_penalty=5.0), SamplingParams()], prompts=[[0], []])
    tokens = s(logits)
    values, ids = s.logprobs(logits, tokens)
    lp = torch.log_softmax(logits, -1)
    assert int(tokens[0]) == 1  # the penalty moved the choice, not the logprobs
    assert torch.allclose(values[0], torch.stack([lp[0, 1], lp[0, 0], lp[0, 1]]))
    assert ids[0].tolist() == [0, 1]
    assert Sampler([SamplingParams()]).logprobs(logits[:1], tokens[:1]) is None
