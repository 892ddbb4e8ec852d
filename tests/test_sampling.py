import math

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from llminfer.sampling import (
    SamplingParams,
    apply_min_p,
    apply_temperature,
    apply_top_k,
    apply_top_p,
    make_generator,
    process_logits,
    sample_next_token,
)


@pytest.mark.parametrize(
    "field, value",
    [("temperature", -1.0), ("temperature", float("nan")), ("top_p", 1.5), ("top_p", 0.0), ("top_k", -2),
     ("min_p", 1.2), ("min_p", -0.1), ("max_tokens", 0), ("seed", 1.5)],
)
def test_invalid_values_are_refused_with_their_name(field, value):
    with pytest.raises(ValueError, match=field) as info:
        SamplingParams(**{field: value})
    assert str(value) in str(info.value)


def kept(logits: torch.Tensor) -> set[int]:
    return set(torch.nonzero(torch.isfinite(logits)).flatten().tolist())


@pytest.mark.parametrize("vocab", [1, 7, 123])
def test_top_k_keeps_the_k_largest(vocab):
    logits = torch.randn(vocab)
    for k in range(1, vocab + 1):
        expected = set(np.argsort(-logits.numpy(), kind="stable")[:k].tolist())
        assert kept(apply_top_k(logits, k)) == expected
    assert torch.equal(apply_top_k(logits, 0), logits)


@pytest.mark.parametrize("p", [0.05, 0.3, 0.5, 0.9, 0.999])
def test_top_p_keeps_the_smallest_set_reaching_p(p):
    for _ in range(20):
        logits = torch.randn(50) * 3
        probs = logits.softmax(-1).double().numpy()
        order = np.argsort(-probs)
        total, expected = 0.0, set()
        for i in order:            # direct definition: add tokens by probability until the mass reaches p
            expected.add(int(i))
            total += probs[i]
            if total >= p:
                break
        assert kept(apply_top_p(logits, p)) == expected


def test_top_p_works_on_batches():
    logits = torch.randn(4, 30)
    batched = apply_top_p(logits, 0.7)
    for row in range(4):
        assert torch.equal(batched[row], apply_top_p(logits[row], 0.7))


@pytest.mark.parametrize("min_p", [0.0, 0.01, 0.1, 0.5, 1.0])
def test_min_p_threshold_is_relative_to_the_top_token(min_p):
    logits = torch.randn(64) * 2
    probs = logits.softmax(-1)
    expected = {i for i in range(64) if probs[i] >= min_p * probs.max()}
    assert kept(apply_min_p(logits, min_p)) == expected


def test_temperature_scales_log_probabilities():
    logits = torch.randn(20)
    for t in (0.5, 1.0, 2.0):
        expected = torch.log_softmax(logits / t, -1)
        torch.testing.assert_close(torch.log_softmax(apply_temperature(logits, t), -1), expected)


def test_greedy_is_argmax():
    logits = torch.randn(5, 40)
    assert torch.equal(sample_next_token(logits, SamplingParams(temperature=0)), logits.argmax(-1))


def test_sampling_follows_the_processed_distribution():
    """Chi-square goodness of fit of 20,000 seeded draws against the intended distribution."""
    logits = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -4.0])
    params = SamplingParams(temperature=0.7, top_k=6, top_p=0.95, min_p=0.02, seed=0)
    target = process_logits(logits, params).softmax(-1)
    support = torch.nonzero(target > 0).flatten()
    draws = sample_next_token(logits.expand(20_000, -1), params, make_generator(params, "cpu"))
    assert set(draws.unique().tolist()) <= set(support.tolist())   # nothing outside the kept set
    counts = torch.bincount(draws, minlength=len(logits))[support].numpy()
    expected = (target[support] * len(draws)).double().numpy()
    assert chisquare(counts, expected * counts.sum() / expected.sum()).pvalue > 1e-3


def test_a_plausible_wrong_sampler_fails_the_same_test():
    """The statistical test has power: sampling without the temperature is rejected."""
    logits = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -4.0])
    params = SamplingParams(temperature=0.7, seed=0)
    target = process_logits(logits, params).softmax(-1).double().numpy()
    wrong = torch.multinomial(logits.softmax(-1).expand(20_000, -1), 1, generator=make_generator(params, "cpu"))
    counts = torch.bincount(wrong.flatten(), minlength=len(logits)).numpy()
    assert chisquare(counts, target / target.sum() * counts.sum()).pvalue < 1e-6


def test_seeded_draws_are_reproducible_and_independent_of_global_state():
    logits = torch.randn(3, 100)
    params = SamplingParams(temperature=1.0, seed=42)
    first = [sample_next_token(logits, params, make_generator(params, "cpu")) for _ in range(2)]
    torch.rand(1000)
    again = sample_next_token(logits, params, make_generator(params, "cpu"))
    assert torch.equal(first[0], first[1]) and torch.equal(first[0], again)
    assert make_generator(SamplingParams(), "cpu") is None


def test_truncation_never_removes_every_token():
    logits = torch.full((10,), -math.inf)
    logits[3] = 0.0
    params = SamplingParams(top_k=1, top_p=0.01, min_p=1.0, seed=0)
    assert int(sample_next_token(logits, params, make_generator(params, "cpu"))) == 3
