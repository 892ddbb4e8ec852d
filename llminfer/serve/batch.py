"""OpenAI's Batch API, answered by the server's own app: `llminfer run-batch` and a job queue on `llminfer serve`.

A batch is a JSONL file, one request a line, and its results a JSONL file, one record per request, in input order:

    {"custom_id": "q1", "method": "POST", "url": "/v1/completions", "body": {"prompt": "ROMEO:", "max_tokens": 9}}
    {"id": "batch_req_…", "custom_id": "q1", "error": null,
     "response": {"status_code": 200, "request_id": "req_…", "body": {…the completion…}}}

A request the app refuses keeps its status and OpenAI error body in `response`; a line that is no request at
all (bad JSON, a method or url other than POST to /v1/completions or /v1/chat/completions, a missing or
repeated custom_id, `stream`) gets `"response": null, "error": {"code", "message"}` and never stops the others.

Every request goes through the FastAPI app of `llminfer serve`, in process (httpx's ASGI transport, no socket),
so a batch answer is exactly what the server would answer. Requests run concurrently, bounded by a semaphore,
so the engine batches them as it would many clients' requests:

- `llminfer run-batch -i in.jsonl -o out.jsonl`: loads the model, answers the file, exits (`vllm run-batch`),
  with up to twice `max_num_seqs` requests in flight: a full running batch plus a queue to refill it.
- `batch_router(serving)`: `/v1/files` and `/v1/batches` on a running server (upload, create, poll, fetch,
  cancel). Jobs run on the server's event loop and share its engine with live traffic, at most half of
  `max_num_seqs` requests at a time, so interactive requests always find room in the running batch. Files
  live in memory, within limits on their size and number.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Annotated, Any

import httpx
from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, StrictStr
from starlette.datastructures import UploadFile

from llminfer.serve.async_llm import AsyncLLM
from llminfer.serve.server import APIError, OpenAIServing, build_app

ENDPOINTS = ("/v1/completions", "/v1/chat/completions")
PURPOSES = ("assistants", "batch", "fine-tune", "vision", "user_data", "evals")   # what OpenAI accepts
ACTIVE = ("validating", "in_progress", "finalizing", "cancelling")
MiB = 1 << 20


def now() -> int:
    return int(time.time())


def new_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex}"


# --- one line of a batch -----------------------------------------------------------------------------------------

@dataclass
class BatchRequest:
    """A checked input line: what to POST where, and the caller's id for its answer."""

    line: int
    custom_id: str
    url: str
    body: dict


class LineError(ValueError):
    """An input line that is no request: it gets an error record instead of an answer."""

    def __init__(self, line: int, code: str, message: str, custom_id: str | None = None):
        super().__init__(f"line {line}: {message}")
        self.code, self.custom_id = code, custom_id


def parse_line(line: int, raw: bytes | str, seen: set[str], endpoints: Iterable[str] = ENDPOINTS) -> BatchRequest:
    """Check one input line; `seen` holds the custom ids of the lines before it, and this one's joins them."""
    try:
        item = json.loads(raw)
    except ValueError as exc:   # bad JSON, or bytes that are not UTF-8
        raise LineError(line, "invalid_json", f"not valid JSON ({exc})") from None
    if not isinstance(item, dict):
        raise LineError(line, "invalid_request", f"a request is a JSON object, got {type(item).__name__}")
    custom_id = item.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        raise LineError(line, "invalid_custom_id", "custom_id must be a non-empty string")
    if custom_id in seen:
        raise LineError(line, "duplicate_custom_id", f"custom_id {custom_id!r} is used by an earlier line", custom_id)
    seen.add(custom_id)
    if item.get("method") != "POST":
        raise LineError(line, "invalid_method", f"method must be POST, got {item.get('method')!r}", custom_id)
    endpoints = tuple(endpoints)
    if item.get("url") not in endpoints:
        raise LineError(line, "invalid_url", f"url must be one of {', '.join(endpoints)}, got {item.get('url')!r}",
                        custom_id)
    body = item.get("body")
    if not isinstance(body, dict):
        raise LineError(line, "invalid_body", "body must be a JSON object (the request's parameters)", custom_id)
    if body.get("stream") is True:
        raise LineError(line, "invalid_body", "stream is not available in a batch: answers come whole", custom_id)
    return BatchRequest(line, custom_id, item["url"], body)


