import math
import random
from dataclasses import fields, replace

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from llminfer.sampling import (
    Logprob,
    SamplingParams,
    apply_min_p,
    apply_min_tokens,
    apply_penalties,
    apply_temperature,
    apply_top_k,
    apply_top_p,
    find_stop,
    make_generator,
    next_token,
    process_logits,
    sample_next_token,
    top_logprobs,
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


# --- SamplingParams: vLLM's fields, defaults and validation -------------------------------------------------------

def test_defaults_are_vllms():
    defaults = {f.name: getattr(SamplingParams(), f.name) for f in fields(SamplingParams)}
    assert defaults == {
        "n": 1, "presence_penalty": 0.0, "frequency_penalty": 0.0, "repetition_penalty": 1.0, "temperature": 1.0,
        "top_p": 1.0, "top_k": 0, "min_p": 0.0, "seed": None, "stop": [], "stop_token_ids": [], "ignore_eos": False,
        "max_tokens": 16, "min_tokens": 0, "logprobs": None, "prompt_logprobs": None,
        "include_stop_str_in_output": False, "detokenize": True,
    }


@pytest.mark.parametrize(
    "field, value",
    [("n", 0), ("n", -3), ("n", 1.5), ("presence_penalty", 3.0), ("presence_penalty", -2.5),
     ("presence_penalty", float("nan")), ("frequency_penalty", 2.01), ("frequency_penalty", -7),
     ("repetition_penalty", 0.0), ("repetition_penalty", -1.2), ("repetition_penalty", float("nan")),
     ("temperature", "hot"), ("top_k", 2.5), ("max_tokens", 0), ("min_tokens", -1), ("min_tokens", 1.5),
     ("logprobs", -2), ("logprobs", 2.5), ("prompt_logprobs", -2), ("prompt_logprobs", "5"),
     ("stop", [""]), ("stop", ["end", ""]), ("stop", ""), ("stop", 5), ("stop", ["ok", 7]),
     ("stop_token_ids", [-1]), ("stop_token_ids", [3, "4"]), ("stop_token_ids", "12"),
     # bools where numbers are meant, non-finite numbers, out-of-range seeds, too many completions
     ("n", True), ("max_tokens", True), ("top_k", False), ("seed", True), ("logprobs", True), ("temperature", True),
     ("stop_token_ids", [True]), ("temperature", float("inf")), ("repetition_penalty", float("inf")),
     ("top_p", float("nan")), ("min_p", float("-inf")), ("seed", 2**64), ("seed", -2), ("n", 1025)],
)
def test_every_field_is_validated_with_its_name_and_value(field, value):
    with pytest.raises(ValueError) as info:
        SamplingParams(**{field: value})
    message = str(info.value)
    assert field in message and (str(value) in message or repr(value) in message), message


@pytest.mark.parametrize(
    "kwargs, message",
    [({"presence_penalty": 3.0}, "presence_penalty must be in [-2, 2], got 3.0"),
     ({"min_tokens": 5, "max_tokens": 2}, "min_tokens must be <= max_tokens, got min_tokens=5, max_tokens=2"),
     ({"n": 0}, "n must be in [1, 1024], got 0"),
     ({"n": 2, "seed": 2**64 - 1}, "seed must be None, -1 or in [0, 2**64 - n] (here n=2), got 18446744073709551615"),
     ({"temperature": float("inf")}, "temperature must be a finite number, got inf"),
     ({"repetition_penalty": 0.0}, "repetition_penalty must be > 0, got 0.0")],
)
def test_error_messages_read_well(kwargs, message):
    with pytest.raises(ValueError) as info:
        SamplingParams(**kwargs)
    assert str(info.value) == message


def test_boundary_values_are_accepted():
    SamplingParams(presence_penalty=-2, frequency_penalty=2, repetition_penalty=0.5, top_k=-1, min_tokens=4,
                   max_tokens=4, logprobs=0, prompt_logprobs=0, temperature=0, stop_token_ids=[0])


def test_stop_and_stop_token_ids_are_normalised_to_lists():
    assert SamplingParams(stop="\n\n").stop == ["\n\n"]
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]
    assert SamplingParams(stop_token_ids=(5, 6)).stop_token_ids == [5, 6]
    given = [1, 2]
    params = SamplingParams(stop_token_ids=given)
    given.append(3)   # the params own their list
    assert params.stop_token_ids == [1, 2]


# --- penalties -----------------------------------------------------------------------------------------------------

