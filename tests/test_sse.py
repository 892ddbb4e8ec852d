"""Server-sent events: `parse_sse` against the WHATWG rules by hand and by property (events encoded with every line
end, cut at any byte, come back as they were), against the grader's own reference and the `openai` client's decoder
on random bytes, and on real streams from `llminfer serve` in process. The serving exercises' tests, run with the
library switched on, give llminfer's detokenizer and parser full marks, and a right answer written another way too."""

import asyncio
import json
import random

import httpx
import pytest
from grading_wrong.serving import RightDetokenizer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llminfer.grading import Exercise, get_exercise, grade_exercise
from llminfer.grading.exercises import serving
from llminfer.serve.detokenizer import IncrementalDetokenizer
from llminfer.serve.sse import parse_sse


def cut(data: bytes, cuts) -> list[bytes]:
    bounds = [0, *sorted(cuts), len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:])]


def parse(data: bytes, cuts=()) -> list[str]:
    return list(parse_sse(iter(cut(data, cuts))))


# --- by hand --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("stream, events", [
    (b"data: one\n\ndata: two\n\n", ["one", "two"]),
    (b"data: one\r\n\r\ndata: two\r\n\r\n", ["one", "two"]),
    (b"data: one\r\rdata: two\r\r", ["one", "two"]),
    (b"data: a\r\ndata: b\n\r\ndata: c\r\rdata: d\n\n", ["a\nb", "c", "d"]),
    (b"data: line 1\ndata: line 2\ndata:\ndata: line 4\n\n", ["line 1\nline 2\n\nline 4"]),
    (b"data:no space\n\ndata:  two spaces\n\ndata\n\ndata:a:b\n\n", ["no space", " two spaces", "", "a:b"]),
    (b": comment\nevent: x\nid: 1\nretry: 5\ndata: d\nDATA: no\ndata : no\nfoo\n\n", ["d"]),
    (b"event: ping\n\n:only a comment\n\nid: 2\n\n\n\n\ndata:\n\n", [""]),
    (b"data: kept\n\ndata: dropped: the stream ends before the blank line\n", ["kept"]),
    (b"data: kept\n\ndata: dropped", ["kept"]),
    ("\ufeffdata: a byte order mark first is dropped\n\n".encode(), ["a byte order mark first is dropped"]),
    ("data: \ufeffkept inside\n\n".encode(), ["\ufeffkept inside"]),
    (b"data: \xff\xfe invalid bytes\n\n", ["\ufffd\ufffd invalid bytes"]),
    (b"", []),
])
def test_whatwg_rules_whole_and_cut_at_every_byte(stream, events):
    assert parse(stream) == events
    assert parse(stream, range(1, len(stream))) == events


def test_a_chunk_ending_between_cr_and_lf_is_one_line_end():
    stream = b"data: a\r\ndata: b\r\n\r\ndata: c\r\n\r\n"
    cuts = [i + 1 for i, byte in enumerate(stream) if byte == ord("\r")]
    assert parse(stream, cuts) == ["a\nb", "c"]
    assert parse(b"data: a\r\n", [8]) == []                   # "\r" + "\n" in the next chunk: one line end
    assert parse(b"data: a\r\r\n", [8]) == ["a"]               # "\r", then "\r\n": a line end and a blank line


def test_characters_cut_between_chunks_and_empty_chunks():
    text = "Hello 😀 世界 שלום مرحبا 👩‍👩‍👧"
    stream = f"data: {text}\n\n".encode()
    chunks = [stream[i:i + 1] for i in range(len(stream))]
    assert list(parse_sse(iter([b"", *sum(([c, b""] for c in chunks), [])]))) == [text]


def test_each_event_is_yielded_before_the_next_chunk_is_read():
    read = []

    def chunks():
        for i, chunk in enumerate([b"data: 1\n\n", b"data: 2\r\n\r\n", b"data: 3\r\r", b": end\n"]):
            read.append(i)
            yield chunk

    events = parse_sse(chunks())
    for i in range(3):
        assert next(events) == str(i + 1) and len(read) == i + 1
    assert list(events) == [] and len(read) == 4