def answer_record(custom_id: str, status: int, body: Any) -> dict:
    return {"id": new_id("batch_req_"), "custom_id": custom_id,
            "response": {"status_code": status, "request_id": new_id("req_"), "body": body}, "error": None}


def error_record(custom_id: str | None, code: str, message: str) -> dict:
    return {"id": new_id("batch_req_"), "custom_id": custom_id, "response": None,
            "error": {"code": code, "message": message}}


def succeeded(record: dict) -> bool:
    return record["response"] is not None and record["response"]["status_code"] == 200


def was_cancelled(record: dict) -> bool:
    return record["error"] is not None and record["error"]["code"] == "batch_cancelled"


# --- answering lines through the app -----------------------------------------------------------------------------

def in_process_client(app: FastAPI, gone: asyncio.Event | None = None) -> httpx.AsyncClient:
    """An httpx client whose requests run `app` directly on this event loop (no socket). Once `gone` is set,
    requests still running see their client disconnect, which aborts them in the engine (a batch's cancel)."""
    target = app if gone is None else _disconnects_when(app, gone)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=target, raise_app_exceptions=False),
                             base_url="http://llminfer.batch", timeout=None)


def _disconnects_when(app: FastAPI, gone: asyncio.Event) -> Callable:
    """`app`, wrapped so that its `receive` reports a disconnect as soon as `gone` is set."""
    async def wrapped(scope: dict, receive: Callable, send: Callable) -> None:
        async def receive_or_gone() -> dict:
            if gone.is_set():
                return {"type": "http.disconnect"}
            message, stop = asyncio.ensure_future(receive()), asyncio.ensure_future(gone.wait())
            try:
                await asyncio.wait({message, stop}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                stop.cancel()
                if not message.done():
                    message.cancel()
            return message.result() if message.done() and not message.cancelled() else {"type": "http.disconnect"}

        await app(scope, receive_or_gone, send)

    return wrapped


async def post(client: httpx.AsyncClient, request: BatchRequest) -> dict:
    """POST one request to the app; its status and JSON body become the record's response."""
    try:
        # json.dumps, not httpx's json=: a NaN the line holds must reach the app, which refuses it as the server does
        response = await client.post(request.url, content=json.dumps(request.body).encode(),
                                     headers={"content-type": "application/json"})
    except Exception as exc:  # noqa: BLE001 - one request's failure must not stop the batch
        return error_record(request.custom_id, "internal_error", f"line {request.line}: {type(exc).__name__}: {exc}")
    try:
        body = response.json()
    except ValueError:   # only an unhandled exception in the app answers without JSON
        body = {"error": {"message": response.text or "no body", "type": "InternalServerError", "param": None,
                          "code": response.status_code}}
    return answer_record(request.custom_id, response.status_code, body)


async def answers(lines: Iterable[bytes], client: httpx.AsyncClient, slots: asyncio.Semaphore,
                  endpoints: Iterable[str] = ENDPOINTS, stop: asyncio.Event | None = None,
                  on_record: Callable[[dict], None] | None = None) -> AsyncIterator[dict]:
    """One record per non-blank line, yielded in input order while the requests run concurrently (each holds
    one of `slots` while it runs). Once `stop` is set, lines not yet answered get a `batch_cancelled` error.
    `on_record` sees each record as soon as it exists (for live counts), before its turn to be yielded."""
    endpoints = tuple(endpoints)
    seen: set[str] = set()
    pending: deque[asyncio.Future] = deque()

    def finished(record: dict) -> dict:
        if on_record is not None:
            on_record(record)
        return record

    def cancelled(request: BatchRequest) -> dict:
        return finished(error_record(request.custom_id, "batch_cancelled",
                                     f"line {request.line}: the batch was cancelled before this request finished"))

    async def send(request: BatchRequest) -> dict:
        try:
            if stop is not None and stop.is_set():
                return cancelled(request)
            record = await post(client, request)
        finally:
            slots.release()
        if stop is not None and stop.is_set() and record["response"] and record["response"]["status_code"] == 499:
            return cancelled(request)   # aborted by the cancel (seen by the app as a client gone)
        return finished(record)

    try:
        for number, raw in enumerate(lines, 1):
            if not raw.strip():
                continue
            try:
                request = parse_line(number, raw, seen, endpoints)
            except LineError as exc:
                done = asyncio.get_running_loop().create_future()
                done.set_result(finished(error_record(exc.custom_id, exc.code, str(exc))))
                pending.append(done)
            else:
                await slots.acquire()
                pending.append(asyncio.ensure_future(send(request)))
            while pending and pending[0].done():
                yield pending.popleft().result()
        while pending:
            yield await pending.popleft()
    finally:   # the consumer left early, or was cancelled: stop what still runs
        for future in pending:
            future.cancel()
        await asyncio.gather(*pending, return_exceptions=True)


async def run_batch(engine: AsyncLLM, source: Iterable[bytes], sink: IO[str], served_model_name: str | None = None,
                    max_concurrency: int | None = None) -> dict[str, int]:
    """Answer every line of `source` through the server's app on `engine` and write the records to `sink` in input
    order; returns {total, completed, failed}. The caller owns the engine (and shuts it down)."""
    app = build_app(engine, served_model_name)
    slots = asyncio.Semaphore(max_concurrency or 2 * engine.max_num_seqs)
    counts = {"total": 0, "completed": 0, "failed": 0}
    async with in_process_client(app) as client:
        async for record in answers(source, client, slots):
            counts["total"] += 1
            counts["completed" if succeeded(record) else "failed"] += 1
            sink.write(json.dumps(record, ensure_ascii=False) + "\n")
    return counts


# --- the command line ------------------------------------------------------------------------------------------------

def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """The engine settings (keyword arguments of `LLM`) that `llminfer serve` and `llminfer run-batch` share."""
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: a GPU if present)")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-num-seqs", type=int, default=256, help="requests in the running batch, at most")
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048, help="tokens per engine step, at most")
    parser.add_argument("--block-size", type=int, default=16, help="tokens per KV cache block")
    parser.add_argument("--num-kv-blocks", type=int, default=None, help="KV cache blocks (default: sized to memory)")
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--no-enable-prefix-caching", action="store_true")
    parser.add_argument("--cpu-threads", type=int, default=None,
                        help="fix the CPU thread count (default: the engine measures which count is fastest)")
    parser.add_argument("--kv-cache-dtype", default="auto")
    parser.add_argument("--quantization", default=None)
    parser.add_argument("--speculative-config", default=None, help="vLLM's JSON, as for `generate`")


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """`LLM`'s keyword arguments from the options `add_engine_arguments` added; bad JSON raises ValueError."""
    from llminfer.cli import _json_object  # here, not at the top: the cli module imports this one

    spec = None if args.speculative_config is None else _json_object(args.speculative_config, "--speculative-config")
    return dict(device=args.device, dtype=args.dtype, seed=args.seed, max_num_seqs=args.max_num_seqs,
                max_num_batched_tokens=args.max_num_batched_tokens, block_size=args.block_size,
                num_kv_blocks=args.num_kv_blocks, max_model_len=args.max_model_len,
                enable_prefix_caching=not args.no_enable_prefix_caching, kv_cache_dtype=args.kv_cache_dtype,
                quantization=args.quantization, speculative_config=spec, cpu_threads=args.cpu_threads)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add `run-batch` to the `llminfer` subcommands, its run function set as `run`."""
    p = subparsers.add_parser("run-batch", help="answer a JSONL file of OpenAI requests (OpenAI's Batch format, "
                                                "vLLM's `vllm run-batch`)")
    p.add_argument("-i", "--input-file", required=True, help="JSONL, one request a line; - reads stdin")
    p.add_argument("-o", "--output-file", required=True, help="JSONL results in input order; - writes stdout")
    p.add_argument("--model", default="tiny-shakespeare", help="shipped name, local directory or Hub id")
    p.add_argument("--served-model-name", default=None, help="the name requests pass as `model` (default: MODEL)")
    p.add_argument("--max-concurrency", type=int, default=None,
                   help="requests in flight, at most (default: twice --max-num-seqs)")
    add_engine_arguments(p)
    p.set_defaults(run=run_batch_cli)
    return p


def run_batch_cli(args: argparse.Namespace) -> int:
    """`llminfer run-batch`: every path and option is checked before the model loads (ValueError if wrong)."""
    from llminfer.engine.llm import LLM

    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise ValueError(f"--max-concurrency must be at least 1, got {args.max_concurrency}")
    kwargs = engine_kwargs(args)
    source, target = args.input_file, args.output_file
    if source != "-" and not Path(source).is_file():
        raise ValueError(f"input file {source!r} does not exist (or is not a file)")
    if target != "-":
        if not Path(target).resolve().parent.is_dir():
            raise ValueError(f"output file {target!r}: its directory does not exist")
        if source != "-" and Path(target).resolve() == Path(source).resolve():
            raise ValueError("the output file is the input file: writing the results would erase the requests")
    started = time.perf_counter()
    with _open_input(source) as lines:
        engine = AsyncLLM.from_llm(LLM(args.model, **kwargs))
        try:
            with _open_output(target) as sink:
                counts = asyncio.run(run_batch(engine, lines, sink, args.served_model_name or args.model,
                                               args.max_concurrency))
                sink.flush()
        finally:
            engine.shutdown()
    print(f"run-batch: {counts['total']} requests, {counts['completed']} answered, {counts['failed']} failed, "
          f"in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return 0


def _open_input(path: str) -> contextlib.AbstractContextManager[IO[bytes]]:
    return contextlib.nullcontext(sys.stdin.buffer) if path == "-" else open(path, "rb")


def _open_output(path: str) -> contextlib.AbstractContextManager[IO[str]]:
    return contextlib.nullcontext(sys.stdout) if path == "-" else open(path, "w", encoding="utf-8")


# --- the job queue on the server -------------------------------------------------------------------------------------

@dataclass
class StoredFile:
    """An uploaded file, or a batch's results, held in memory."""

    id: str
    filename: str
    purpose: str
    data: bytes
    created_at: int = field(default_factory=now)

    def as_dict(self) -> dict:
        return {"id": self.id, "object": "file", "bytes": len(self.data), "created_at": self.created_at,
                "filename": self.filename, "purpose": self.purpose, "status": "processed", "status_details": None,
                "expires_at": None}


