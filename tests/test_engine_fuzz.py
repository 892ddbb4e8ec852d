"""Property-based test of the offline API: random, often extreme, sampling parameters and prompts against
one long-lived engine with a small KV pool (and another that also drafts with a model). Whatever comes in,
the instance survives, every request finishes or fails with a reason, every block comes back, and a fixed
greedy request run beside the random ones always gives the same tokens.

`make test` runs a bounded number of examples; `LLMINFER_FUZZ_EXAMPLES=5000 pytest tests/test_engine_fuzz.py`
runs a long campaign.
"""

import math
import os

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from llminfer import LLM, SamplingParams

EXAMPLES = int(os.environ.get("LLMINFER_FUZZ_EXAMPLES", "40"))
CONTEXT = 96
ANCHOR_PROMPT = "ROMEO:"
ANCHOR = SamplingParams(temperature=0, max_tokens=8)
REASONS = {"stop", "length", "error"}

# Values a careless or hostile caller might put in any field.
anything = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.integers(-3, 40),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([1e-40, 5e-324, -0.0, 1e308, 2.0, 0.5]),
    st.text(max_size=5), st.lists(st.integers(-5, 3000), max_size=4), st.lists(st.text(max_size=3), max_size=3),
)
# Values that are mostly valid, so that many requests reach the engine.
plausible = {
    "n": st.integers(1, 3), "temperature": st.sampled_from([0, 1e-40, 1e-3, 0.7, 1.0, 50.0, 1e30]),
    "top_p": st.sampled_from([1e-9, 0.3, 1.0]), "top_k": st.sampled_from([-1, 0, 1, 5, 10**9]),
    "min_p": st.sampled_from([0.0, 0.5, 1.0]), "seed": st.one_of(st.none(), st.sampled_from([-1, 0, 2**64 - 4])),
    "presence_penalty": st.sampled_from([-2.0, 0.0, 2.0]), "frequency_penalty": st.sampled_from([-2.0, 0.0, 2.0]),
    "repetition_penalty": st.sampled_from([1e-40, 0.5, 1.0, 1e30]), "max_tokens": st.sampled_from([None, 1, 5, 20]),
    "min_tokens": st.integers(0, 6), "logprobs": st.sampled_from([None, -1, 0, 3]),
    "prompt_logprobs": st.sampled_from([None, 0, 2]), "stop": st.sampled_from([None, "e", ["\n", "the"], "😀"]),
    "stop_token_ids": st.lists(st.integers(0, 2100), max_size=3), "ignore_eos": st.booleans(),
    "include_stop_str_in_output": st.booleans(),
}


@st.composite
def sampling_params(draw):
    """Mostly plausible SamplingParams; one in ten built with a wild field (then the ValueError it raised
    stands in for it), one in ten built valid and corrupted afterwards, which only submission can catch."""
    fields = {name: draw(strategy) for name, strategy in plausible.items() if draw(st.booleans())}
    if isinstance(fields.get("max_tokens"), int):
        fields["max_tokens"] = max(fields["max_tokens"], fields.get("min_tokens", 0))
    mode = draw(st.integers(0, 9))
    if mode == 0:
        fields[draw(st.sampled_from(sorted(plausible)))] = draw(anything)
    try:
        params = SamplingParams(**fields)
    except ValueError as exc:
        return exc
    if mode == 1:
        setattr(params, draw(st.sampled_from(sorted(plausible))), draw(anything))
    return params


prompts = st.one_of(
    st.text(max_size=40),                                                     # any unicode, empty included
    st.text(st.characters(codec=None, categories=["Cs", "Lo", "So"]), max_size=6),  # surrogates, CJK, emoji
    st.text(alphabet="abc ", min_size=300, max_size=400),                    # longer than the context
    st.builds(lambda ids: {"prompt_token_ids": ids}, st.lists(st.integers(-3, 2100), max_size=120)),
    st.builds(lambda ids: {"prompt_token_ids": ids}, st.lists(st.booleans(), max_size=3)),
    st.sampled_from([None, 3, b"bytes", {"text": "x"}, ["ROMEO"]]),
)


@pytest.fixture(scope="module", params=[None, {"model": "tiny-shakespeare-draft", "num_speculative_tokens": 3}],
                ids=["plain", "speculative"])
def fuzzed_llm(request):
    llm = LLM("tiny-shakespeare", num_kv_blocks=8, block_size=16, max_num_seqs=4, max_num_batched_tokens=64,
              max_model_len=CONTEXT, speculative_config=request.param)
    anchor = llm.generate(ANCHOR_PROMPT, ANCHOR, use_tqdm=False)[0].outputs[0].token_ids
    return llm, anchor


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(batch=st.lists(st.tuples(prompts, sampling_params()), min_size=1, max_size=4), anchor_at=st.integers(0, 4))
def test_no_request_can_break_the_engine(fuzzed_llm, batch, anchor_at):
    llm, anchor = fuzzed_llm
    engine = llm.llm_engine
    prompts_in = [p for p, _ in batch]
    params_in = [s for _, s in batch]
    position = min(anchor_at, len(batch))
    prompts_in.insert(position, ANCHOR_PROMPT)
    params_in.insert(position, ANCHOR)
    refused = None
    try:
        outputs = llm.generate(prompts_in, params_in, use_tqdm=False)
    except ValueError as exc:   # a malformed prompt or params: the whole batch is refused, naming which
        refused = str(exc)
    if refused is not None:
        event("refused: " + refused.split(":")[0 if not refused.startswith("prompts[") else 1].strip()[:40])
        bad_params = any(not isinstance(s, SamplingParams) for s in params_in)
        assert bad_params or refused.startswith("prompts["), refused
    else:
        assert len(outputs) == len(prompts_in)
        for output, params in zip(outputs, params_in):
            assert output.finished and len(output.outputs) == params.n
            for completion in output.outputs:
                assert completion.finish_reason in REASONS
                event(f"finish_reason={completion.finish_reason}")
                if completion.finish_reason == "error":
                    event("error: " + output.error[:30])
                    assert output.error, "a failed request must say why"
                else:
                    limit = params.max_tokens if params.max_tokens is not None else CONTEXT
                    assert 1 <= len(completion.token_ids) <= limit
                    assert all(0 <= t < llm.model.config.vocab_size for t in completion.token_ids)
                if completion.logprobs is not None:
                    assert all(math.isfinite(e.logprob) or e.logprob == -math.inf
                               for step in completion.logprobs for e in step.values())
        assert outputs[position].outputs[0].token_ids == anchor
    # Nothing left behind, whatever happened.
    assert not engine.requests and not engine._failed and not engine._samples and not engine._request_of
    assert not engine.scheduler.waiting and not engine.scheduler.running
    assert engine.pool.num_used_blocks == 0 and not llm._owned and not llm._done
