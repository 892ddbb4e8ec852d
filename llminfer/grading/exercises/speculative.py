"""Chapter 17, speculative decoding: the verification step (rejection sampling), graded by statistical tests of
what comes out against the target's distribution, and n-gram prompt lookup, graded against the reference."""

from __future__ import annotations

import random
from numbers import Integral

import torch

from llminfer.grading.compare import Mismatch, seeded
from llminfer.grading.exercise import Exercise, ExerciseTest
from llminfer.grading.remote import call_each
from llminfer.spec import Draft, find_ngram_continuation, verify_draft

MIRRORS = ("llminfer.spec",)   # llminfer's own proposers and verifier are switched off while a test runs

CHAPTER = "chapters/optimization/17_speculative_decoding"
MIN_PVALUE = 1e-3   # a right answer fails a test with about this probability; the reference's seeds pass


def reference_verify(draft_tokens: list[int], draft_probs: torch.Tensor, target_probs: torch.Tensor,
                     generator: torch.Generator) -> list[int]:
    """The accepted drafts, then one more token: llminfer's `verify_draft` with the exercise's signature
    (draft_probs [k, vocab] is q, target_probs [k + 1, vocab] is p)."""
    return verify_draft(Draft(list(draft_tokens), draft_probs), lambda i: target_probs[i], False, generator)


def reference_ngram(token_ids: list[int], min_n: int, max_n: int, k: int) -> list[int]:
    return find_ngram_continuation(list(token_ids), min_n, max_n, k)


# --- verification ------------------------------------------------------------------------------------------------

