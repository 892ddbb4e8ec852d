"""The Part I loop against transformers' generate(), and its limits."""

import pytest
import torch
from transformers import AutoModelForCausalLM

import llminfer
from llminfer.generate import generate_tokens, generate_tokens_no_cache
from llminfer.models.registry import SHIPPED


@pytest.fixture(scope="module")
def shipped():
    return llminfer.load_model("tiny-shakespeare", device="cpu")


def test_greedy_tokens_equal_transformers_generate(shipped):
    model, tokenizer = shipped
    hf = AutoModelForCausalLM.from_pretrained(SHIPPED["tiny-shakespeare"], dtype=torch.float32).eval()
    for prompt in ("ROMEO:", "First Citizen:\nBefore we proceed", "O"):
        ids = tokenizer.encode(prompt)
        ours = list(generate_tokens(model, ids, llminfer.SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)))
        theirs = hf.generate(torch.tensor([ids]), max_new_tokens=40, do_sample=False, min_new_tokens=40,
                             pad_token_id=tokenizer.eos_token_id)[0, len(ids):].tolist()
        assert ours == theirs


def test_generate_returns_text_and_reason(shipped):
    model, tokenizer = shipped
    out = llminfer.generate(model, tokenizer, "ROMEO:", llminfer.SamplingParams(temperature=0, max_tokens=12))
    assert len(out.token_ids) == 12 and out.finish_reason == "length"
    assert out.text == tokenizer.decode(out.token_ids)
    assert out.prompt_token_ids == tokenizer.encode("ROMEO:")


def test_stop_token_ends_generation(shipped):
    model, tokenizer = shipped
    greedy = llminfer.generate(model, tokenizer, "ROMEO:", llminfer.SamplingParams(temperature=0, max_tokens=12))
    stop_at = greedy.token_ids[4]
    params = llminfer.SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[stop_at])
    out = llminfer.generate(model, tokenizer, "ROMEO:", params)
    first = greedy.token_ids.index(stop_at)
    assert out.token_ids == greedy.token_ids[: first + 1] and out.finish_reason == "stop"
    assert out.text == tokenizer.decode(greedy.token_ids[:first])


def test_seeded_sampling_is_reproducible(shipped):
    model, tokenizer = shipped
    params = llminfer.SamplingParams(temperature=1.0, top_p=0.9, seed=7, max_tokens=20)
    a = llminfer.generate(model, tokenizer, "ROMEO:", params).token_ids
    torch.rand(10)
    b = llminfer.generate(model, tokenizer, "ROMEO:", params).token_ids
    c = llminfer.generate(model, tokenizer, "ROMEO:", llminfer.SamplingParams(temperature=1.0, top_p=0.9, seed=8,
                                                                                max_tokens=20)).token_ids
    assert a == b and a != c


def test_empty_prompt_is_refused(shipped):
    model, tokenizer = shipped
    with pytest.raises(ValueError, match="prompt is empty"):
        llminfer.generate(model, tokenizer, "", llminfer.SamplingParams())


LOOPS = [generate_tokens, generate_tokens_no_cache]


@pytest.mark.parametrize("loop", LOOPS)
def test_prompt_longer_than_the_context_is_refused(shipped, loop):
    model, _ = shipped
    too_long = [5] * model.config.max_position_embeddings
    with pytest.raises(ValueError, match=f"{len(too_long)} tokens"):
        list(loop(model, too_long, llminfer.SamplingParams()))


@pytest.mark.parametrize("loop", LOOPS)
def test_generation_stops_at_the_context_limit(shipped, loop):
    model, _ = shipped
    context = model.config.max_position_embeddings
    prompt = [5] * (context - 3)
    out = list(loop(model, prompt, llminfer.SamplingParams(temperature=0, max_tokens=50, ignore_eos=True)))
    assert len(prompt) + len(out) == context + 1   # the last token is produced by a pass over the full context


def test_stop_string_cuts_the_text(shipped):
    model, tokenizer = shipped
    full = llminfer.generate(model, tokenizer, "ROMEO:", llminfer.SamplingParams(temperature=0, max_tokens=40))
    stop = full.text[5:8]
    cut = full.text.index(stop)
    for include in (False, True):
        params = llminfer.SamplingParams(temperature=0, max_tokens=40, stop=[stop], include_stop_str_in_output=include)
        out = llminfer.generate(model, tokenizer, "ROMEO:", params)
        assert out.finish_reason == "stop"
        assert out.text == full.text[: cut + (len(stop) if include else 0)]
        assert out.token_ids == full.token_ids[: len(out.token_ids)] and len(out.token_ids) < 40


def test_min_tokens_holds_back_a_stop_token(shipped):
    model, tokenizer = shipped
    first = llminfer.generate(model, tokenizer, "ROMEO:", llminfer.SamplingParams(temperature=0, max_tokens=1))
    params = llminfer.SamplingParams(temperature=0, max_tokens=5, min_tokens=3, stop_token_ids=first.token_ids)
    out = llminfer.generate(model, tokenizer, "ROMEO:", params)
    assert first.token_ids[0] not in out.token_ids[:3]


def test_logprobs_describe_the_model_distribution(shipped):
    model, tokenizer = shipped
    params = llminfer.SamplingParams(temperature=0.8, seed=3, max_tokens=6, logprobs=3, prompt_logprobs=2)
    out = llminfer.generate(model, tokenizer, "ROMEO:\nI will", params)
    with torch.no_grad():
        logits = model(torch.tensor([out.prompt_token_ids + out.token_ids]))[0]
    reference = torch.log_softmax(logits.float(), -1)
    p = len(out.prompt_token_ids)
    assert len(out.logprobs) == len(out.token_ids) == 6
    for i, (token, entry) in enumerate(zip(out.token_ids, out.logprobs)):
        assert token in entry and len(entry) in (3, 4)
        assert entry[token].logprob == pytest.approx(reference[p - 1 + i, token].item(), abs=1e-4)
        assert entry[token].rank == 1 + int((reference[p - 1 + i] > reference[p - 1 + i, token]).sum())
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == p
    for t in range(1, p):
        token = out.prompt_token_ids[t]
        assert out.prompt_logprobs[t][token].logprob == pytest.approx(reference[t - 1, token].item(), abs=1e-4)


def test_n_above_one_is_for_the_engine(shipped):
    model, tokenizer = shipped
    with pytest.raises(ValueError, match="n=2"):
        llminfer.generate(model, tokenizer, "ROMEO:", llminfer.SamplingParams(n=2))