def penalties_by_hand(logits, prompt, output, repetition, frequency, presence):
    """The definitions, token by token: CTRL's repetition penalty, then OpenAI's frequency and presence penalties."""
    result = []
    for token, value in enumerate(logits.tolist()):
        if token in prompt or token in output:
            value = value / repetition if value > 0 else value * repetition
        value -= frequency * output.count(token)
        value -= presence * (token in output)
        result.append(value)
    return torch.tensor(result, dtype=torch.float64)


@pytest.mark.parametrize("repetition, frequency, presence",
                         [(1.3, 0.0, 0.0), (0.7, 0.0, 0.0), (1.0, 0.5, 0.0), (1.0, 0.0, 0.8), (1.0, -0.4, -1.1),
                          (1.8, 1.2, 0.3), (1.0, 0.0, 0.0)])
def test_penalties_match_their_definitions(repetition, frequency, presence):
    params = SamplingParams(repetition_penalty=repetition, frequency_penalty=frequency, presence_penalty=presence)
    for vocab in (1, 11, 37):
        logits = torch.randn(vocab) * 3          # both signs, so the repetition penalty's two branches run
        prompt = [random.randrange(vocab) for _ in range(random.randrange(6))]
        output = [random.randrange(vocab) for _ in range(random.randrange(9))]   # repeats are likely
        expected = penalties_by_hand(logits, prompt, output, repetition, frequency, presence)
        torch.testing.assert_close(apply_penalties(logits, prompt, output, params).double(), expected)


def test_repetition_penalty_lowers_negative_logits_and_counts_the_prompt():
    logits = torch.tensor([2.0, -2.0, 0.0, -1.0, 1.0])
    params = SamplingParams(repetition_penalty=2.0)
    penalised = apply_penalties(logits, prompt_token_ids=[1, 1], output_token_ids=[0, 2], params=params)
    assert penalised.tolist() == [1.0, -4.0, 0.0, -1.0, 1.0]


def test_frequency_counts_repeats_and_presence_does_not():
    logits = torch.zeros(4)
    output = [2, 2, 2, 1]
    by_frequency = apply_penalties(logits, [3, 3], output, SamplingParams(frequency_penalty=0.5))
    by_presence = apply_penalties(logits, [3, 3], output, SamplingParams(presence_penalty=0.5))
    assert by_frequency.tolist() == [0.0, -0.5, -1.5, 0.0]    # the prompt's token 3 is not penalised
    assert by_presence.tolist() == [0.0, -0.5, -0.5, 0.0]


# --- min_tokens ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("ignore_eos", [False, True])
def test_min_tokens_masks_ending_tokens_until_exactly_min_tokens(ignore_eos):
    logits = torch.randn(9)
    params = SamplingParams(min_tokens=3, max_tokens=8, stop_token_ids=[4], ignore_eos=ignore_eos)
    ending = {4} if ignore_eos else {2, 4, 7}
    for generated in range(6):
        masked = apply_min_tokens(logits, generated, params, eos_token_ids=[2, 7])
        for token in range(9):
            if generated < 3 and token in ending:
                assert masked[token] == -math.inf, (generated, token)
            else:
                assert masked[token] == logits[token], (generated, token)


def test_min_tokens_zero_never_masks():
    logits = torch.randn(5)
    assert torch.equal(apply_min_tokens(logits, 0, SamplingParams(stop_token_ids=[1]), eos_token_ids=[0]), logits)


# --- stop strings --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "text, stop, without, with_stop",
    [("STOPrest", ["STOP"], "", "STOP"),                        # at the start
     ("To be\n\nor not", ["\n\n"], "To be", "To be\n\n"),     # in the middle
     ("To be, or not to be", ["to be"], "To be, or not ", "To be, or not to be"),   # at the end
     ("abcdef", ["def", "bc"], "a", "abc"),                     # the earliest wins, whatever the list order
     ("xabcdy", ["bcd", "abc"], "x", "xabc"),                   # overlapping: the one that completes first
     ("xabcdy", ["abcd", "bc"], "xa", "xabc"),                  # nested: "bc" completes before "abcd" can
     ("xabcy", ["bc", "abc"], "x", "xabc"),                     # both complete together: cut before the longer
     ("ab ab", ["ab"], "", "ab")],                               # the first of repeated occurrences
)
def test_find_stop_cuts_at_the_first_stop_string(text, stop, without, with_stop):
    cut, found = find_stop(text, stop, include=False)
    assert cut == without and found in stop and text.find(found) == len(without)
    assert find_stop(text, stop, include=True) == (with_stop, found)


def test_find_stop_without_a_match_returns_the_text():
    assert find_stop("To be", ["not"], include=False) == ("To be", None)
    assert find_stop("To be", [], include=True) == ("To be", None)
    assert find_stop("", ["x"], include=True) == ("", None)


