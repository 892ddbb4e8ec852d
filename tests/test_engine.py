"""The engine against Part I's loop (the reference), and its behaviour on bad input, abort and memory."""

import pytest
import torch

from llminfer import LLM, SamplingParams, generate, load_model
from llminfer.engine import LLMEngine

PROMPTS = ["ROMEO:", "To be, or not to be", "JULIET:\nO Romeo, Romeo", "First Citizen:\nBefore we proceed any further",
           "KING"]


@pytest.fixture(scope="module")
def model_and_tokenizer():
    return load_model("tiny-shakespeare", device="cpu", dtype=torch.float32)


def engine(model_and_tokenizer, **kwargs) -> LLMEngine:
    return LLMEngine(*model_and_tokenizer, **{"max_model_len": 256, **kwargs})


def run(eng: LLMEngine, prompts, params) -> list:
    params = params if isinstance(params, list) else [params] * len(prompts)
    ids = [eng.add_request(None, p, sp) for p, sp in zip(prompts, params)]
    done = {}
    while eng.has_unfinished_requests():
        done.update((o.request_id, o) for o in eng.step() if o.finished)
    return [done[i] for i in ids]


def assert_same_or_near_tie(model, prompt_ids, got, want, gap=1e-3):
    """Token lists are equal, or the first difference is a near-tie of the two candidates' logits (batching
    changes the order of floating-point sums, which may flip a tie)."""
    if got == want:
        return
    i = next(i for i, (a, b) in enumerate(zip(got, want)) if a != b)
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + want[:i]]))[0, -1]
    assert abs(logits[got[i]] - logits[want[i]]) < gap, f"outputs differ at token {i} without a near-tie"


@pytest.mark.parametrize("max_num_batched_tokens", [2048, 7])   # 7 forces chunked prefill
def test_greedy_outputs_equal_part_one(model_and_tokenizer, max_num_batched_tokens):
    model, tokenizer = model_and_tokenizer
    params = SamplingParams(temperature=0, max_tokens=24)
    outputs = run(engine(model_and_tokenizer, max_num_batched_tokens=max_num_batched_tokens), PROMPTS, params)
    for prompt, out in zip(PROMPTS, outputs):
        reference = generate(model, tokenizer, prompt, params)
        assert_same_or_near_tie(model, reference.prompt_token_ids, out.outputs[0].token_ids, reference.token_ids)
        if out.outputs[0].token_ids == reference.token_ids:
            assert out.outputs[0].text == reference.text
        assert out.outputs[0].finish_reason == reference.finish_reason and out.prompt == prompt


