"""AsyncLLM and incremental detokenisation, in process: streams concatenate to the final text, concurrent
callers get the offline engine's answers, and leaving a stream early frees its blocks."""

import asyncio

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llminfer import LLM, SamplingParams
from llminfer.sampling import find_stop
from llminfer.serve import AsyncLLM, IncrementalDetokenizer
from llminfer.serve.async_llm import wait_idle

HARD_TEXTS = ["Hello 😀 world 🇯🇵!", "日本語のテキスト、そして中文。", "שלום עולם — مرحبا بالعالم",
              "a\n\nb\n\n\nc", "é" * 7]


@pytest.fixture(scope="module")
def llm():
    return LLM("tiny-shakespeare", device="cpu", num_kv_blocks=64, seed=0)


@pytest.fixture(scope="module")
def tokenizer(llm):
    return llm.get_tokenizer()


def stream_text(tokenizer, ids, chunks, stop=(), min_tokens=0):
    """Feed ids in the given chunk sizes as the engine would: it checks stop strings after every token and
    ends the request at the first that completes one, so the detokenizer sees only the ids before that.
    Returns (concatenated deltas, deltas, the engine's final text)."""
    final, end_at = tokenizer.decode(ids), len(ids)
    for k in range(max(min_tokens, 1), len(ids) + 1) if stop else ():
        cut, found = find_stop(tokenizer.decode(ids[:k]), stop, include=False)
        if found is not None:
            final, end_at = cut, k
            break
    detok = IncrementalDetokenizer(tokenizer, stop, min_tokens)
    deltas, end = [], 0
    for size in chunks:
        end = min(end + size, len(ids))
        if end >= end_at:
            break
        deltas.append(detok.update(ids[:end]))
    deltas.append(detok.finish(final))
    return "".join(deltas), deltas, final