@dataclass
class Job:
    """One batch: its requests, where it stands, and its result files once it ends."""

    id: str
    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: dict[str, str] | None
    model: str
    lines: list[bytes]
    created_at: int = field(default_factory=now)
    status: str = "validating"
    times: dict[str, int] = field(default_factory=dict)   # "in_progress_at", "completed_at", ...
    counts: dict[str, int] = field(default_factory=lambda: {"total": 0, "completed": 0, "failed": 0})
    output_file_id: str | None = None
    error_file_id: str | None = None
    errors: list[dict] | None = None
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task | None = None

    def set_status(self, status: str) -> None:
        self.status, self.times[f"{status}_at"] = status, now()

    def count(self, record: dict) -> None:
        """Live request counts; cancelled requests count as neither completed nor failed."""
        if not was_cancelled(record):
            self.counts["completed" if succeeded(record) else "failed"] += 1

    def as_dict(self) -> dict:
        stamps = ("in_progress", "expires", "finalizing", "completed", "failed", "expired", "cancelling", "cancelled")
        return {"id": self.id, "object": "batch", "endpoint": self.endpoint, "model": self.model,
                "errors": None if self.errors is None else {"object": "list", "data": self.errors},
                "input_file_id": self.input_file_id, "completion_window": self.completion_window,
                "status": self.status, "output_file_id": self.output_file_id, "error_file_id": self.error_file_id,
                "created_at": self.created_at, **{f"{s}_at": self.times.get(f"{s}_at") for s in stamps},
                "request_counts": dict(self.counts), "metadata": self.metadata}


