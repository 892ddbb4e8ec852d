"""Speculative decoding: the config, the n-gram proposer against a brute-force reference, the verifier's
exactness by statistical tests (and two wrong verifiers it must tell apart), and the engine giving the
same greedy tokens with and without speculation, also under preemption and prefix sharing."""

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import chisquare

from llminfer import LLM, SamplingParams
from llminfer.datasets import tinyshakespeare_text
from llminfer.spec import Draft, SpeculativeConfig, find_ngram_continuation, verify_draft
from llminfer.spec.metrics import SpecStats
from llminfer.spec.verify import residual

NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 2}
DRAFT = {"model": "tiny-shakespeare-draft", "num_speculative_tokens": 3}


def chi2_pvalue(observed, probs) -> float:
    """Chi-square p-value of counts against probabilities (renormalised in float64 over the given support)."""
    probs = torch.as_tensor(probs, dtype=torch.float64)
    observed = torch.as_tensor(observed, dtype=torch.float64)
    return chisquare(observed.numpy(), (observed.sum() * probs / probs.sum()).numpy()).pvalue


# --- configuration ----------------------------------------------------------------------------------------------

def test_vllm_style_configs_parse():
    assert SpeculativeConfig.parse(NGRAM) == SpeculativeConfig("ngram", 4, prompt_lookup_min=2, prompt_lookup_max=4)
    assert SpeculativeConfig.parse(DRAFT) == SpeculativeConfig("draft_model", 3, model="tiny-shakespeare-draft")
    # vLLM's defaults: one bound given is used for both; none gives 5 and 5; "model": "ngram" means the method.
    assert SpeculativeConfig.parse({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 3}) == \
        SpeculativeConfig("ngram", 2, prompt_lookup_min=3, prompt_lookup_max=3)
    assert SpeculativeConfig.parse({"model": "ngram", "num_speculative_tokens": 2}).prompt_lookup_min == 5
    assert SpeculativeConfig.parse(None) is None


@pytest.mark.parametrize("spec, match", [
    ({**NGRAM, "num_speculative_tokens": 0}, r"num_speculative_tokens must be an int in \[1, 16\], got 0"),
    ({**NGRAM, "num_speculative_tokens": True}, "num_speculative_tokens must be an int .* got True"),
    ({**NGRAM, "num_speculative_tokens": None}, "num_speculative_tokens must be an int .* got None"),
    ({**NGRAM, "prompt_lookup_min": 5, "prompt_lookup_max": 2}, "prompt_lookup_min=5 must be <= prompt_lookup_max=2"),
    ({**NGRAM, "prompt_lookup_min": 0}, "prompt_lookup_min must be an int >= 1, got 0"),
    ({"method": "beam", "num_speculative_tokens": 2}, "method must be one of .* got 'beam'"),
    ({"method": "eagle", "num_speculative_tokens": 2}, "'eagle' is one of vLLM's that llminfer does not implement"),
    ({"method": "draft_model", "num_speculative_tokens": 2}, "needs a draft 'model'"),
    ({**NGRAM, "draft_tensor_parallel_size": 2}, r"keys llminfer does not know: \['draft_tensor_parallel_size'\]"),
    ("ngram", "speculative_config must be a dict or None, got str"),
])
def test_bad_configs_fail_at_construction_naming_the_value(spec, match):
    with pytest.raises(ValueError, match=match):
        SpeculativeConfig.parse(spec)
    with pytest.raises(ValueError, match=match):
        LLM("tiny-shakespeare", speculative_config=spec, num_kv_blocks=16, max_model_len=128)


