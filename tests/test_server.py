"""`llminfer serve` as a subprocess on a loopback port, driven by the official `openai` client and raw HTTP:
answers equal the offline engine's, streams are exact, bad requests are 4xx, disconnects free their
blocks, /metrics parses, SIGTERM drains. Every loop here is bounded in count and time."""

import asyncio
import json
import signal
import time

import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from llminfer import LLM, SamplingParams
from llminfer.serve.launch import ServerProcess

MODEL = "tiny-shakespeare"
PROMPTS = ["ROMEO:\n", "JULIET:\nO Romeo, Romeo", "First Citizen:\nBefore we proceed", "KING HENRY:\n"]


@pytest.fixture(scope="module")
def server():
    process = ServerProcess(MODEL, "--device", "cpu", "--num-kv-blocks", "256")
    yield process.url
    assert process.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="none", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def llm():
    return LLM(MODEL, device="cpu", seed=0)


def metrics(url: str) -> dict[str, float]:
    values = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text):
        for sample in family.samples:
            values[sample.name] = values.get(sample.name, 0.0) + sample.value
    return values


def wait_until_idle(url: str, timeout: float = 15) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(url)
        if m["vllm:num_requests_running"] == 0 and m["vllm:kv_cache_usage_perc"] == 0:
            return m
        if time.monotonic() > deadline:
            return m
        time.sleep(0.1)


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(f"{server}/health").status_code == 200


def test_completions_equal_the_offline_engine(client, llm):
    cases = [dict(temperature=0, max_tokens=20), dict(temperature=0.9, top_p=0.9, seed=11, max_tokens=24),
             dict(temperature=1.0, seed=5, max_tokens=12, stop=["\n\n", "!"]),
             dict(temperature=0.7, seed=3, max_tokens=16, presence_penalty=0.5, frequency_penalty=0.3)]
    for case in cases:
        response = client.completions.create(model=MODEL, prompt=PROMPTS, **case)
        params = SamplingParams(**case)
        expected = llm.generate(PROMPTS, params, use_tqdm=False)
        assert [c.text for c in sorted(response.choices, key=lambda c: c.index)] == [o.outputs[0].text for o in
                                                                                     expected]
        assert response.usage.completion_tokens == sum(len(o.outputs[0].token_ids) for o in expected)
        assert response.usage.prompt_tokens == sum(len(o.prompt_token_ids) for o in expected)


def test_n_extras_and_token_id_prompts(client, llm):
    response = client.completions.create(model=MODEL, prompt="ROMEO:\n", n=3, seed=4, max_tokens=10,
                                         extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.2,
                                                     "ignore_eos": True, "min_tokens": 10})
    expected = llm.generate("ROMEO:\n", SamplingParams(n=3, seed=4, max_tokens=10, top_k=20, min_p=0.05,
                                                       repetition_penalty=1.2, ignore_eos=True, min_tokens=10),
                            use_tqdm=False)[0]
    assert [c.text for c in response.choices] == [c.text for c in expected.outputs]
    ids = llm.get_tokenizer().encode("ROMEO:\n", add_special_tokens=False)
    by_ids = client.completions.create(model=MODEL, prompt=ids, temperature=0, max_tokens=8)
    by_text = client.completions.create(model=MODEL, prompt="ROMEO:\n", temperature=0, max_tokens=8, echo=True)
    assert by_text.choices[0].text == "ROMEO:\n" + by_ids.choices[0].text


def test_logprobs_match_the_engine(client, llm):
    response = client.completions.create(model=MODEL, prompt="ROMEO:\n", temperature=0, max_tokens=6, logprobs=3)
    expected = llm.generate("ROMEO:\n", SamplingParams(temperature=0, max_tokens=6, logprobs=3), use_tqdm=False)[0]
    lp = response.choices[0].logprobs
    want = expected.outputs[0]
    assert lp.token_logprobs == pytest.approx([step[t].logprob for step, t in zip(want.logprobs, want.token_ids)])
    assert "".join(lp.tokens) == want.text
    assert all(len(top) == 3 for top in lp.top_logprobs)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]