class BatchCreate(BaseModel):
    """The body of POST /v1/batches."""

    model_config = ConfigDict(extra="ignore")

    input_file_id: StrictStr
    endpoint: StrictStr
    completion_window: StrictStr
    metadata: dict[StrictStr, StrictStr] | None = None


def check_batch_input(data: bytes, max_lines: int) -> str | None:
    """Why `data` is not a batch input file (UTF-8 JSONL, one JSON object a line), or None when it is one."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        return f"the file is not UTF-8 text ({exc}); a batch input file is JSONL, one request object a line"
    count = 0
    for number, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        count += 1
        if count > max_lines:
            return f"the file has more than {max_lines} requests, this server's limit for one batch"
        try:
            item = json.loads(line)
        except ValueError as exc:
            return f"line {number} is not JSON ({exc}); a batch input file is JSONL, one request object a line"
        if not isinstance(item, dict):
            return f"line {number} is not a JSON object; a batch input file is JSONL, one request object a line"
    return None if count else "the file has no requests; a batch input file is JSONL, one request object a line"


async def read_upload(request: Request, limit: int) -> tuple[str, str, bytes]:
    """The multipart upload's file name, purpose and bytes. A body larger than `limit` (plus room for the form's
    headers) is refused with 413 as soon as it is seen, before it is stored anywhere."""
    too_large = APIError(f"the file is larger than this server's limit of {limit} bytes", 413, "RequestTooLargeError",
                         "file")
    cap = limit + 64 * 1024
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > cap:
        raise too_large
    received = 0

    async def counted() -> dict:
        nonlocal received
        message = await request.receive()
        received += len(message.get("body", b""))
        if received > cap:
            raise too_large
        return message

    async with Request(request.scope, counted).form(max_files=1, max_fields=8) as form:
        upload, purpose = form.get("file"), form.get("purpose")
        if not isinstance(upload, UploadFile):
            raise APIError("send the file as the `file` part of a multipart/form-data body", param="file")
        if not isinstance(purpose, str):
            raise APIError("a `purpose` form field is needed, e.g. purpose=batch", param="purpose")
        data = await upload.read(limit + 1)
        if len(data) > limit:
            raise too_large
        return upload.filename or "upload.jsonl", purpose, data


def batch_router(serving: OpenAIServing, *, max_file_bytes: int = 64 * MiB, max_files: int = 64,
                 max_total_bytes: int = 512 * MiB, max_lines: int = 50_000, max_concurrency: int | None = None,
                 max_batches: int = 1000) -> APIRouter:
    """`/v1/files` and `/v1/batches` (OpenAI's Batch API) for the app that serves `serving`. Batches answer their
    lines through that app, at most `max_concurrency` requests at a time over all batches (default: half of
    `max_num_seqs`). Files are held in memory: at most `max_files` (each batch's results included) of at most
    `max_file_bytes` each, `max_total_bytes` in all; the oldest ended batches beyond `max_batches` are forgotten."""
    files: dict[str, StoredFile] = {}
    jobs: dict[str, Job] = {}
    slots = asyncio.Semaphore(max_concurrency or max(1, serving.engine.max_num_seqs // 2))

    def free_slots() -> int:
        """Files that may still be stored: each running batch holds two back for its results."""
        return max_files - len(files) - 2 * sum(job.status in ACTIVE for job in jobs.values())

    def find(table: dict, key: str, kind: str):
        if key not in table:
            raise APIError(f"No {kind} with id {key!r}", 404, "NotFoundError", f"{kind}_id")
        return table[key]

    def store(records: list[dict], filename: str) -> str:
        data = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records).encode()
        stored = StoredFile(new_id("file-"), filename, "batch_output", data)
        files[stored.id] = stored
        return stored.id

    async def run_job(job: Job, app: FastAPI) -> None:
        """Answer a batch in the background, then keep its results as files (successes, and errors if any)."""
        answered: list[dict] = []
        failed: list[dict] = []
        try:
            job.counts["total"] = sum(1 for line in job.lines if line.strip())
            if not job.stop.is_set():
                job.set_status("in_progress")
            async with in_process_client(app, job.stop) as client:
                async for record in answers(job.lines, client, slots, (job.endpoint,), job.stop, job.count):
                    (answered if succeeded(record) else failed).append(record)
        except Exception as exc:  # noqa: BLE001 - the batch fails, the server goes on
            job.errors = [{"code": "internal_error", "message": f"{type(exc).__name__}: {exc}", "param": None,
                           "line": None}]
            job.set_status("failed")
            return
        finally:
            job.lines = []
        if not job.stop.is_set():
            job.set_status("finalizing")
        job.output_file_id = store(answered, f"{job.id}_output.jsonl")
        if failed:
            job.error_file_id = store(failed, f"{job.id}_error.jsonl")
        job.set_status("cancelled" if job.stop.is_set() else "completed")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        running = [job for job in jobs.values() if job.task is not None and not job.task.done()]
        for job in running:   # the server is stopping: abort the batches' requests, then their tasks
            job.stop.set()
        if running:
            _, late = await asyncio.wait([job.task for job in running], timeout=10)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)

    router = APIRouter(lifespan=lifespan)

    @router.post("/v1/files")
    async def upload_file(request: Request) -> dict:
        filename, purpose, data = await read_upload(request, max_file_bytes)
        if purpose not in PURPOSES:
            raise APIError(f"purpose must be one of {', '.join(PURPOSES)}, got {purpose!r}", param="purpose")
        if free_slots() < 1:
            raise APIError(f"this server holds at most {max_files} files (batch results included): delete some "
                           "with DELETE /v1/files/{file_id}", param="file")
        if sum(len(f.data) for f in files.values()) + len(data) > max_total_bytes:
            raise APIError(f"this server holds at most {max_total_bytes} bytes of files: delete some with "
                           "DELETE /v1/files/{file_id}", 413, "RequestTooLargeError", "file")
        if purpose == "batch":
            problem = await asyncio.to_thread(check_batch_input, data, max_lines)
            if problem is not None:
                raise APIError(problem, param="file")
        stored = StoredFile(new_id("file-"), filename, purpose, data)
        files[stored.id] = stored
        return stored.as_dict()

    @router.get("/v1/files")
    async def list_files(purpose: str | None = None) -> dict:
        data = [f.as_dict() for f in files.values() if purpose is None or f.purpose == purpose]
        return {"object": "list", "data": data, "has_more": False}

    @router.get("/v1/files/{file_id}")
    async def retrieve_file(file_id: str) -> dict:
        return find(files, file_id, "file").as_dict()

    @router.get("/v1/files/{file_id}/content")
    async def file_content(file_id: str) -> Response:
        return Response(find(files, file_id, "file").data, media_type="application/octet-stream")

    @router.delete("/v1/files/{file_id}")
    async def delete_file(file_id: str) -> dict:
        find(files, file_id, "file")
        del files[file_id]
        return {"id": file_id, "object": "file", "deleted": True}

    @router.post("/v1/batches")
    async def create_batch(body: BatchCreate, request: Request) -> dict:
        if body.endpoint not in ENDPOINTS:
            raise APIError(f"endpoint must be one of {', '.join(ENDPOINTS)}, got {body.endpoint!r}", param="endpoint")
        if body.completion_window != "24h":
            raise APIError(f"completion_window must be '24h', got {body.completion_window!r}",
                           param="completion_window")
        if body.metadata is not None and len(body.metadata) > 16:
            raise APIError("metadata holds at most 16 keys", param="metadata")
        source = find(files, body.input_file_id, "file")
        if source.purpose != "batch":
            raise APIError(f"file {source.id} was uploaded with purpose {source.purpose!r}; a batch's input file "
                           "needs purpose 'batch'", param="input_file_id")
        if free_slots() < 2:
            raise APIError(f"this server holds at most {max_files} files and a batch needs room for two (its "
                           "results): delete some with DELETE /v1/files/{file_id}", param="input_file_id")
        job = Job(new_id("batch_"), source.id, body.endpoint, body.completion_window, body.metadata,
                  serving.model_name, source.data.splitlines())
        jobs[job.id] = job
        job.task = asyncio.create_task(run_job(job, request.app))
        ended = [old for old in jobs.values() if old.status not in ACTIVE]
        for old in ended[:max(0, len(jobs) - max_batches)]:
            del jobs[old.id]
        return job.as_dict()

    @router.get("/v1/batches")
    async def list_batches(after: str | None = None, limit: Annotated[int, Query(ge=1, le=100)] = 20) -> dict:
        newest_first = list(reversed(jobs.values()))
        if after is not None:
            ids = [job.id for job in newest_first]
            newest_first = newest_first[ids.index(after) + 1:] if after in ids else []
        page = newest_first[:limit]
        return {"object": "list", "data": [job.as_dict() for job in page], "has_more": len(newest_first) > limit,
                "first_id": page[0].id if page else None, "last_id": page[-1].id if page else None}

    @router.get("/v1/batches/{batch_id}")
    async def retrieve_batch(batch_id: str) -> dict:
        return find(jobs, batch_id, "batch").as_dict()

    @router.post("/v1/batches/{batch_id}/cancel")
    async def cancel_batch(batch_id: str) -> dict:
        job = find(jobs, batch_id, "batch")
        if job.status in ("validating", "in_progress"):
            job.set_status("cancelling")
            job.stop.set()
        elif job.status != "cancelling":
            raise APIError(f"batch {batch_id} is {job.status}: only a validating or running batch can be cancelled",
                           409, "ConflictError")
        return job.as_dict()

    return router