# --- by property ----------------------------------------------------------------------------------------------------

VALUE = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n"), max_size=12)
LINE_END = st.sampled_from(["\n", "\r\n", "\r"])


@st.composite
def encoded_streams(draw, fields: bool = True):
    """(events, bytes): events of 1 to 3 data lines, written with random line ends, `data:` with or without its
    space, and (with `fields`) comments and other fields between them."""
    events = draw(st.lists(st.lists(VALUE, min_size=1, max_size=3), max_size=6))
    lines = []
    for event in events:
        for value in event:
            if fields and draw(st.booleans()):
                lines.append(draw(st.sampled_from([":", ": keep-alive", "event: delta", "id: 7", "retry: 10", "x"])))
            if value == "" and draw(st.booleans()):
                lines.append("data")
            elif not value.startswith(" ") and draw(st.booleans()):
                lines.append("data:" + value)
            else:
                lines.append("data: " + value)
        lines.append("")
    text = ""
    for line in lines:
        end = draw(LINE_END)
        if text.endswith("\r") and not line and end == "\n":
            end = "\r"   # "\r" then an empty line ended by "\n" would read as one "\r\n"
        text += line + end
    return ["\n".join(event) for event in events], text.encode()


@given(data=st.data())
@settings(max_examples=300, deadline=None)
def test_encoded_events_cut_anywhere_come_back(data):
    events, stream = data.draw(encoded_streams())
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=20))
    assert parse(stream, cuts) == events


PIECES = [b"data", b"data:", b": ", b":", b" ", b"\r", b"\n", b"\r\n", b"x", b"id", b"event", "é".encode(),
          "😀".encode(), "😀".encode()[:2], b"\x80", b"\xff", b"\xef\xbb\xbf", "世".encode()[1:]]


@given(data=st.data())
@settings(max_examples=300, deadline=None)
def test_any_bytes_cut_anywhere_agree_with_the_graders_reference(data):
    stream = data.draw(st.lists(st.sampled_from(PIECES), max_size=40).map(b"".join) | st.binary(max_size=60))
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=20))
    expected = list(serving.reference_parse_sse(iter([stream])))
    assert parse(stream) == expected
    assert parse(stream, cuts) == expected


@given(data=st.data())
@settings(max_examples=200, deadline=None)
def test_agrees_with_the_openai_clients_decoder(data):
    # openai's decoder also dispatches events that have only `event` or `id` fields: compare on data and comments.
    decoder_class = pytest.importorskip("openai._streaming").SSEDecoder
    events, stream = data.draw(encoded_streams(fields=False))
    chunks = cut(stream, data.draw(st.lists(st.integers(0, len(stream)), max_size=20)))
    theirs = [event.data for event in decoder_class().iter_bytes(iter(chunks))]
    assert list(parse_sse(iter(chunks))) == theirs == events


# --- real streams ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def app():
    from llminfer import LLM
    from llminfer.serve.async_llm import AsyncLLM
    from llminfer.serve.server import build_app

    engine = AsyncLLM.from_llm(LLM("tiny-shakespeare", device="cpu", num_kv_blocks=64, seed=0))
    yield build_app(engine)
    engine.shutdown()


def post_both(app, path: str, body: dict) -> tuple[dict, bytes]:
    """The answer to `body` without and with streaming (ASGITransport hands over the stream's body whole)."""
    async def run():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://llminfer", timeout=60) as client:
            whole = await client.post(path, json=body)
            streamed = await client.post(path, json={**body, "stream": True,
                                                     "stream_options": {"include_usage": True}})
        assert whole.status_code == streamed.status_code == 200, (whole.text, streamed.text)
        assert streamed.headers["content-type"].startswith("text/event-stream")
        return whole.json(), streamed.content

    return asyncio.run(run())