def stop_while_streaming(text, stop, include):
    """Reference: reveal the text one character at a time and stop as soon as a stop string is complete."""
    for end in range(1, len(text) + 1):
        complete = [s for s in stop if text[:end].endswith(s)]
        if complete:
            longest = max(complete, key=len)
            return text[: end if include else end - len(longest)], longest
    return text, None


def test_find_stop_agrees_with_streaming_whatever_the_token_split():
    for _ in range(500):
        text = "".join(random.choices("ab", k=random.randrange(12)))
        stop = ["".join(random.choices("ab", k=random.randint(1, 4))) for _ in range(random.randint(1, 3))]
        for include in (False, True):
            assert find_stop(text, stop, include) == stop_while_streaming(text, stop, include), (text, stop)


# --- logprobs ------------------------------------------------------------------------------------------------------

def logprobs_by_hand(logits):
    values = logits.double().tolist()
    top = max(values)
    log_total = top + math.log(sum(math.exp(v - top) for v in values))
    return [v - log_total for v in values]


@pytest.mark.parametrize("vocab, k", [(1, 0), (1, 3), (7, 0), (7, 2), (37, 5), (37, 37)])
def test_top_logprobs_match_a_sort(vocab, k):
    logits = torch.randn(vocab) * 4
    expected = logprobs_by_hand(logits)
    by_probability = sorted(range(vocab), key=lambda t: -expected[t])
    for chosen in range(vocab):
        result = top_logprobs(logits, chosen, k)
        assert list(result)[0] == chosen                             # the chosen token comes first
        assert set(result) == {chosen} | set(by_probability[:k])
        for token, entry in result.items():
            assert entry.rank == by_probability.index(token) + 1
            assert entry.logprob == pytest.approx(expected[token], abs=1e-5)
            assert entry.decoded_token is None


def test_chosen_token_outside_the_top_k_keeps_its_true_rank():
    logits = torch.tensor([0.3, 2.0, -3.0, 1.0, 0.0, -1.0])
    result = top_logprobs(logits, token_id=2, k=2)
    assert result == {
        2: Logprob(pytest.approx(logprobs_by_hand(logits)[2], abs=1e-5), 6),
        1: Logprob(pytest.approx(logprobs_by_hand(logits)[1], abs=1e-5), 1),
        3: Logprob(pytest.approx(logprobs_by_hand(logits)[3], abs=1e-5), 2),
    }


def test_top_logprobs_use_the_raw_distribution_in_fp32():
    logits = torch.randn(50) * 5
    result = top_logprobs(logits.to(torch.bfloat16), 7, 3)
    raw = torch.log_softmax(logits.to(torch.bfloat16).float(), -1)
    assert all(isinstance(entry.logprob, float) for entry in result.values())
    for token, entry in result.items():
        assert entry.logprob == pytest.approx(float(raw[token]), abs=1e-6)