def test_streams_concatenate_to_the_whole_answer(client):
    for case in [dict(temperature=0, max_tokens=30), dict(seed=9, max_tokens=40, stop=["\n\n"]),
                 dict(seed=2, max_tokens=25, n=2)]:
        whole = client.completions.create(model=MODEL, prompt="JULIET:\n", **case)
        chunks = list(client.completions.create(model=MODEL, prompt="JULIET:\n", stream=True,
                                                stream_options={"include_usage": True}, **case))
        texts, reasons = {}, {}
        for chunk in chunks[:-1]:
            for choice in chunk.choices:
                texts[choice.index] = texts.get(choice.index, "") + choice.text
                reasons[choice.index] = choice.finish_reason or reasons.get(choice.index)
        assert texts == {c.index: c.text for c in whole.choices}
        assert reasons == {c.index: c.finish_reason for c in whole.choices}
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_chat_equals_llm_chat(client, llm):
    messages = [{"role": "system", "content": "A street in Verona."},
                {"role": "user", "content": "What light through yonder window breaks?"}]
    response = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=24,
                                              stop=["\n\n"], logprobs=True, top_logprobs=2)
    expected = llm.chat(messages, SamplingParams(temperature=0, max_tokens=24, stop=["\n\n"]), use_tqdm=False)[0]
    choice = response.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == expected.outputs[0].text
    assert all(len(t.top_logprobs) == 2 for t in choice.logprobs.content)
    stream = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=24,
                                            stop=["\n\n"], stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == choice.message.content


def test_async_client_200_concurrent_streams(server, llm):
    prompts = [f"{name}:\n" for name in ("ROMEO", "JULIET", "HAMLET", "KING LEAR", "OTHELLO")] * 40
    expected = {p: o.outputs[0].text for p, o in
                zip(prompts[:5], llm.generate(prompts[:5], SamplingParams(temperature=0, max_tokens=8),
                                              use_tqdm=False))}

    async def main():
        aclient = openai.AsyncOpenAI(base_url=f"{server}/v1", api_key="none", max_retries=0, timeout=120)

        async def one(prompt):
            text = ""
            async for chunk in await aclient.completions.create(model=MODEL, prompt=prompt, temperature=0,
                                                                max_tokens=8, stream=True):
                text += chunk.choices[0].text
            return text
        try:
            return await asyncio.wait_for(asyncio.gather(*[one(p) for p in prompts]), 240)
        finally:
            await aclient.close()

    texts = asyncio.run(main())
    assert texts == [expected[p] for p in prompts]
    assert wait_until_idle(server)["vllm:kv_cache_usage_perc"] == 0


def test_bad_requests_are_4xx_with_an_error_object(server, client):
    for kwargs in [dict(temperature=-1), dict(max_tokens=5000), dict(n=0), dict(top_p=0), dict(stop=[""]),
                   dict(seed=2**64), dict(logprobs=50), dict(extra_body={"stop_token_ids": [10**6]})]:
        with pytest.raises(openai.BadRequestError) as info:
            client.completions.create(model=MODEL, prompt="ROMEO:\n", **kwargs)
        assert info.value.body["message"], kwargs
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="x")
    with pytest.raises(openai.BadRequestError, match="role"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "wizard", "content": "hi"}])
    for body in [b"{bad", b"[]", b'{"prompt": "\\ud800"}', b'{"prompt": ""}', b'{"prompt": [999999]}',
                 b'{"prompt": "x", "temperature": NaN}', b'{"prompt": "x", "max_tokens": true}']:
        r = httpx.post(f"{server}/v1/completions", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["message"], (body, r.text)
    assert httpx.get(f"{server}/v1/nothing").json()["error"]["type"] == "NotFoundError"


JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
                    max_leaves=6)
