"""The Part I loop against transformers' generate(), and its limits."""

import pytest
import torch
from transformers import AutoModelForCausalLM

import llminfer
from llminfer.generate import generate_tokens
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


def test_prompt_longer_than_the_context_is_refused(shipped):
    model, _ = shipped
    too_long = [5] * model.config.max_position_embeddings
    with pytest.raises(ValueError, match=f"{len(too_long)} tokens"):
        list(generate_tokens(model, too_long, llminfer.SamplingParams()))


def test_generation_stops_at_the_context_limit(shipped):
    model, _ = shipped
    context = model.config.max_position_embeddings
    prompt = [5] * (context - 3)
    out = list(generate_tokens(model, prompt, llminfer.SamplingParams(temperature=0, max_tokens=50, ignore_eos=True)))
    assert len(prompt) + len(out) == context + 1   # the last token is produced by a pass over the full context
