"""OpenAI's Batch API: `llminfer run-batch` and the server's job queue. Answers equal the offline engine's, malformed
lines become error lines in place, and the job API, driven by the official `openai` client against a server in a
thread on a loopback port, refuses hostile input with a 4xx and an error object. Every loop is bounded."""

import argparse
import io
import json
import sys
import threading
import time
from types import SimpleNamespace

import httpx
import openai
import pytest
import uvicorn

from llminfer import LLM, SamplingParams
from llminfer.serve.async_llm import AsyncLLM, wait_idle
from llminfer.serve.batch import add_parser, batch_router
from llminfer.serve.launch import free_port
from llminfer.serve.server import build_app

MODEL = "tiny-shakespeare"
MESSAGES = [{"role": "system", "content": "A street in Verona."},
            {"role": "user", "content": "What light through yonder window breaks?"}]
COMPLETIONS = [  # custom_id, request body, the same request as SamplingParams keywords
    ("greedy", {"model": MODEL, "prompt": "ROMEO:\n"}, dict(temperature=0, max_tokens=16)),
    ("seeded", {"prompt": "JULIET:\nO Romeo, Romeo"}, dict(temperature=0.9, top_p=0.9, seed=11, max_tokens=20)),
    ("stop", {"prompt": "First Citizen:\n"}, dict(temperature=1.0, seed=5, max_tokens=24, stop=["\n\n", "!"])),
    ("n2", {"prompt": "KING HENRY:\n"}, dict(n=2, seed=4, max_tokens=10)),
]
CHATS = [
    ("chat-greedy", {"model": MODEL, "messages": MESSAGES}, dict(temperature=0, max_tokens=16, stop=["\n\n"])),
    ("chat-seeded", {"messages": MESSAGES}, dict(temperature=0.8, seed=7, max_tokens=16)),
]
MALFORMED = [  # input line, the error code its record must carry
    (b"{not json", "invalid_json"),
    (b"[1, 2]", "invalid_request"),
    (b'{"method": "POST", "url": "/v1/completions", "body": {"prompt": "x"}}', "invalid_custom_id"),
    (b'{"custom_id": "greedy", "method": "POST", "url": "/v1/completions", "body": {"prompt": "x"}}',
     "duplicate_custom_id"),
    (b'{"custom_id": "get", "method": "GET", "url": "/v1/completions", "body": {"prompt": "x"}}', "invalid_method"),
    (b'{"custom_id": "emb", "method": "POST", "url": "/v1/embeddings", "body": {"input": "x"}}', "invalid_url"),
    (b'{"custom_id": "nobody", "method": "POST", "url": "/v1/completions", "body": "x"}', "invalid_body"),
    (b'{"custom_id": "stream", "method": "POST", "url": "/v1/completions", "body": {"prompt": "x", "stream": true}}',
     "invalid_body"),
    (b"\xff\xfe not utf-8", "invalid_json"),
]
REFUSED = [  # lines the app answers with an error status, as the server would
    ("nan", {"prompt": "x", "temperature": float("nan")}, 400),
    ("gpt", {"prompt": "x", "model": "gpt-4"}, 404),
    ("long", {"prompt": "x", "max_tokens": 5000}, 400),
]
TERMINAL = ("completed", "failed", "cancelled", "expired")


def line(custom_id: str, url: str, body: dict) -> bytes:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body}).encode()


def jsonl(url: str, cases: list) -> bytes:
    return b"\n".join(line(cid, url, {**body, **params}) for cid, body, params in cases) + b"\n"


def custom_id_of(raw: bytes) -> str | None:
    try:
        item = json.loads(raw)
    except ValueError:
        return None
    return item.get("custom_id") if isinstance(item, dict) else None


def records(text: str) -> list[dict]:
    return [json.loads(row) for row in text.splitlines()]


def expected_body(llm: LLM, url: str, body: dict, params: dict) -> dict:
    """What matters of an answer (texts, finish reasons, usage), computed by the offline engine."""
    sampling = SamplingParams(**params)
    if url == "/v1/completions":
        (output,) = llm.generate(body["prompt"], sampling, use_tqdm=False)
    else:
        (output,) = llm.chat(body["messages"], sampling, use_tqdm=False)
    completion = sum(len(c.token_ids) for c in output.outputs)
    return {"texts": [c.text for c in output.outputs], "finish": [c.finish_reason for c in output.outputs],
            "usage": {"prompt_tokens": len(output.prompt_token_ids), "completion_tokens": completion,
                      "total_tokens": len(output.prompt_token_ids) + completion}}