def _distributions(vocab: int, k: int, seed: int, sharp: float = 2.0, mix: float = 0.0
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """p [k + 1, vocab] and q [k, vocab]: random, different, each with full support; q is `mix` parts p (so that
    drafts are kept more often) and the rest its own."""
    g = seeded(seed)
    p = (torch.randn(k + 1, vocab, generator=g) * sharp).softmax(-1)
    q = (torch.randn(k, vocab, generator=g) * sharp).softmax(-1)
    return p, mix * p[:k] + (1 - mix) * q


def _chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    from scipy.stats import chisquare

    probs = probs.double() / probs.double().sum()
    return float(chisquare(counts.double().numpy(), (counts.sum().double() * probs).numpy()).pvalue)


def _check_output(out: object, k: int, vocab: int) -> list[int]:
    if not isinstance(out, list) or not all(isinstance(t, Integral) and not isinstance(t, bool) for t in out):
        raise Mismatch(f"the result is a {type(out).__name__}, expected a list of token ids (ints)")
    if not 1 <= len(out) <= k + 1:
        raise Mismatch(f"the result has {len(out)} tokens; a verification gives 1 to k + 1 = {k + 1}")
    if not all(0 <= t < vocab for t in out):
        raise Mismatch(f"the result {out} holds a token id outside the vocabulary [0, {vocab})")
    return out


def _statistical(position: int, trials: int, vocab: int = 6, k: int = 2, seed: int = 0, mix: float = 0.0):
    """The token out at `position` (given that every draft before it was kept) must follow p[position]."""
    def run(verify) -> str:
        p, q = _distributions(vocab, k, seed, mix=mix)
        g = seeded(seed + 1)
        counts = torch.zeros(vocab)
        # All drafts first, then one batch of calls: the answer draws from its own copy of g's stream.
        drafts = torch.stack([torch.multinomial(q[i], trials, replacement=True, generator=g) for i in range(k)], 1)
        calls = [(row, q.clone(), p.clone(), g) for row in drafts.tolist()]
        for row, out in zip(drafts.tolist(), call_each(verify, calls), strict=True):
            out = _check_output(out, k, vocab)
            if len(out) > position and out[:position] == row[:position]:
                counts[out[position]] += 1
        if counts.sum() < trials / 20:
            raise Mismatch(f"only {int(counts.sum())} of {trials} verifications reached position {position}: "
                           "drafts are rejected far too often")
        pvalue = _chi2_pvalue(counts, p[position])
        if pvalue < MIN_PVALUE:
            observed = (counts / counts.sum()).tolist()
            raise Mismatch(f"token {position} out does not follow the target's distribution (chi-square p-value "
                           f"{pvalue:.1e}): observed {[round(x, 3) for x in observed]}, expected "
                           f"{[round(x, 3) for x in p[position].tolist()]}")
        return f"{int(counts.sum())} samples, chi-square p-value {pvalue:.2f}"

    return run


def _always_accepted(verify) -> str:
    """With p = q every ratio is 1: all k drafts are kept and a (k + 1)-th token is added."""
    p, _ = _distributions(5, 3, seed=7)
    g = seeded(8)
    drafts = [int(torch.multinomial(p[i], 1, generator=g)) for i in range(3)]
    out = _check_output(verify(drafts, p[:3].clone(), p.clone(), g), 3, 5)
    if out[:3] != drafts or len(out) != 4:
        raise Mismatch(f"with q equal to p every draft must be kept and one token added: drafts {drafts}, got {out}")
    return "all 3 kept, one added"


def _never_accepted(verify) -> str:
    """A draft the target gives zero probability is always rejected, and the replacement is never that token."""
    p, q = _distributions(5, 1, seed=9)
    p[0, 2] = 0.0
    p[0] /= p[0].sum()
    g = seeded(10)
    for out in call_each(verify, [([2], q.clone(), p.clone(), g)] * 50):
        out = _check_output(out, 1, 5)
        if out[0] == 2 or len(out) != 1:
            raise Mismatch(f"draft 2 has target probability 0: it must be rejected and replaced, got {out}")
    return "rejected 50 times out of 50"


def _inputs_untouched(verify) -> str:
    p, q = _distributions(5, 2, seed=11)
    p0, q0 = p.clone(), q.clone()
    verify([1, 3], q, p, seeded(12))
    if not (torch.equal(p, p0) and torch.equal(q, q0)):
        raise Mismatch("the probability tensors were changed in place")
    return "inputs unchanged"


VERIFY_TESTS = (
    ExerciseTest("the first token out follows p[0] (6 tokens, k = 2, 6000 trials)", 3, _statistical(0, 6000)),
    ExerciseTest("after a kept draft, the second follows p[1]", 3, _statistical(1, 8000)),
    ExerciseTest("after k kept drafts, the bonus token follows p[k]", 2, _statistical(2, 8000, seed=3, mix=0.7)),
    ExerciseTest("q = p: every draft kept, one token added", 1, _always_accepted),
    ExerciseTest("a draft with target probability 0 is always replaced", 1, _never_accepted),
    ExerciseTest("the inputs are not modified", 1, _inputs_untouched, visible=False),
    ExerciseTest("another draw: 12 tokens, k = 3", 2, _statistical(0, 8000, vocab=12, k=3, seed=5), visible=False),
)


# --- n-gram lookup -----------------------------------------------------------------------------------------------

def _ngram_test(tokens: list[int], min_n: int, max_n: int, k: int):
    def run(ngram_draft) -> str:
        expected = reference_ngram(tokens, min_n, max_n, k)
        got = ngram_draft(list(tokens), min_n, max_n, k)
        if not isinstance(got, list) or not all(isinstance(t, Integral) for t in got):
            raise Mismatch(f"the result is a {type(got).__name__}, expected a list of token ids")
        if got != expected:
            raise Mismatch(f"for tokens {tokens[-12:]} (last 12), n in [{min_n}, {max_n}], k={k}: got {got}, "
                           f"expected {expected}")
        return f"{expected}"

    return run


def _random_ngram_tests(seed: int, count: int) -> tuple[list, ...]:
    rng = random.Random(seed)
    cases = []
    for _ in range(count):
        tokens = [rng.randrange(4) for _ in range(rng.randrange(1, 40))]
        low = rng.randint(1, 3)
        cases.append((tokens, low, low + rng.randint(0, 2), rng.randint(1, 5)))
    return cases


def _many(cases):
    def run(ngram_draft) -> str:
        for case in cases:
            _ngram_test(*case)(ngram_draft)
        return f"{len(cases)} sequences"

    return run


NGRAM_TESTS = (
    ExerciseTest("vLLM's example: [1, 2, 3, 4, 2, 3], n in [2, 3], k=4 gives [4, 2, 3]", 2,
                 _ngram_test([1, 2, 3, 4, 2, 3], 2, 3, 4)),
    ExerciseTest("no earlier occurrence: no draft", 1, _ngram_test([1, 2, 3, 4, 5, 6], 1, 3, 4)),
    ExerciseTest("the longest suffix wins over a shorter one", 2, _ngram_test([7, 8, 9, 1, 9, 5, 7, 8, 9], 1, 3, 2)),
    ExerciseTest("the earliest occurrence wins", 2, _ngram_test([5, 6, 1, 5, 6, 2, 5, 6], 2, 2, 1)),
    ExerciseTest("n-grams shorter than min_n do not count", 1, _ngram_test([1, 2, 3, 2], 2, 3, 2)),
    ExerciseTest("n-grams longer than max_n are not looked for", 1,
                 _ngram_test([1, 2, 3, 4, 9, 2, 3, 4, 8, 1, 2, 3, 4], 2, 3, 2)),
    ExerciseTest("fewer than k tokens follow the match", 1, _ngram_test([3, 4, 5, 3, 4], 2, 2, 6)),
    ExerciseTest("40 random sequences over 4 tokens", 2, _many(_random_ngram_tests(1, 40)), visible=False),
)

EXERCISES = [
    Exercise("spec_verify", "the verification step of speculative decoding", CHAPTER, "verify_tokens",
             reference_verify, VERIFY_TESTS, timeout=30.0, mirrors=MIRRORS),
    Exercise("ngram_lookup", "n-gram prompt lookup", CHAPTER, "ngram_draft", reference_ngram, NGRAM_TESTS,
             mirrors=MIRRORS),
]