@pytest.mark.parametrize("text", HARD_TEXTS)
def test_deltas_concatenate_to_the_text_with_multibyte_characters(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    joined, deltas, _ = stream_text(tokenizer, ids, [1] * len(ids))
    assert joined == text
    assert all("\ufffd" not in d for d in deltas), deltas   # half a character is never sent


@given(data=st.data())
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_any_ids_any_chunks_and_stop_strings(tokenizer, data):
    ids = data.draw(st.lists(st.integers(0, len(tokenizer) - 1), min_size=1, max_size=40))
    chunks = data.draw(st.lists(st.integers(1, 5), min_size=1, max_size=40))
    stop = data.draw(st.lists(st.sampled_from(["\n\n", "the", "😀", "e", ", and"]), max_size=2, unique=True))
    min_tokens = data.draw(st.integers(0, 6))
    joined, _, final = stream_text(tokenizer, ids, chunks, stop, min_tokens)
    assert joined == final


def test_a_stop_string_split_across_tokens_is_never_sent(tokenizer):
    ids = tokenizer.encode("First Citizen:\nSpeak, speak.\n\nAll:\nResolved.", add_special_tokens=False)
    joined, deltas, final = stream_text(tokenizer, ids, [1] * len(ids), stop=["\n\n"])
    assert joined == final == "First Citizen:\nSpeak, speak." and "\n\n" not in "".join(deltas)


def test_min_tokens_holds_text_until_stop_strings_count(tokenizer):
    ids = tokenizer.encode("a, b, c, d, e", add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, [","], min_tokens=len(ids))
    assert all(detok.update(ids[:i]) == "" for i in range(1, len(ids)))


def collect(engine, prompt, params, request_id=None):
    async def go():
        outputs = []
        async for out in engine.generate(prompt, params, request_id):
            outputs.append(out)
        return outputs
    return go()


def test_concurrent_streams_equal_the_offline_engine(llm):
    prompts = ["ROMEO:\n", "JULIET:\nO Romeo", "First Citizen:\n", "KING RICHARD III:\nNow is"]
    params = [SamplingParams(temperature=0, max_tokens=24), SamplingParams(temperature=0.8, seed=7, max_tokens=20,
                                                                            stop=["\n\n"]),
              SamplingParams(temperature=1.0, seed=3, max_tokens=16, n=2), SamplingParams(temperature=0, max_tokens=30)]
    expected = llm.generate(prompts, params, use_tqdm=False)
    engine = AsyncLLM.from_llm(llm)
    try:
        async def main():
            return await asyncio.gather(*[collect(engine, p, sp) for p, sp in zip(prompts, params)])
        streams = asyncio.run(main())
    finally:
        engine.shutdown()
    for want, outputs in zip(expected, streams):
        last = outputs[-1]
        assert last.finished and [o.finished for o in outputs].count(True) == 1
        for i, completion in enumerate(last.outputs):
            assert completion.token_ids == want.outputs[i].token_ids
            assert completion.text == want.outputs[i].text
            texts = [o.outputs[i].text for o in outputs]
            assert all(b.startswith(a) for a, b in zip(texts, texts[1:])), texts   # a stream only grows


def test_final_only_yields_one_finished_output(llm):
    engine = AsyncLLM.from_llm(llm)
    params = SamplingParams(temperature=0.8, seed=5, max_tokens=20, n=2, stop=["\n\n"])
    try:
        async def main():
            return [o async for o in engine.generate("ROMEO:\n", params, final_only=True)]
        outputs = asyncio.run(main())
    finally:
        engine.shutdown()
    expected = llm.generate("ROMEO:\n", params, use_tqdm=False)[0]
    assert len(outputs) == 1 and outputs[0].finished
    assert [c.text for c in outputs[0].outputs] == [c.text for c in expected.outputs]


def test_leaving_a_stream_early_aborts_it_and_frees_its_blocks(llm):
    engine = AsyncLLM.from_llm(llm)
    try:
        async def main():
            seen = 0
            async for _ in engine.generate("ROMEO:\n", SamplingParams(max_tokens=500, ignore_eos=True)):
                seen += 1
                if seen == 3:
                    break
            task = asyncio.create_task(collect(engine, "JULIET:\n", SamplingParams(max_tokens=500, ignore_eos=True)))
            await asyncio.sleep(0.2)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            return seen
        assert asyncio.run(main()) == 3
        assert wait_idle(llm.llm_engine)
        assert llm.llm_engine.pool.num_used_blocks == 0
    finally:
        engine.shutdown()


def test_bad_requests_fail_alone_and_the_engine_keeps_serving(llm):
    engine = AsyncLLM.from_llm(llm)
    try:
        async def main():
            good = asyncio.create_task(collect(engine, "ROMEO:\n", SamplingParams(temperature=0, max_tokens=8)))
            with pytest.raises(ValueError, match="prompt is not valid Unicode"):
                await collect(engine, "\ud800", SamplingParams())
            with pytest.raises(ValueError, match="stop_token_ids"):
                await collect(engine, "x", SamplingParams(stop_token_ids=[10**9]))
            bad = await collect(engine, {"prompt_token_ids": []}, SamplingParams())
            assert bad[-1].outputs[0].finish_reason == "error" and "empty" in bad[-1].error
            dup = asyncio.create_task(collect(engine, "a", SamplingParams(max_tokens=50, ignore_eos=True), "same"))
            await asyncio.sleep(0.05)
            with pytest.raises(ValueError, match="already running"):
                await collect(engine, "b", SamplingParams(), "same")
            assert (await dup)[-1].outputs[0].finish_reason == "length"   # the first "same" was not aborted
            return await good
        outputs = asyncio.run(main())
        with pytest.raises(RuntimeError, match="served by an AsyncLLM"):   # one engine, one driver
            llm.generate("ROMEO:\n", use_tqdm=False)
    finally:
        engine.shutdown()
    assert not engine.is_running
    offline = llm.generate("ROMEO:\n", SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)[0]
    assert outputs[-1].outputs[0].text == offline.outputs[0].text


def test_a_stopped_engine_says_so(llm):
    engine = AsyncLLM.from_llm(llm)
    engine.shutdown()
    with pytest.raises(RuntimeError, match="stopped"):
        asyncio.run(collect(engine, "x", SamplingParams()))


@pytest.fixture(scope="module")
def process_engine():
    engine = AsyncLLM.in_own_process("tiny-shakespeare", device="cpu", num_kv_blocks=64, seed=0)
    yield engine
    engine.shutdown()


def test_an_engine_in_its_own_process_answers_as_the_offline_one(process_engine, llm):
    prompts = ["ROMEO:\n", "JULIET:\nO Romeo", "First Citizen:\n"]
    params = [SamplingParams(temperature=0, max_tokens=24), SamplingParams(temperature=0.8, seed=7, max_tokens=20,
                                                                            stop=["\n\n"]),
              SamplingParams(temperature=1.0, seed=3, max_tokens=16, n=2)]
    expected = llm.generate(prompts, params, use_tqdm=False)

    async def main():
        streamed = await asyncio.gather(*[collect(process_engine, p, sp) for p, sp in zip(prompts, params)])
        final = []
        for p, sp in zip(prompts, params):
            final.append([o async for o in process_engine.generate(p, sp, final_only=True)])
        return streamed, final
    streamed, final = asyncio.run(main())
    for want, outputs, (last,) in zip(expected, streamed, final):
        assert [c.text for c in outputs[-1].outputs] == [c.text for c in want.outputs]
        assert [c.token_ids for c in last.outputs] == [c.token_ids for c in want.outputs]
    assert process_engine.max_model_len == llm.llm_engine.max_model_len


def test_an_engine_process_frees_aborted_requests_and_refuses_bad_ones(process_engine):
    async def main():
        async for _ in process_engine.generate("ROMEO:\n", SamplingParams(max_tokens=500, ignore_eos=True)):
            break
        with pytest.raises(ValueError, match="stop_token_ids"):
            await collect(process_engine, "x", SamplingParams(stop_token_ids=[10**9]))
        await asyncio.sleep(0.3)
    asyncio.run(main())
    stats = process_engine.last_stats
    assert stats.num_used_blocks == 0 and stats.num_running == 0
    assert process_engine.is_running


def test_callers_hear_when_the_engine_process_dies():
    engine = AsyncLLM.in_own_process("tiny-shakespeare", device="cpu", num_kv_blocks=64)

    async def main():
        task = asyncio.create_task(collect(engine, "ROMEO:\n", SamplingParams(max_tokens=900, ignore_eos=True)))
        await asyncio.sleep(0.5)
        engine._core._process.kill()
        with pytest.raises(RuntimeError, match="engine"):
            await asyncio.wait_for(task, 30)
    try:
        asyncio.run(main())
        assert not engine.is_running
        with pytest.raises(RuntimeError, match="stopped"):
            asyncio.run(collect(engine, "x", SamplingParams()))
    finally:
        engine.shutdown()
