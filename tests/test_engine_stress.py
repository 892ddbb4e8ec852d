"""1,000 requests of random lengths and mixed sampling on a KV pool small enough to preempt often:
everything finishes, nothing changes with memory pressure or prefix caching, every block comes back."""

import random

import pytest
import torch

from llminfer import SamplingParams, load_model
from llminfer.engine import LLMEngine

NUM_REQUESTS = 1000
MAX_MODEL_LEN = 64


@pytest.fixture(scope="module")
def model_and_tokenizer():
    return load_model("tiny-shakespeare-draft", device="cpu", dtype=torch.float32)


def workload(vocab: int):
    rng = random.Random(1234)
    shared = [rng.randrange(vocab) for _ in range(16)]  # a "system prompt" a third of the requests share
    requests = []
    for i in range(NUM_REQUESTS):
        prompt_len = rng.randint(1, 40)
        prompt = (shared + [rng.randrange(vocab) for _ in range(prompt_len)])[:prompt_len] if i % 3 == 0 else \
            [rng.randrange(vocab) for _ in range(prompt_len)]
        max_tokens = rng.randint(1, MAX_MODEL_LEN - prompt_len)
        kind = rng.choice(["greedy", "seeded", "stop"])
        if kind == "greedy":
            params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        elif kind == "seeded":
            params = SamplingParams(temperature=0.8, top_p=0.95, seed=i, max_tokens=max_tokens)
        else:
            params = SamplingParams(temperature=0, max_tokens=max_tokens, stop=["e", "\n"])
        requests.append(({"prompt_token_ids": prompt}, params))
    return requests


def run(model, tokenizer, requests, **kwargs):
    eng = LLMEngine(model, tokenizer, block_size=4, max_model_len=MAX_MODEL_LEN, **kwargs)
    ids = [eng.add_request(None, prompt, params) for prompt, params in requests]
    done = {}
    while eng.has_unfinished_requests():
        done.update((o.request_id, o) for o in eng.step() if o.finished)
    assert eng.pool.num_free_blocks == eng.pool.num_blocks and all(b.ref_count == 0 for b in eng.pool.blocks)
    return [done[i] for i in ids], eng


def near_tie(model, prompt_ids, got, want, gap=1e-3) -> bool:
    i = next(i for i, (a, b) in enumerate(zip(got, want)) if a != b)
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + want[:i]]))[0, -1]
    return abs(float(logits[got[i]] - logits[want[i]])) < gap


def assert_same_outputs(model, requests, first, second, what: str) -> int:
    """Outputs are equal, or differ only for greedy requests at a near-tie; returns how many differ."""
    differences = 0
    for (prompt, params), a, b in zip(requests, first, second):
        got, want = a.outputs[0].token_ids, b.outputs[0].token_ids
        if got != want:
            differences += 1
            assert params.temperature == 0 and near_tie(model, prompt["prompt_token_ids"], got, want), \
                f"{what}: request {a.request_id} differs without a near-tie: {got} vs {want}"
        assert len(got) <= params.max_tokens
    assert differences <= NUM_REQUESTS // 100, f"{what}: {differences} requests differ"
    return differences


@pytest.mark.slow
def test_stress_preemption_and_prefix_caching_change_no_output(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    requests = workload(model.config.vocab_size)
    # 24 blocks of 4 tokens: 96 slots for up to 32 running requests of up to 64 tokens.
    limits = dict(max_num_seqs=32, max_num_batched_tokens=128)
    tight, tight_engine = run(model, tokenizer, requests, num_kv_blocks=24, **limits)
    tight_uncached, _ = run(model, tokenizer, requests, num_kv_blocks=24, enable_prefix_caching=False, **limits)
    ample, ample_engine = run(model, tokenizer, requests, num_kv_blocks=1024, **limits)
    preemptions = sum(len(r.preempted) for r in tight_engine.trace)
    hits = sum(n for r in tight_engine.trace for n in r.prefix_hits.values())
    assert preemptions >= 100, f"only {preemptions} preemptions: the pool is not tight enough"
    assert not any(r.preempted for r in ample_engine.trace)
    assert hits > 0
    assert all(o.finished and o.outputs[0].finish_reason in ("stop", "length") for o in tight)
    assert_same_outputs(model, requests, tight, ample, "small pool vs ample pool")
    assert_same_outputs(model, requests, tight, tight_uncached, "prefix caching on vs off")