def test_a_draft_that_cannot_be_compared_with_the_target_is_refused(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    other = tmp_path / "other-vocab"
    LlamaForCausalLM(LlamaConfig(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, max_position_embeddings=1024)).save_pretrained(other)
    with pytest.raises(ValueError, match="vocabulary has 1000 tokens and the target's 2048"):
        LLM("tiny-shakespeare", speculative_config={"model": str(other), "num_speculative_tokens": 2})
    with pytest.raises(ValueError, match=r"context \(512 tokens\) is shorter than the target's \(1024\)"):
        LLM("tiny-shakespeare", speculative_config={"model": "llama-tiny-random", "num_speculative_tokens": 2})


# --- n-gram lookup ----------------------------------------------------------------------------------------------

def brute_force_ngram(tokens, min_n, max_n, k):
    """The rule written out: the longest suffix (n in [min_n, max_n]) that occurred earlier, at its earliest
    occurrence; the k tokens after it."""
    for n in range(min(max_n, len(tokens) - 1), min_n - 1, -1):
        suffix = tokens[len(tokens) - n:]
        for start in range(len(tokens) - n):
            if tokens[start:start + n] == suffix:
                return tokens[start + n:start + n + k]
    return []


def test_ngram_examples():
    assert find_ngram_continuation([1, 2, 3, 4, 2, 3], 2, 3, 4) == [4, 2, 3]   # vLLM's docstring example
    assert find_ngram_continuation([1, 2, 3, 4, 2, 3], 3, 3, 4) == []
    assert find_ngram_continuation([9], 1, 3, 2) == []
    assert find_ngram_continuation([256, 1, 0, 0, 1], 1, 1, 2) == [0, 0]      # 256's bytes contain 1's: aligned only


@settings(max_examples=300, deadline=None)
@given(tokens=st.lists(st.integers(0, 5) | st.integers(0, 70000), max_size=40), min_n=st.integers(1, 4),
       extra=st.integers(0, 3), k=st.integers(1, 6))
def test_ngram_matches_the_brute_force_rule(tokens, min_n, extra, k):
    assert find_ngram_continuation(tokens, min_n, min_n + extra, k) == brute_force_ngram(tokens, min_n,
                                                                                           min_n + extra, k)


# --- the verifier: exact by statistics, and it tells wrong verifiers apart ---------------------------------------

def accept_if_likely(draft, target_probs, greedy, generator=None):
    """Wrong: keeps a draft whenever the target finds it likely enough, else resamples from the target."""
    out = []
    for i, token in enumerate(draft.token_ids):
        p = target_probs(i)
        if float(p[token]) > 0.15:
            out.append(token)
            continue
        out.append(int(torch.multinomial(p, 1, generator=generator)))
        return out
    out.append(int(torch.multinomial(target_probs(len(draft.token_ids)), 1, generator=generator)))
    return out


def resample_from_target(draft, target_probs, greedy, generator=None):
    """Wrong: the acceptance test is right, but a rejection resamples from p instead of the residual."""
    out = []
    for i, token in enumerate(draft.token_ids):
        p = target_probs(i)
        q = draft.probs[i]
        if float(torch.rand((), generator=generator)) * float(q[token]) < float(p[token]):
            out.append(token)
            continue
        out.append(int(torch.multinomial(p, 1, generator=generator)))
        return out
    out.append(int(torch.multinomial(target_probs(len(draft.token_ids)), 1, generator=generator)))
    return out


def first_token_pvalue(verifier, p: torch.Tensor, q: torch.Tensor, trials: int, seed: int) -> float:
    """Draw a draft token from q, verify it against p, and test the first token out against p (chi-square)."""
    generator = torch.Generator().manual_seed(seed)
    counts = torch.zeros_like(p)
    for _ in range(trials):
        token = int(torch.multinomial(q, 1, generator=generator))
        out = verifier(Draft([token], q[None]), lambda i: p, False, generator)
        counts[out[0]] += 1
    keep = p > 0
    return chi2_pvalue(counts[keep], p[keep])


def real_distributions():
    """The target's and the draft's next-token distributions (temperature 1, top-k 12) at a real context."""
    from llminfer import load_model
    from llminfer.sampling import next_token_probs

    target, tokenizer = load_model("tiny-shakespeare")
    draft, _ = load_model("tiny-shakespeare-draft")
    ids = tokenizer.encode("ROMEO:\nI will not", add_special_tokens=False)
    params = SamplingParams(temperature=1.0, top_k=12)
    with torch.no_grad():
        p_logits, q_logits = target(torch.tensor([ids]))[0, -1], draft(torch.tensor([ids]))[0, -1]
    p = next_token_probs(p_logits, params, ids, [], [])
    q = next_token_probs(q_logits, params, ids, [], [])
    return p, q


@pytest.fixture(scope="module")
def model_pq():
    return real_distributions()


def test_the_residual_is_what_the_draft_under_proposes():
    p, q = torch.tensor([0.5, 0.3, 0.2]), torch.tensor([0.2, 0.6, 0.2])
    assert torch.allclose(residual(p, q), torch.tensor([1.0, 0.0, 0.0]))
    assert torch.equal(residual(p, p), p)   # nothing under-proposed: p itself


def test_verification_reproduces_the_target_distribution_on_the_models_own(model_pq):
    p, q = model_pq
    assert (p > 0).sum() == 12 and (p - q).abs().sum() > 0.2   # the two models disagree enough to matter
    assert first_token_pvalue(verify_draft, p, q, trials=6000, seed=0) > 1e-3


@pytest.mark.parametrize("wrong", [accept_if_likely, resample_from_target])
def test_the_statistical_test_rejects_wrong_verifiers(model_pq, wrong):
    p, q = model_pq
    assert first_token_pvalue(wrong, p, q, trials=6000, seed=0) < 1e-6


def test_later_positions_and_deterministic_drafts_are_exact():
    # Synthetic target with a different distribution at each position; a point-mass (n-gram) draft of 2 tokens.
    generator = torch.Generator().manual_seed(1)
    p = [torch.tensor([0.6, 0.3, 0.1]), torch.tensor([0.2, 0.5, 0.3]), torch.tensor([0.1, 0.1, 0.8])]
    draft = Draft([0, 1])
    first, second = torch.zeros(3), torch.zeros(3)
    trials = 20000
    for _ in range(trials):
        out = verify_draft(draft, lambda i: p[i], False, generator)
        first[out[0]] += 1
        if out[0] == 0:
            second[out[1]] += 1   # after the first draft was kept, the next token must follow p[1]
    assert chi2_pvalue(first, p[0]) > 1e-3 and chi2_pvalue(second, p[1]) > 1e-3


def test_greedy_verification_keeps_the_matching_prefix_and_draws_nothing():
    logits = [torch.tensor([0.0, 5.0, 1.0]), torch.tensor([3.0, 0.0, 1.0]), torch.tensor([0.0, 0.0, 9.0])]
    generator = torch.Generator().manual_seed(0)
    state = generator.get_state()
    assert verify_draft(Draft([1, 0]), lambda i: logits[i], True, generator) == [1, 0, 2]   # all kept + bonus
    assert verify_draft(Draft([1, 2]), lambda i: logits[i], True, generator) == [1, 0]      # replaced at 2nd
    assert verify_draft(Draft([2, 0]), lambda i: logits[i], True, generator) == [1]
    assert torch.equal(generator.get_state(), state)


@settings(max_examples=200, deadline=None)
@given(draft=st.lists(st.integers(0, 4), max_size=5), data=st.data())
def test_batched_greedy_acceptance_equals_the_verifier(draft, data):
    from llminfer.spec.verify import greedy_accept

    logits = torch.tensor(data.draw(st.lists(st.lists(st.integers(-3, 3), min_size=5, max_size=5),
                                             min_size=len(draft) + 1, max_size=len(draft) + 1)), dtype=torch.float32)
    argmaxes = logits.argmax(-1).tolist()
    assert greedy_accept(draft, argmaxes) == verify_draft(Draft(draft), lambda i: logits[i], True)


def test_spec_stats_count_acceptance_by_position():
    stats = SpecStats()
    for drafted, accepted in [(3, 3), (3, 1), (3, 0), (2, 2)]:
        stats.record(drafted, accepted)
    assert stats.acceptance_rate == 6 / 11 and stats.mean_accepted_length == 1 + 6 / 4
    # Position 0 is reached 4 times and kept 3; position 1 reached 3 times (after a kept token 0), kept 2;
    # position 2 reached once (the 2-token draft has none), kept once.
    assert stats.acceptance_by_position() == [3 / 4, 2 / 3, 1.0]


# --- the engine: the same greedy tokens, under preemption and prefix sharing ------------------------------------

def mixed_requests(count: int, seed: int) -> tuple[list[str], list[SamplingParams]]:
    """Prompts cut from Shakespeare (so n-grams recur and the draft knows the style), a third of them sharing a
    long prefix, with greedy parameters of every kind the engine handles differently."""
    rng = random.Random(seed)
    text = tinyshakespeare_text()
    shared = text[1000:1300]
    prompts, params = [], []
    for i in range(count):
        start = rng.randrange(0, len(text) - 2000)
        body = text[start:start + rng.randint(40, 400)]
        prompts.append(shared + body if i % 3 == 0 else body)
        kind = i % 5
        params.append(SamplingParams(
            temperature=0, max_tokens=rng.randint(4, 40), ignore_eos=kind == 0,
            repetition_penalty=1.3 if kind == 1 else 1.0, min_tokens=3 if kind == 2 else 0,
            stop=["\n\n"] if kind == 3 else None, stop_token_ids=[rng.randrange(2048)] if kind == 4 else None))
    return prompts, params


@pytest.fixture(scope="module")
def greedy_reference():
    prompts, params = mixed_requests(200, seed=0)
    llm = LLM("tiny-shakespeare", num_kv_blocks=512, max_num_seqs=32)
    return prompts, params, [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


@pytest.mark.slow
@pytest.mark.parametrize("spec, blocks", [
    ({**NGRAM, "num_speculative_tokens": 3}, 512),
    ({**NGRAM, "num_speculative_tokens": 6, "prompt_lookup_min": 1}, 40),   # tight pool: preemption
    ({**DRAFT, "num_speculative_tokens": 2}, 512),
    ({**DRAFT, "num_speculative_tokens": 4}, 40),
])
def test_greedy_outputs_are_identical_with_speculation(greedy_reference, spec, blocks):
    prompts, params, reference = greedy_reference
    llm = LLM("tiny-shakespeare", num_kv_blocks=blocks, max_num_seqs=32, max_model_len=512, speculative_config=spec)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    different = [i for i, o in enumerate(outputs) if o.outputs[0].token_ids != reference[i]]
    assert not different, f"{len(different)} requests differ, first {different[:5]}"
    engine = llm.llm_engine
    stats = engine.spec_stats
    assert stats.num_verifications > 100 and 0 < stats.num_accepted < stats.num_drafted
    assert engine.pool.num_used_blocks == 0 and not engine.requests
    trace = engine.trace
    if blocks == 40:
        assert sum(len(r.preempted) for r in trace) > 0, "the tight pool was meant to preempt"
    assert sum(n for r in trace for n in r.prefix_hits.values()) > 0, "the shared prefix was meant to hit the cache"


def test_seeded_sampling_with_speculation_is_reproducible():
    prompts = ["ROMEO:\nBut soft, what light", "JULIET:\nO Romeo, Romeo"]
    params = [SamplingParams(temperature=0.9, top_p=0.95, seed=s, max_tokens=30) for s in (1, 2)]
    runs = [[o.outputs[0].token_ids for o in LLM("tiny-shakespeare", speculative_config=DRAFT, num_kv_blocks=64,
                                                    max_model_len=256).generate(prompts, params, use_tqdm=False)]
            for _ in range(2)]
    assert runs[0] == runs[1]


def test_the_engine_samples_the_targets_distribution_after_a_draft():
    """The second token of many seeded requests (the first one a draft is verified for) follows the target's
    distribution given the first: chi-square over the requests whose first token was the most common one."""
    from llminfer import load_model
    from llminfer.sampling import next_token_probs

    prompt, temperature, top_k = "ROMEO:\nI will not", 1.0, 6
    llm = LLM("tiny-shakespeare", speculative_config={**DRAFT, "num_speculative_tokens": 1}, max_num_seqs=256,
              num_kv_blocks=256, max_model_len=128)
    params = [SamplingParams(temperature=temperature, top_k=top_k, seed=s, max_tokens=3, ignore_eos=True)
              for s in range(1500)]
    outputs = [o.outputs[0].token_ids for o in llm.generate([prompt] * len(params), params, use_tqdm=False)]
    assert llm.llm_engine.spec_stats.num_verifications >= len(params)
    first = max(set(o[0] for o in outputs), key=[o[0] for o in outputs].count)
    seconds = [o[1] for o in outputs if o[0] == first]
    target, tokenizer = load_model("tiny-shakespeare")
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    with torch.no_grad():
        logits = target(torch.tensor([ids + [first]]))[0, -1]
    p = next_token_probs(logits, SamplingParams(temperature=temperature, top_k=top_k), ids, [first], [])
    support = torch.nonzero(p).flatten().tolist()
    observed = [seconds.count(t) for t in support]
    assert sum(observed) == len(seconds) >= 300
    assert chi2_pvalue(observed, [float(p[t]) for t in support]) > 1e-3