def essentials(body: dict) -> dict:
    choices = sorted(body["choices"], key=lambda c: c["index"])
    texts = [c["text"] if "text" in c else c["message"]["content"] for c in choices]
    return {"texts": texts, "finish": [c["finish_reason"] for c in choices], "usage": body["usage"]}


def check_answers(llm: LLM, url: str, cases: list, rows: list[dict]) -> None:
    by_id = {row["custom_id"]: row for row in rows if row["error"] is None}
    for custom_id, body, params in cases:
        row = by_id[custom_id]
        assert row["error"] is None and row["response"]["status_code"] == 200, row
        assert row["id"].startswith("batch_req_") and row["response"]["request_id"]
        assert essentials(row["response"]["body"]) == expected_body(llm, url, body, params), custom_id


@pytest.fixture(scope="module")
def llm():
    return LLM(MODEL, device="cpu")


def run_batch_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    args = parser.parse_args(["run-batch", *argv])
    return args.run(args)


# --- llminfer run-batch ---------------------------------------------------------------------------------------------

def test_run_batch_answers_like_the_offline_engine_and_keeps_bad_lines_in_place(tmp_path, llm):
    good = [(cid, "/v1/completions", body, params) for cid, body, params in COMPLETIONS]
    good += [(cid, "/v1/chat/completions", body, params) for cid, body, params in CHATS]
    rows_in = [line(cid, url, {**body, **params}) for cid, url, body, params in good]
    rows_in += [line(cid, "/v1/completions", body) for cid, body, _ in REFUSED]
    for (raw, _), at in zip(MALFORMED, (1, 3, 5, 7, 8, 9, 10, 11, 13)):   # spread between the good lines
        rows_in.insert(at, raw)
    source, target = tmp_path / "requests.jsonl", tmp_path / "results.jsonl"
    source.write_bytes(b"\n".join(rows_in[:4] + [b"", b"   "] + rows_in[4:]) + b"\n")   # blank lines are skipped
    assert run_batch_cli("-i", str(source), "-o", str(target), "--device", "cpu") == 0

    rows = records(target.read_text(encoding="utf-8"))
    assert len(rows) == len(rows_in)
    assert [row["custom_id"] for row in rows] == [custom_id_of(raw) for raw in rows_in]   # input order
    for url in ("/v1/completions", "/v1/chat/completions"):
        check_answers(llm, url, [(cid, body, params) for cid, u, body, params in good if u == url], rows)
    errors = [row for row in rows if row["response"] is None]
    assert [row["error"]["code"] for row in errors] == [code for _, code in MALFORMED]
    assert all(row["error"]["message"].startswith("line ") for row in errors)
    refused = {row["custom_id"]: row["response"] for row in rows if row["custom_id"] in dict.fromkeys(
        cid for cid, _, _ in REFUSED)}
    for custom_id, _, status in REFUSED:   # the app's own answer: its status and OpenAI error object
        assert refused[custom_id]["status_code"] == status
        assert refused[custom_id]["body"]["error"]["message"]


def test_run_batch_reads_stdin_and_writes_stdout(monkeypatch, capsys, llm):
    cases = COMPLETIONS[:2]
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(jsonl("/v1/completions", cases))))
    assert run_batch_cli("-i", "-", "-o", "-", "--device", "cpu", "--max-concurrency", "1") == 0
    out = capsys.readouterr()
    rows = records(out.out)
    assert [row["custom_id"] for row in rows] == [cid for cid, _, _ in cases]
    check_answers(llm, "/v1/completions", cases, rows)
    assert "2 requests, 2 answered, 0 failed" in out.err


def test_run_batch_refuses_user_mistakes_before_loading_the_model(tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_bytes(jsonl("/v1/completions", COMPLETIONS[:1]))
    mistakes = [(["-i", str(tmp_path / "missing.jsonl"), "-o", str(tmp_path / "out.jsonl")], "does not exist"),
                (["-i", str(source), "-o", str(tmp_path / "no" / "out.jsonl")], "directory does not exist"),
                (["-i", str(source), "-o", str(source)], "erase the requests"),
                (["-i", str(source), "-o", "-", "--max-concurrency", "0"], "at least 1"),
                (["-i", str(source), "-o", "-", "--speculative-config", "{oops"], "not valid JSON")]
    for argv, message in mistakes:
        started = time.monotonic()
        with pytest.raises(ValueError, match=message):
            run_batch_cli(*argv)
        assert time.monotonic() - started < 1.0   # refused before any model loads


# --- the job queue on the server ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server():
    """`build_app` with the batch router, served by uvicorn in a thread on a loopback port."""
    engine = AsyncLLM.from_llm(LLM(MODEL, device="cpu"))
    app = build_app(engine, MODEL)
    if not any(getattr(route, "path", None) == "/v1/batches" for route in app.routes):   # unless build_app has it
        app.include_router(batch_router(app.state.serving, max_files=16))
    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not uv.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert uv.started, "the server did not start"
    yield SimpleNamespace(url=f"http://127.0.0.1:{port}", engine=engine)
    uv.should_exit = True
    thread.join(30)
    assert not thread.is_alive() and not engine.is_running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=60)