def texts_of(events: list[str], field) -> dict[int, str]:
    assert events[-1] == "[DONE]" and "[DONE]" not in events[:-1]
    chunks = [json.loads(event) for event in events[:-1]]
    assert "usage" in chunks[-1] and chunks[-1]["choices"] == []
    texts: dict[int, str] = {}
    for chunk in chunks[:-1]:
        for choice in chunk["choices"]:
            texts[choice["index"]] = texts.get(choice["index"], "") + (field(choice) or "")
    return texts


@pytest.mark.parametrize("path, body, field, final", [
    ("/v1/completions", {"prompt": "ROMEO:\n", "max_tokens": 40, "n": 2, "seed": 1, "stop": ["\n\n"]},
     lambda choice: choice["text"], lambda choice: choice["text"]),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hello 😀 世界, שלום!"}], "max_tokens": 30,
                              "seed": 2, "temperature": 1.2},
     lambda choice: choice["delta"].get("content"), lambda choice: choice["message"]["content"]),
])
def test_real_streams_cut_anywhere_give_the_unstreamed_answer(app, path, body, field, final):
    whole, stream = post_both(app, path, {"model": "tiny-shakespeare", **body})
    expected = {choice["index"]: final(choice) for choice in whole["choices"]}
    events = parse(stream)
    assert texts_of(events, field) == expected
    rng = random.Random(0)
    for size in (1, 2, 3, 7, 64):
        assert parse(stream, range(size, len(stream), size)) == events
    for _ in range(20):
        cuts = [rng.randrange(len(stream)) for _ in range(rng.randint(1, 30))]
        assert parse(stream, cuts) == events == list(serving.reference_parse_sse(iter(cut(stream, cuts))))


# --- the exercises, with the library switched on -------------------------------------------------------------------

def unguarded(exercise_id: str, tests) -> Exercise:
    exercise = get_exercise(exercise_id)
    return Exercise(f"library_{exercise.id}", exercise.title, exercise.chapter, exercise.target, exercise.reference,
                    tests, exercise.timeout, exercise.setup)


@pytest.mark.parametrize("exercise_id, tests, library", [
    ("incremental_detokenizer", serving.DETOKENIZER_TESTS, IncrementalDetokenizer),
    ("sse_parse", serving.SSE_TESTS, parse_sse),
])
def test_llminfers_own_code_earns_full_marks_on_the_exercises_tests(exercise_id, tests, library):
    result = grade_exercise(unguarded(exercise_id, tests), library)
    assert result.score == result.max_score, result.table()


def test_a_right_detokenizer_written_another_way_earns_full_marks():
    # It decodes all ids at every call and sends everything before a trailing run of U+FFFD: sooner than the
    # reference at times, and never wrong.
    result = grade_exercise(get_exercise("incremental_detokenizer"), RightDetokenizer)
    assert result.score == result.max_score, result.table()


@given(data=st.data())
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_llminfers_detokenizer_sends_what_the_graders_reference_sends(data):
    tokenizer = serving._tokenizer()
    ids = data.draw(st.lists(st.integers(0, len(tokenizer) - 1), min_size=1, max_size=30))
    stop = data.draw(st.lists(st.sampled_from(["\n\n", "the", "😀", "e", ", and"]), max_size=2, unique=True))
    min_tokens = data.draw(st.integers(0, 5))
    ours, reference = IncrementalDetokenizer(tokenizer, stop, min_tokens), \
        serving.ReferenceIncrementalDetokenizer(tokenizer, stop, min_tokens)
    end = 0
    for size in data.draw(st.lists(st.integers(0, 4), max_size=30)):
        end = min(end + size, len(ids))
        assert ours.update(ids[:end]) == reference.update(ids[:end])
    final = tokenizer.decode(ids)
    assert ours.finish(final) == reference.finish(final)