@pytest.fixture(scope="module")
def byte_level_tokenizer():
    """A real byte-level BPE tokenizer (the kind the shipped models use), trained here on one line."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(["To be, or not to be, that is the question."] * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer)


def test_decoded_tokens_spell_the_text(byte_level_tokenizer):
    text = "not to be, or to be"
    ids = byte_level_tokenizer.encode(text)
    logits = torch.randn(len(byte_level_tokenizer))
    decoded = [top_logprobs(logits, token, 2, byte_level_tokenizer)[token].decoded_token for token in ids]
    assert "".join(decoded) == text
    assert all(isinstance(entry.decoded_token, str) for entry in top_logprobs(logits, ids[0], 4,
                                                                              byte_level_tokenizer).values())


# --- next_token: the whole step ------------------------------------------------------------------------------------

def test_next_token_greedy_is_the_argmax_after_penalties_and_min_tokens():
    vocab, eos = 13, 12
    params = SamplingParams(temperature=0, repetition_penalty=1.4, frequency_penalty=0.6, presence_penalty=0.2,
                            min_tokens=4, max_tokens=10)
    for _ in range(50):
        logits = torch.randn(vocab) * 2
        logits[eos] += 1.0
        prompt = [random.randrange(vocab) for _ in range(5)]
        output = [random.randrange(vocab - 1) for _ in range(random.randrange(7))]
        expected = penalties_by_hand(logits, prompt, output, 1.4, 0.6, 0.2)
        if len(output) < 4:
            expected[eos] = -math.inf
        assert next_token(logits, params, None, prompt, output, [eos]) == int(expected.argmax())


def test_next_token_honours_min_tokens_then_releases_eos():
    logits = torch.tensor([0.0, 0.0, 30.0])              # the model is sure it is done
    params = SamplingParams(min_tokens=2, max_tokens=5, seed=3)
    generator = make_generator(params, "cpu")
    assert next_token(logits, params, generator, [0], [], [2]) != 2
    assert next_token(logits, params, generator, [0], [1], [2]) != 2
    assert next_token(logits, params, generator, [0], [1, 0], [2]) == 2


def decode_loop(params, steps=30, vocab=50):
    """A toy generation loop whose logits depend on the tokens so far, driven by `next_token`."""
    weights = torch.Generator().manual_seed(1)
    table = torch.randn(vocab, vocab, generator=weights) * 2
    generator = make_generator(params, "cpu")
    prompt, output = [3, 1, 4], []
    for _ in range(steps):
        torch.manual_seed(len(output))                   # disturb the global RNG between steps
        torch.rand(100)
        output.append(next_token(table[(prompt + output)[-1]], params, generator, prompt, output, [0]))
    return output


def test_next_token_with_a_seed_is_reproducible_and_independent_of_the_global_rng():
    params = SamplingParams(temperature=1.0, top_p=0.9, repetition_penalty=1.2, presence_penalty=0.5, seed=11)
    first = decode_loop(params)
    torch.manual_seed(12345)
    assert decode_loop(params) == first
    assert decode_loop(replace(params, seed=12)) != first


# --- statistics: sampling with penalties follows the intended distribution ----------------------------------------

LOGITS = torch.tensor([1.5, 1.0, 0.5, 0.0, -0.5, -1.0, 0.8, -0.3])
PROMPT, OUTPUT = [0, 4, 4, 6], [1, 1, 5, 0, 1, 7]
PENALISED = SamplingParams(temperature=0.6, repetition_penalty=1.6, frequency_penalty=0.3, presence_penalty=0.4,
                           top_k=7, seed=0)


def intended_distribution(params):
    """By hand, in float64: penalties on the raw logits, then temperature, then the top-k, then softmax."""
    scaled = penalties_by_hand(LOGITS, PROMPT, OUTPUT, params.repetition_penalty, params.frequency_penalty,
                               params.presence_penalty) / params.temperature
    kept = sorted(range(len(scaled)), key=lambda t: -scaled[t])[: params.top_k]
    weights = [math.exp(scaled[t]) if t in kept else 0.0 for t in range(len(scaled))]
    return np.array(weights) / sum(weights)


def penalties_after_temperature(logits, params, generator, prompt_token_ids, output_token_ids, eos_token_ids):
    """Wrong: penalises the already-scaled logits, so the additive penalties shrink by the temperature."""
    scaled = apply_temperature(logits, params.temperature)
    penalised = apply_penalties(scaled, prompt_token_ids, output_token_ids, params)
    return int(sample_next_token(penalised, replace(params, temperature=1.0), generator))


def repetition_penalty_divides_negative_logits(logits, params, generator, prompt_token_ids, output_token_ids,
                                               eos_token_ids):
    """Wrong: divides every seen logit by the penalty, which raises the negative ones."""
    logits = logits.clone()
    seen = sorted(set(prompt_token_ids) | set(output_token_ids))
    logits[seen] /= params.repetition_penalty
    unrepeated = replace(params, repetition_penalty=1.0)
    return next_token(logits, unrepeated, generator, prompt_token_ids, output_token_ids, eos_token_ids)


def goodness_of_fit(sampler, draws=6_000):
    """Chi-square p-value of seeded draws from `sampler` against the intended distribution."""
    generator = make_generator(PENALISED, "cpu")
    tokens = [sampler(LOGITS, PENALISED, generator, PROMPT, OUTPUT, [7]) for _ in range(draws)]
    target = intended_distribution(PENALISED)
    support = np.flatnonzero(target > 0)
    counts = np.bincount(tokens, minlength=len(target))
    assert counts[target == 0].sum() == 0, f"drew a token outside the kept set: {counts}"
    return chisquare(counts[support], target[support] * draws).pvalue


def test_sampling_with_penalties_follows_the_intended_distribution():
    assert goodness_of_fit(next_token) > 1e-3


@pytest.mark.parametrize("wrong", [penalties_after_temperature, repetition_penalty_divides_negative_logits])
def test_plausible_wrong_penalties_fail_the_same_test(wrong):
    assert goodness_of_fit(wrong) < 1e-6


def test_stop_strings_need_detokenization_and_flags_must_be_bools():
    with pytest.raises(ValueError, match="stop strings need detokenize=True"):
        SamplingParams(stop=["\n"], detokenize=False)
    with pytest.raises(ValueError, match="ignore_eos must be a bool, got 1"):
        SamplingParams(ignore_eos=1)