SMALL = st.integers(-3, 12)
FIELDS = {"prompt": st.text(max_size=20) | st.lists(st.integers(-5, 3000), max_size=5) | JSON,
          "max_tokens": SMALL | JSON, "temperature": st.floats(-1, 3) | JSON, "top_p": st.floats(-0.5, 1.5) | JSON,
          "top_k": SMALL | JSON, "min_p": st.floats(-0.5, 1.5) | JSON, "n": st.integers(-1, 3) | JSON,
          "stop": st.lists(st.text(max_size=3), max_size=2) | JSON, "seed": st.integers(-2, 2**65) | JSON,
          "logprobs": SMALL | JSON, "echo": JSON, "stream": st.booleans() | JSON, "min_tokens": SMALL | JSON,
          "repetition_penalty": st.floats(-1, 3) | JSON, "presence_penalty": st.floats(-3, 3) | JSON,
          "stop_token_ids": st.lists(st.integers(-2, 5000), max_size=2) | JSON, "ignore_eos": JSON,
          "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "x"]) | JSON,
                                                      "content": st.text(max_size=10) | JSON}), max_size=2) | JSON}


@given(path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]),
       body=st.fixed_dictionaries({"max_tokens": SMALL}, optional={k: v for k, v in FIELDS.items()
                                                                    if k != "max_tokens"}) | JSON)
@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
def test_fuzzed_bodies_never_get_a_5xx(server, path, body):
    if isinstance(body, dict) and path.endswith("chat/completions"):
        body.setdefault("max_completion_tokens", 4)
    r = httpx.post(f"{server}{path}", content=json.dumps(body), headers={"content-type": "application/json"},
                   timeout=60)
    assert r.status_code < 500, (body, r.text)
    if r.status_code >= 400:
        assert r.json()["error"]["message"]
    elif "data: " in r.text[:6]:
        assert r.text.rstrip().endswith("data: [DONE]")


def test_disconnects_abort_their_requests(server):
    before = metrics(server)
    with httpx.stream("POST", f"{server}/v1/completions", timeout=30,
                      json={"prompt": "ROMEO:\n", "max_tokens": 900, "ignore_eos": True, "stream": True}) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
    with pytest.raises(httpx.ReadTimeout):   # a whole answer the client stops waiting for
        httpx.post(f"{server}/v1/completions", json={"prompt": "JULIET:\n", "max_tokens": 900, "ignore_eos": True},
                   timeout=0.5)
    after = wait_until_idle(server)
    assert after["vllm:num_requests_running"] == 0 and after["vllm:kv_cache_usage_perc"] == 0
    generated = after["vllm:generation_tokens_total"] - before["vllm:generation_tokens_total"]
    assert generated < 2 * 900   # both stopped early


def test_metrics_parse_and_count(server, client):
    before = metrics(server)
    client.completions.create(model=MODEL, prompt=["ROMEO:\n"] * 3, temperature=0, max_tokens=5, extra_body={
        "ignore_eos": True})
    after = metrics(server)
    assert after["vllm:generation_tokens_total"] - before["vllm:generation_tokens_total"] == 15
    assert after["vllm:request_success_total"] - before["vllm:request_success_total"] == 3
    assert after["vllm:time_to_first_token_seconds_count"] - before["vllm:time_to_first_token_seconds_count"] == 3
    assert after["vllm:inter_token_latency_seconds_count"] - before["vllm:inter_token_latency_seconds_count"] == 12
    assert after["vllm:prefix_cache_hits_total"] <= after["vllm:prefix_cache_queries_total"]


def test_sigterm_lets_running_requests_finish():
    server = ServerProcess(MODEL, "--device", "cpu")
    proc = server.proc
    try:
        with httpx.stream("POST", f"{server.url}/v1/completions", timeout=60,
                          json={"prompt": "ROMEO:\n", "max_tokens": 120, "ignore_eos": True, "stream": True}) as r:
            lines = r.iter_lines()
            first = next(lines)
            proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line]
        events = [first, *rest]
        assert events[-1] == "data: [DONE]"
        assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] == "length"
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
