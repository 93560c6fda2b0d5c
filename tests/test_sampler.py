"""Sampling: masks, penalties, seeds."""

from __future__ import annotations

import pytest
import torch

from llmopt.engine.sampler import (
    apply_penalties,
    draw,
    filter_logits,
    make_generator,
    sample,
)
from llmopt.engine.sampling_params import SamplingParams
from llmopt.errors import UsageError

CPU = torch.device("cpu")
EMPTY = torch.tensor([], dtype=torch.long)


def kept(logits: torch.Tensor, **kw) -> set[int]:
    out = filter_logits(logits, SamplingParams(**kw))
    return set(torch.nonzero(out > float("-inf")).flatten().tolist())


def test_top_k_keeps_the_k_largest() -> None:
    logits = torch.tensor([1.0, 5.0, 3.0, 4.0, 2.0])
    assert kept(logits, top_k=2) == {1, 3}
    assert kept(logits, top_k=0) == {0, 1, 2, 3, 4}


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log()
    assert kept(logits, top_p=0.5) == {0}
    assert kept(logits, top_p=0.6) == {0, 1}
    assert kept(logits, top_p=0.81) == {0, 1, 2}
    assert kept(logits, top_p=0.01) == {0}  # the top token always stays


def test_min_p_drops_tokens_below_fraction_of_top() -> None:
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    assert kept(logits, min_p=0.5) == {0, 1}
    assert kept(logits, min_p=0.2) == {0, 1, 2}


def test_temperature_scales_before_filters() -> None:
    logits = torch.tensor([2.0, 1.0])
    out = filter_logits(logits, SamplingParams(temperature=0.5))
    assert torch.allclose(out, torch.tensor([4.0, 2.0]))


def test_repetition_penalty_divides_positive_and_multiplies_negative() -> None:
    logits = torch.tensor([2.0, -2.0, 1.0])
    apply_penalties(
        logits, SamplingParams(repetition_penalty=2.0), torch.tensor([0]), torch.tensor([1])
    )
    assert torch.allclose(logits, torch.tensor([1.0, -4.0, 1.0]))


def test_presence_and_frequency_penalties_count_generated_tokens() -> None:
    logits = torch.zeros(4)
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    apply_penalties(logits, params, torch.tensor([3]), torch.tensor([1, 1, 2]))
    assert torch.allclose(logits, torch.tensor([0.0, -1.0, -0.75, 0.0]))


def test_greedy_is_argmax() -> None:
    logits = torch.randn(100)
    g = make_generator(0, CPU)
    assert sample(logits, SamplingParams(temperature=0), g, EMPTY, EMPTY) == int(logits.argmax())


@pytest.mark.parametrize(
    "penalty",
    [
        {"presence_penalty": 1.0},
        {"frequency_penalty": 1.0},
        {"repetition_penalty": 2.0},  # 5 / 2 < 4.5
    ],
)
def test_greedy_sample_applies_penalties_and_leaves_the_logits(penalty) -> None:
    logits = torch.tensor([5.0, 4.5, 0.0])
    g = make_generator(0, CPU)
    assert sample(logits, SamplingParams(temperature=0), g, EMPTY, torch.tensor([0])) == 0
    params = SamplingParams(temperature=0, **penalty)
    assert sample(logits, params, g, EMPTY, torch.tensor([0])) == 1  # token 0 was generated
    assert sample(logits, params, g, EMPTY, torch.tensor([2])) == 0  # another one was
    assert torch.equal(logits, torch.tensor([5.0, 4.5, 0.0]))


def test_same_seed_same_draws_and_other_seed_differs() -> None:
    logits = torch.zeros(1000)  # uniform: draws depend only on the generator
    params = SamplingParams(temperature=1.0)

    def draws(seed: int) -> list[int]:
        g = make_generator(seed, CPU)
        return [sample(logits, params, g, EMPTY, EMPTY) for _ in range(20)]

    assert draws(7) == draws(7)
    assert draws(7) != draws(8)


def test_draws_follow_the_distribution() -> None:
    """Frequencies of 20,000 draws within 1.5 points of each token's probability (about
    5 standard deviations), and a zero-probability token never drawn, wherever it sits."""
    probs = torch.tensor([0.0, 0.5, 0.0, 0.3, 0.2, 0.0])
    g = make_generator(3, CPU)
    counts = torch.bincount(torch.tensor([draw(probs, g) for _ in range(20_000)]), minlength=6)
    freq = counts.double() / counts.sum()
    assert counts[0] == counts[2] == counts[5] == 0
    assert (freq - probs.double()).abs().max() < 0.015


def test_sampling_respects_the_mask() -> None:
    logits = torch.tensor([0.0, 0.0, 10.0, 10.0, 0.0])
    g = make_generator(0, CPU)
    params = SamplingParams(temperature=1.0, top_k=2)
    assert {sample(logits, params, g, EMPTY, EMPTY) for _ in range(50)} == {2, 3}


@pytest.mark.parametrize(
    "kw",
    [
        {"temperature": -1},
        {"top_p": 0},
        {"top_p": 1.5},
        {"min_p": 2},
        {"top_k": -2},
        {"max_tokens": 0},
        {"repetition_penalty": 0},
        {"presence_penalty": 3},
        {"stop": ("",)},
    ],
)
def test_invalid_params_are_rejected(kw) -> None:
    with pytest.raises(UsageError):
        SamplingParams(**kw)


def test_stop_accepts_a_single_string() -> None:
    assert SamplingParams(stop="END").stop == ("END",)


def test_token_logprob_is_log_softmax_of_raw_logits() -> None:
    from llmopt.engine.sampler import token_logprob

    logits = torch.tensor([2.0, 0.5, -1.0, 3.0])
    lp = token_logprob(logits, 0, k=2)
    ref = logits.log_softmax(-1)
    assert lp.token_id == 0 and lp.logprob == pytest.approx(float(ref[0]))
    assert [t for t, _ in lp.top] == [3, 0]
    assert lp.top[0][1] == pytest.approx(float(ref[3]))
    assert token_logprob(logits, 1, k=0).top == []