def test_seeded_sampling_stop_strings_and_logprobs_equal_part_one(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    params = [SamplingParams(temperature=0.9, top_p=0.9, seed=i, max_tokens=20, logprobs=3, prompt_logprobs=2,
                             stop=["\n\n"], repetition_penalty=1.1) for i in range(len(PROMPTS))]
    outputs = run(engine(model_and_tokenizer, max_num_batched_tokens=9), PROMPTS, params)
    for prompt, sp, out in zip(PROMPTS, params, outputs):
        reference = generate(model, tokenizer, prompt, sp)
        completion = out.outputs[0]
        assert completion.token_ids == reference.token_ids and completion.text == reference.text
        assert completion.finish_reason == reference.finish_reason
        if completion.finish_reason == "stop":
            assert completion.stop_reason == "\n\n"
        for got, want in zip(completion.logprobs + out.prompt_logprobs[1:],
                             reference.logprobs + reference.prompt_logprobs[1:]):
            assert got.keys() == want.keys()
            assert all(abs(got[t].logprob - want[t].logprob) < 1e-4 and got[t].rank == want[t].rank for t in got)
        assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(out.prompt_token_ids)
        assert completion.cumulative_logprob == pytest.approx(
            sum(step[t].logprob for step, t in zip(completion.logprobs, completion.token_ids)))


def test_prefix_caching_reuses_blocks_and_changes_nothing(model_and_tokenizer):
    system = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
    prompts = [system + s for s in ("ROMEO:", "JULIET:", "KING RICHARD:")]
    params = SamplingParams(temperature=0, max_tokens=12)
    cached_engine = engine(model_and_tokenizer, block_size=4)
    first = run(cached_engine, prompts[:1], params)
    rest = run(cached_engine, prompts[1:], params)
    plain = run(engine(model_and_tokenizer, block_size=4, enable_prefix_caching=False), prompts, params)
    assert [o.outputs[0].token_ids for o in first + rest] == [o.outputs[0].token_ids for o in plain]
    assert first[0].num_cached_tokens == 0
    assert all(o.num_cached_tokens >= 20 for o in rest) and all(o.num_cached_tokens == 0 for o in plain)
    hits = [n for record in cached_engine.trace for n in record.prefix_hits.values()]
    assert max(hits) == rest[0].num_cached_tokens


def test_llm_api_matches_vllm_shape_and_keeps_input_order(model_and_tokenizer):
    llm = LLM("tiny-shakespeare", max_model_len=128)
    prompt_ids = llm.get_tokenizer().encode("ROMEO:", add_special_tokens=False)
    outputs = llm.generate(["KING", {"prompt_token_ids": prompt_ids}, "To be"],
                           SamplingParams(temperature=0, max_tokens=5), use_tqdm=False)
    assert [o.prompt for o in outputs] == ["KING", None, "To be"]
    assert outputs[1].prompt_token_ids == prompt_ids
    assert all(len(o.outputs[0].token_ids) == 5 and o.finished and o.outputs[0].finish_reason == "length"
               for o in outputs)
    single = llm.generate("KING", SamplingParams(temperature=0, max_tokens=5), use_tqdm=False)
    assert single[0].outputs[0].token_ids == outputs[0].outputs[0].token_ids
    mixed = llm.generate(["KING", "To be"], [SamplingParams(n=2, seed=1, max_tokens=5), SamplingParams(max_tokens=5)],
                         use_tqdm=False)
    assert [len(o.outputs) for o in mixed] == [2, 1] and [o.prompt for o in mixed] == ["KING", "To be"]


def test_bad_prompts_fail_their_request_and_the_others_complete(model_and_tokenizer):
    eng = engine(model_and_tokenizer, max_model_len=32)
    outputs = run(eng, ["ROMEO:", "word " * 40, "", {"prompt_token_ids": [5, 10**6]}],
                  SamplingParams(temperature=0, max_tokens=4))
    assert outputs[0].outputs[0].finish_reason == "length" and outputs[0].error is None
    assert [o.outputs[0].finish_reason for o in outputs[1:]] == ["error"] * 3
    assert "max_model_len" not in outputs[1].error and "context is 32" in outputs[1].error
    assert "empty" in outputs[2].error and "1000000" in outputs[3].error
    assert eng.pool.num_free_blocks == eng.pool.num_blocks


@pytest.mark.parametrize("params, match", [
    ("greedy", "must be a SamplingParams"),
    ({"temperature": 0}, "must be a SamplingParams"),
])
def test_invalid_parameters_fail_at_submission(model_and_tokenizer, params, match):
    with pytest.raises(ValueError, match=match):
        engine(model_and_tokenizer).add_request(None, "ROMEO:", params)


def test_parallel_sampling_gives_n_completions_each_equal_to_part_one_with_seed_plus_i(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    params = SamplingParams(n=3, temperature=1.0, top_p=0.95, seed=7, max_tokens=12, logprobs=1, stop=["\n\n"])
    # Chunked prefill (budget 5) and a pool of 8 blocks of 4, one request's worth: the three samples chunk and
    # preempt each other.
    eng = engine(model_and_tokenizer, max_num_batched_tokens=5, num_kv_blocks=8, block_size=4, max_model_len=32)
    [out] = run(eng, ["JULIET:\nO Romeo, Romeo"], params)
    assert any(record.preempted for record in eng.trace)
    assert out.finished and [c.index for c in out.outputs] == [0, 1, 2]
    for i, completion in enumerate(out.outputs):
        one = SamplingParams(temperature=1.0, top_p=0.95, seed=7 + i, max_tokens=12, logprobs=1, stop=["\n\n"])
        reference = generate(model, tokenizer, "JULIET:\nO Romeo, Romeo", one)
        assert completion.token_ids == reference.token_ids and completion.text == reference.text
        assert completion.finish_reason == reference.finish_reason
    assert len({tuple(c.token_ids) for c in out.outputs}) == 3     # different seeds, different samples
    assert eng.pool.num_free_blocks == eng.pool.num_blocks and not eng._samples and not eng._request_of


def test_parallel_sampling_streams_one_output_per_request_and_shares_the_prompt(model_and_tokenizer):
    eng = engine(model_and_tokenizer, max_num_seqs=1)   # one sample at a time: later ones hit the prefix cache
    prompt = {"prompt_token_ids": list(range(1, 41))}  # 40 tokens: 2 full blocks of 16
    request_id = eng.add_request("r", prompt, SamplingParams(n=3, temperature=0, max_tokens=4))
    seen = []
    while eng.has_unfinished_requests():
        for output in eng.step():
            assert output.request_id == request_id and len(output.outputs) == 3
            seen.append(output)
    assert [o.finished for o in seen] == [False] * (len(seen) - 1) + [True]
    final = seen[-1]
    assert len({tuple(c.token_ids) for c in final.outputs}) == 1   # greedy: n identical completions
    assert sum(len(o.new_token_ids) for o in seen) == 3 * 4
    hits = [hit for record in eng.trace for hit in record.prefix_hits.items()]
    assert ("1_r", 32) in hits and ("2_r", 32) in hits and final.metrics.finished_time is not None


def test_reset_prefix_cache_forgets_every_prefix_and_waits_for_running_requests(model_and_tokenizer):
    eng = engine(model_and_tokenizer)
    prompt = {"prompt_token_ids": list(range(1, 41))}    # 2 full blocks of 16
    params = SamplingParams(temperature=0, max_tokens=3)
    first = run(eng, [prompt], params)
    assert run(eng, [prompt], params)[0].num_cached_tokens == 32
    eng.add_request("busy", prompt, params)
    eng.step()
    assert eng.reset_prefix_cache() is False             # a running request holds blocks
    while eng.has_unfinished_requests():
        eng.step()
    assert eng.reset_prefix_cache() is True and not eng.pool.cached
    again = run(eng, [prompt], params)[0]
    assert again.num_cached_tokens == 0 and again.outputs[0].token_ids == first[0].outputs[0].token_ids


def test_parallel_sampling_abort_bad_prompts_and_ids(model_and_tokenizer):
    eng = engine(model_and_tokenizer, max_model_len=32)
    eng.add_request("a", "ROMEO:", SamplingParams(n=4, max_tokens=50, ignore_eos=True))
    eng.add_request("b", "word " * 40, SamplingParams(n=2))           # too long: both samples fail
    with pytest.raises(ValueError, match="'a' is already running"):
        eng.add_request("a", "KING", SamplingParams(n=2))
    with pytest.raises(ValueError, match="'1_a' is already running"):
        eng.add_request("1_a", "KING")
    first = {o.request_id: o for o in eng.step()}
    assert first["b"].finished and [c.finish_reason for c in first["b"].outputs] == ["error"] * 2
    assert "context is 32" in first["b"].error
    eng.abort("a")
    last = {o.request_id: o for o in eng.step()}
    assert not eng.has_unfinished_requests() and eng.pool.num_free_blocks == eng.pool.num_blocks
    assert "a" not in last and not eng._samples and not eng._request_of   # nothing reported, nothing kept


def test_llm_generate_refuses_a_malformed_batch_before_running_anything(model_and_tokenizer):
    llm = LLM("tiny-shakespeare", max_model_len=64)
    with pytest.raises(ValueError, match=r"2 sampling params for 1 prompts"):
        llm.generate(["a"], [SamplingParams(), SamplingParams()])
    with pytest.raises(ValueError, match=r"prompts\[1\]"):
        llm.generate(["a", 42], use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()
    with pytest.raises(ValueError, match="dtype"):
        LLM("tiny-shakespeare", dtype="float8")


def test_a_pool_too_small_for_one_request_is_refused_at_construction(model_and_tokenizer):
    with pytest.raises(ValueError, match=r"4 blocks x 16 tokens holds 64 tokens, less than one request"):
        engine(model_and_tokenizer, num_kv_blocks=4, max_model_len=100)
    with pytest.raises(ValueError, match="max_model_len=5000 exceeds"):
        engine(model_and_tokenizer, max_model_len=5000)
    with pytest.raises(ValueError, match="max_num_seqs must be a positive int, got 0"):
        engine(model_and_tokenizer, max_num_seqs=0)
    with pytest.raises(ValueError, match="not both"):
        engine(model_and_tokenizer, num_kv_blocks=64, kv_cache_memory_bytes=10**6)


def test_memory_budget_sets_the_number_of_blocks(model_and_tokenizer):
    model, _ = model_and_tokenizer
    cfg = model.config
    per_block = 2 * cfg.num_layers * 16 * cfg.num_kv_heads * cfg.head_dim * 4   # K and V, fp32
    eng = engine(model_and_tokenizer, kv_cache_memory_bytes=40 * per_block + per_block // 2)
    assert eng.pool.num_blocks == 40 and eng.kv_cache.nbytes == 40 * per_block


def test_abort_returns_blocks_and_the_rest_finish(model_and_tokenizer):
    eng = engine(model_and_tokenizer)
    ids = [eng.add_request(None, p, SamplingParams(temperature=0, max_tokens=30)) for p in PROMPTS]
    for _ in range(3):
        eng.step()
    assert eng.pool.num_used_blocks > 0
    eng.abort(ids[1])
    eng.abort(ids[3])
    eng.abort("no such request")
    finished = {}
    while eng.has_unfinished_requests():
        finished.update((o.request_id, o) for o in eng.step() if o.finished)
    assert set(finished) == {ids[0], ids[2], ids[4]}
    assert eng.pool.num_free_blocks == eng.pool.num_blocks and all(b.ref_count == 0 for b in eng.pool.blocks)


def test_the_trace_records_every_step(model_and_tokenizer):
    eng = engine(model_and_tokenizer, max_num_batched_tokens=8)
    run(eng, PROMPTS[:3], SamplingParams(temperature=0, max_tokens=3))
    assert all(sum(r.scheduled.values()) <= 8 for r in eng.trace)
    assert [r.step for r in eng.trace] == list(range(len(eng.trace)))
    assert sum(len(r.finished) for r in eng.trace) == 3
    computed = sum(sum(r.scheduled.values()) for r in eng.trace)
    prompt_tokens = sum(len(model_and_tokenizer[1].encode(p)) for p in PROMPTS[:3])
    assert computed == prompt_tokens + 3 * 2   # each prompt once, then 2 decodes (the 3rd token is not fed back)


def test_a_step_that_only_prefills_a_chunk_samples_nothing(model_and_tokenizer):
    eng = engine(model_and_tokenizer, max_num_batched_tokens=8)
    eng.add_request(None, {"prompt_token_ids": list(range(1, 21))}, SamplingParams(temperature=0, max_tokens=2))
    assert eng.step() == [] and eng.trace[-1].scheduled == {"0": 8}
    outputs = []
    while eng.has_unfinished_requests():
        outputs += eng.step()
    assert len(outputs[-1].outputs[0].token_ids) == 2 and len(eng.trace) == 4   # 8 + 8 + 4 tokens, then a decode