def upload(client: openai.OpenAI, data: bytes, purpose: str = "batch", name: str = "requests.jsonl"):
    return client.files.create(file=(name, io.BytesIO(data)), purpose=purpose)


def wait_for(client: openai.OpenAI, batch_id: str, statuses=TERMINAL, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while True:
        batch = client.batches.retrieve(batch_id)
        if batch.status in statuses or time.monotonic() > deadline:
            return batch
        time.sleep(0.05)


def assert_refused(call, status: int) -> dict:
    """`call` fails with this 4xx status and OpenAI's error object; returns the error."""
    with pytest.raises(openai.APIStatusError) as info:
        call()
    assert info.value.status_code == status, info.value
    error = info.value.response.json()["error"]
    assert error["message"] and error["type"] and error["code"] == status
    return error


def test_jobs_answer_like_the_offline_engine(client, llm):
    completions = upload(client, jsonl("/v1/completions", COMPLETIONS))
    chats = upload(client, jsonl("/v1/chat/completions", CHATS), name="chats.jsonl")
    assert client.files.retrieve(completions.id).bytes == len(jsonl("/v1/completions", COMPLETIONS))
    assert client.files.content(chats.id).content == jsonl("/v1/chat/completions", CHATS)
    first = client.batches.create(input_file_id=completions.id, endpoint="/v1/completions", completion_window="24h",
                                  metadata={"chapter": "serving"})
    second = client.batches.create(input_file_id=chats.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert first.status in ("validating", "in_progress") and first.metadata == {"chapter": "serving"}
    for batch, url, cases in ((first, "/v1/completions", COMPLETIONS), (second, "/v1/chat/completions", CHATS)):
        batch = wait_for(client, batch.id)
        assert batch.status == "completed", batch
        assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (
            len(cases), len(cases), 0)
        assert batch.error_file_id is None and batch.completed_at >= batch.in_progress_at >= batch.created_at
        assert client.files.retrieve(batch.output_file_id).purpose == "batch_output"
        rows = records(client.files.content(batch.output_file_id).text)
        assert [row["custom_id"] for row in rows] == [cid for cid, _, _ in cases]
        check_answers(llm, url, cases, rows)
    listed = client.batches.list(limit=1)
    assert [b.id for b in listed.data] == [second.id] and listed.has_more
    assert {first.id, second.id} <= {b.id for b in client.batches.list(limit=100).data}
    assert_refused(lambda: client.batches.cancel(first.id), 409)   # it has finished


def test_job_error_lines_go_to_the_error_file(client):
    good = line("ok", "/v1/completions", {"prompt": "ROMEO:\n", "max_tokens": 4})
    data = b"\n".join([good, line("chat", "/v1/chat/completions", {"messages": MESSAGES}),
                       line("ok", "/v1/completions", {"prompt": "x"}), line("nan", "/v1/completions", {
                           "prompt": "x", "temperature": float("nan")})])
    batch = client.batches.create(input_file_id=upload(client, data).id, endpoint="/v1/completions",
                                  completion_window="24h")
    batch = wait_for(client, batch.id)
    assert batch.status == "completed" and (batch.request_counts.completed, batch.request_counts.failed) == (1, 3)
    assert [row["custom_id"] for row in records(client.files.content(batch.output_file_id).text)] == ["ok"]
    errors = records(client.files.content(batch.error_file_id).text)
    assert [(row["custom_id"], row["error"] and row["error"]["code"]) for row in errors] == [
        ("chat", "invalid_url"), ("ok", "duplicate_custom_id"), ("nan", None)]
    assert errors[2]["response"]["status_code"] == 400


def test_cancel_aborts_a_running_batch_while_live_requests_are_served(server, client):
    cases = [(f"long-{i}", {"prompt": "ROMEO:\n", "max_tokens": 800, "ignore_eos": True}, {}) for i in range(6)]
    batch = client.batches.create(input_file_id=upload(client, jsonl("/v1/completions", cases)).id,
                                  endpoint="/v1/completions", completion_window="24h")
    assert wait_for(client, batch.id, ("in_progress", *TERMINAL), timeout=10).status == "in_progress"
    live = client.completions.create(model=MODEL, prompt="JULIET:\n", max_tokens=4, temperature=0)
    assert live.usage.completion_tokens == 4   # the engine serves live traffic beside the batch
    assert client.batches.retrieve(batch.id).status == "in_progress"
    assert client.batches.cancel(batch.id).status in ("cancelling", "cancelled")
    batch = wait_for(client, batch.id, timeout=20)
    assert batch.status == "cancelled" and batch.cancelled_at >= batch.cancelling_at
    assert wait_idle(server.engine.engine, timeout=10)   # the aborted requests freed the engine
    answered = records(client.files.content(batch.output_file_id).text)
    errors = records(client.files.content(batch.error_file_id).text) if batch.error_file_id else []
    assert len(answered) + len(errors) == len(cases) and errors
    assert {row["error"]["code"] for row in errors} == {"batch_cancelled"}
    assert batch.request_counts.completed == len(answered) and batch.request_counts.failed == 0
    assert_refused(lambda: client.batches.cancel(batch.id), 409)


def test_hostile_input_gets_4xx_with_an_error_object(server, client):
    notes = upload(client, b"not a batch", purpose="user_data", name="notes.txt")
    for data in (b"ROMEO: not json\n", b'{"custom_id": "a"}\n[1]\n', b"\xff\xfe\n", b"", b"\n \n"):
        assert_refused(lambda data=data: upload(client, data), 400)
    assert_refused(lambda: upload(client, b'{"custom_id": "a"}\n' * (65 * 2**20 // 19)), 413)
    assert_refused(lambda: upload(client, b"{}\n", purpose="poetry"), 400)
    for call in (lambda: client.files.retrieve("file-nope"), lambda: client.files.content("file-nope"),
                 lambda: client.files.delete("file-nope"), lambda: client.batches.retrieve("batch_nope"),
                 lambda: client.batches.cancel("batch_nope"),
                 lambda: client.batches.create(input_file_id="file-nope", endpoint="/v1/completions",
                                               completion_window="24h")):
        assert_refused(call, 404)
    good = upload(client, jsonl("/v1/completions", COMPLETIONS[:1])).id
    for kwargs in (dict(input_file_id=notes.id, endpoint="/v1/completions", completion_window="24h"),
                   dict(input_file_id=good, endpoint="/v1/embeddings", completion_window="24h"),
                   dict(input_file_id=good, endpoint="/v1/completions", completion_window="1h"),
                   dict(input_file_id=good, endpoint="/v1/completions", completion_window="24h",
                        metadata={str(i): "x" for i in range(17)})):
        assert_refused(lambda kwargs=kwargs: client.batches.create(**kwargs), 400)
    raw = [httpx.post(f"{server.url}/v1/files", data={"purpose": "batch"}, timeout=10),   # no file part
           httpx.post(f"{server.url}/v1/files", files={"file": ("a.jsonl", b"{}\n")}, timeout=10),   # no purpose
           httpx.post(f"{server.url}/v1/files", content=b"{}", headers={"content-type": "application/json"}),
           httpx.post(f"{server.url}/v1/batches", content=b"{bad", headers={"content-type": "application/json"}),
           httpx.post(f"{server.url}/v1/batches", json={"input_file_id": 5}),
           httpx.get(f"{server.url}/v1/batches", params={"limit": 0})]
    for response in raw:
        assert response.status_code == 400 and response.json()["error"]["message"], response.text
    client.files.delete(notes.id)
    client.files.delete(good)


def test_an_oversized_upload_without_content_length_is_cut_off(server):
    def chunks():   # a multipart body streamed in chunks (no Content-Length), larger than the limit
        yield b'--b\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
        yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="big.jsonl"\r\n\r\n'
        for _ in range(65):
            yield b"{}\n" * (2**20 // 3 + 1)
        yield b"\r\n--b--\r\n"

    response = httpx.post(f"{server.url}/v1/files", content=chunks(), timeout=60,
                          headers={"content-type": "multipart/form-data; boundary=b"})
    assert response.status_code == 413 and response.json()["error"]["type"] == "RequestTooLargeError"


def test_the_file_store_is_capped_and_deleting_makes_room(client):
    mine = []
    try:
        for i in range(200):
            try:
                mine.append(upload(client, b'{"custom_id": "a"}\n', name=f"{i}.jsonl").id)
            except openai.BadRequestError as exc:
                assert "at most" in exc.body["message"]
                break
        else:
            pytest.fail("200 uploads were all accepted")
        assert {f.id for f in client.files.list()} >= set(mine)
        client.files.delete(mine.pop())
        mine.append(upload(client, b'{"custom_id": "a"}\n').id)   # room again
        assert_refused(lambda: client.batches.create(input_file_id=mine[0], endpoint="/v1/completions",
                                                     completion_window="24h"), 400)   # no room for its results
    finally:
        for file_id in mine:
            client.files.delete(file_id)
