"""`llminfer serve`: an OpenAI-compatible HTTP server on FastAPI and uvicorn, in front of `AsyncLLM`.

Endpoints: `/v1/completions`, `/v1/chat/completions`, `/v1/models`, `/health`, `/metrics`. Responses and
stream chunks have OpenAI's shapes, so the official `openai` client (or anything written for vLLM's
server) works unchanged. The rules that keep it safe to expose:

- Everything a client sends is checked before the engine sees it; a bad request gets OpenAI's error
  object with status 400 (404 for an unknown model or route), never a 5xx.
- A client that goes away (mid-stream, or while waiting for a whole answer) aborts its requests, which
  frees their KV blocks.
- SIGTERM stops accepting connections, lets running requests finish (uvicorn's graceful shutdown), then
  stops the engine thread.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from llminfer.engine.outputs import CompletionOutput, RequestOutput
from llminfer.generate import check_prompt, encode_prompt
from llminfer.sampling import Logprob, SamplingParams
from llminfer.serve.async_llm import AsyncLLM
from llminfer.serve.metrics import ServerMetrics
from llminfer.serve.protocol import ChatCompletionRequest, CompletionRequest


class APIError(Exception):
    """An error a client gets as OpenAI's error object."""

    def __init__(self, message: str, status: int = 400, kind: str = "BadRequestError", param: str | None = None):
        super().__init__(message)
        self.message, self.status, self.kind, self.param = message, status, kind, param


def error_response(message: str, status: int, kind: str, param: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": status}}, status)


@dataclass
class Prompt:
    """One prompt of a request, checked and tokenised."""

    text: str | None
    token_ids: list[int]

    def engine_prompt(self) -> dict:
        return {"prompt_token_ids": self.token_ids, "prompt": self.text}


@dataclass
class Sent:
    """How much of one completion a stream has sent."""

    text: int = 0
    tokens: int = 0


class OpenAIServing:
    """Turns OpenAI requests into engine requests and engine outputs into OpenAI responses."""

    def __init__(self, engine: AsyncLLM, served_model_name: str):
        self.engine, self.model_name = engine, served_model_name
        self.tokenizer = engine.tokenizer
        self.max_model_len = engine.max_model_len
        self.vocab_size = engine.vocab_size

    # --- checks ---------------------------------------------------------------------------------------------------

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(f"The model `{model}` does not exist.", 404, "NotFoundError", "model")

    def prompt(self, prompt: str | list[int], max_tokens: int | None) -> Prompt:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise APIError("this server has no tokenizer: send prompts as token ids", param="prompt")
            text, ids = prompt, encode_prompt(self.tokenizer, prompt)
        else:
            text, ids = None, list(prompt)
            bad = [t for t in ids if t >= self.vocab_size]
            if bad:
                raise APIError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})",
                               param="prompt")
            if self.tokenizer is not None:
                text = self.tokenizer.decode(ids)
        check_prompt(ids, self.max_model_len)
        if max_tokens is not None and len(ids) + max_tokens > self.max_model_len:
            raise APIError(f"This model's maximum context length is {self.max_model_len} tokens. However, you "
                           f"requested {len(ids) + max_tokens} tokens ({len(ids)} in the prompt, {max_tokens} in "
                           "the completion). Please reduce the length of the prompt or max_tokens.",
                           param="max_tokens")
        return Prompt(text, ids)

    def params(self, make) -> SamplingParams:
        try:
            params = make()
            params.check_vocabulary(self.vocab_size)
        except (ValueError, TypeError, OverflowError) as exc:
            raise APIError(str(exc)) from None
        return params

    # --- running requests -------------------------------------------------------------------------------------------

    async def run(self, prompts: list[Prompt], params: SamplingParams, request_id: str,
                  final_only: bool = False) -> AsyncIterator[tuple]:
        """Run every prompt concurrently; yield (prompt index, output) as outputs arrive (only the finished
        ones with `final_only`). Leaving early (or an error) aborts all of them."""
        queue: asyncio.Queue = asyncio.Queue()

        async def one(i: int, prompt: Prompt) -> None:
            try:
                async for output in self.engine.generate(prompt.engine_prompt(), params, f"{request_id}-{i}",
                                                         final_only):
                    await queue.put((i, output))
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which re-raises it
                await queue.put((i, exc))
                raise

        tasks = [asyncio.create_task(one(i, p)) for i, p in enumerate(prompts)]
        try:
            remaining = len(prompts)
            while remaining:
                i, item = await queue.get()
                if isinstance(item, BaseException):
                    if isinstance(item, ValueError):
                        raise APIError(str(item)) from None
                    raise item
                remaining -= item.finished
                yield i, item
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def final_outputs(self, prompts: list[Prompt], params: SamplingParams, request_id: str,
                            http_request: Request) -> list[RequestOutput]:
        """The finished outputs, in prompt order; the requests are aborted if the client disconnects."""
        async def collect() -> list[RequestOutput]:
            final: dict[int, RequestOutput] = {}
            async for i, output in self.run(prompts, params, request_id, final_only=True):
                final[i] = output
            return [final[i] for i in range(len(prompts))]

        work = asyncio.create_task(collect())
        gone = asyncio.create_task(wait_for_disconnect(http_request))
        try:
            done, _ = await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:   # our own caller gave up: the requests must not run on
            work.cancel()
            raise
        finally:
            gone.cancel()
        if work not in done:   # the client left: cancelling `work` aborts its requests
            work.cancel()
            await asyncio.gather(work, return_exceptions=True)
            raise APIError("client disconnected", 499, "ClientDisconnected")
        return work.result()

    # --- completions -------------------------------------------------------------------------------------------------

    async def completions(self, body: CompletionRequest, http_request: Request) -> Response:
        self.check_model(body.model)
        try:
            body.check_supported()
            prompts = [self.prompt(p, body.max_tokens) for p in body.prompts()]
        except ValueError as exc:
            raise APIError(str(exc), param="prompt") from None
        logprobs = body.logprobs
        params = self.params(lambda: body.sampling_params(
            body.max_tokens, logprobs, logprobs if body.echo and logprobs is not None else None))
        request_id = f"cmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        if body.stream:
            return sse(self.stream_completions(body, prompts, params, request_id, created))
        outputs = await self.final_outputs(prompts, params, request_id, http_request)
        choices = []
        for i, output in enumerate(outputs):
            for completion in output.outputs:
                self.raise_if_failed(output, completion)
                text = completion.text
                entry = {"index": i * params.n + completion.index, "text": text, "logprobs": None,
                         "finish_reason": completion.finish_reason, "stop_reason": completion.stop_reason}
                if logprobs is not None:
                    tokens = completion.logprobs[:len(completion.token_ids)]
                    entry["logprobs"] = completion_logprobs(completion.token_ids, tokens, logprobs)
                if body.echo:
                    entry["text"] = (prompts[i].text or "") + text
                    if logprobs is not None:
                        entry["logprobs"] = merge_logprobs(
                            completion_logprobs(prompts[i].token_ids[1:], output.prompt_logprobs[1:], logprobs,
                                                first_none=True), entry["logprobs"])
                choices.append(entry)
        return JSONResponse({"id": request_id, "object": "text_completion", "created": created,
                             "model": self.model_name, "choices": choices, "usage": usage(outputs)})

    async def stream_completions(self, body: CompletionRequest, prompts: list[Prompt], params: SamplingParams,
                                 request_id: str, created: int) -> AsyncIterator[str]:
        def chunk(choices: list[dict], **extra) -> str:
            return sse_event({"id": request_id, "object": "text_completion", "created": created,
                              "model": self.model_name, "choices": choices, **extra})

        last: dict[int, RequestOutput] = {}
        if body.echo:
            for i, prompt in enumerate(prompts):
                yield chunk([{"index": i * params.n + j, "text": prompt.text or "", "logprobs": None,
                              "finish_reason": None} for j in range(params.n)])
        async for i, completion, delta, new_tokens, new_logprobs in self.deltas(prompts, params, request_id, last):
            entry = {"index": i * params.n + completion.index, "text": delta, "logprobs": None,
                     "finish_reason": completion.finish_reason, "stop_reason": completion.stop_reason}
            if body.logprobs is not None and new_tokens:
                entry["logprobs"] = completion_logprobs(new_tokens, new_logprobs, body.logprobs)
            yield chunk([entry])
        if body.stream_options is not None and body.stream_options.include_usage:
            yield chunk([], usage=usage([last[i] for i in sorted(last)]))
        yield "data: [DONE]\n\n"

    async def deltas(self, prompts: list[Prompt], params: SamplingParams, request_id: str,
                     last: dict[int, RequestOutput]) -> AsyncIterator[tuple]:
        """What each step adds to each completion, for a stream: (prompt index, completion, new text, new token
        ids, their logprobs); `last` keeps each prompt's latest output, for the usage chunk."""
        sent: dict[tuple[int, int], Sent] = {}
        async for i, output in self.run(prompts, params, request_id):
            last[i] = output
            for completion in output.outputs:
                self.raise_if_failed(output, completion)
                state = sent.setdefault((i, completion.index), Sent())
                end = len(completion.token_ids)
                delta, new_tokens = completion.text[state.text:], completion.token_ids[state.tokens:]
                if not delta and not new_tokens and completion.finish_reason is None:
                    continue
                new_logprobs = None if completion.logprobs is None else completion.logprobs[state.tokens:end]
                state.text, state.tokens = len(completion.text), end
                yield i, completion, delta, new_tokens, new_logprobs

    # --- chat -------------------------------------------------------------------------------------------------------

    async def chat(self, body: ChatCompletionRequest, http_request: Request) -> Response:
        from llminfer.chat import render_chat

        self.check_model(body.model)
        if self.tokenizer is None:
            raise APIError("this server has no tokenizer, so it cannot apply a chat template", param="messages")
        max_tokens = body.requested_max_tokens()
        try:
            text = render_chat(self.tokenizer, [m.as_dict() for m in body.messages],
                               add_generation_prompt=body.add_generation_prompt,
                               continue_final_message=body.continue_final_message)
            prompts = [self.prompt(text, max_tokens)]
        except ValueError as exc:
            raise APIError(str(exc), param="messages") from None
        params = self.params(lambda: body.sampling_params(max_tokens, body.requested_logprobs()))
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        if body.stream:
            return sse(self.stream_chat(body, prompts, params, request_id, created))
        (output,) = await self.final_outputs(prompts, params, request_id, http_request)
        choices = []
        for completion in output.outputs:
            self.raise_if_failed(output, completion)
            choices.append({
                "index": completion.index, "message": {"role": "assistant", "content": completion.text},
                "logprobs": None if params.logprobs is None else chat_logprobs(
                    completion.token_ids, completion.logprobs, params.logprobs),
                "finish_reason": completion.finish_reason, "stop_reason": completion.stop_reason})
        return JSONResponse({"id": request_id, "object": "chat.completion", "created": created,
                             "model": self.model_name, "choices": choices, "usage": usage([output])})

    async def stream_chat(self, body: ChatCompletionRequest, prompts: list[Prompt], params: SamplingParams,
                          request_id: str, created: int) -> AsyncIterator[str]:
        def chunk(choices: list[dict], **extra) -> str:
            return sse_event({"id": request_id, "object": "chat.completion.chunk", "created": created,
                              "model": self.model_name, "choices": choices, **extra})

        yield chunk([{"index": j, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                      "finish_reason": None} for j in range(params.n)])
        last: dict[int, RequestOutput] = {}
        async for _, completion, delta, new_tokens, new_logprobs in self.deltas(prompts, params, request_id, last):
            entry = {"index": completion.index, "delta": {"content": delta} if delta else {},
                     "logprobs": None, "finish_reason": completion.finish_reason}
            if params.logprobs is not None and new_tokens:
                entry["logprobs"] = chat_logprobs(new_tokens, new_logprobs, params.logprobs)
            yield chunk([entry])
        if body.stream_options is not None and body.stream_options.include_usage and last:
            yield chunk([], usage=usage(list(last.values())))
        yield "data: [DONE]\n\n"

    @staticmethod
    def raise_if_failed(output: RequestOutput, completion: CompletionOutput) -> None:
        if completion.finish_reason == "error":
            raise APIError(f"the request failed in the engine: {output.error}", 500, "InternalServerError")


# --- response pieces -----------------------------------------------------------------------------------------------

def usage(outputs: list[RequestOutput]) -> dict:
    prompt = sum(len(o.prompt_token_ids) for o in outputs)
    completion = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def ranked(entries: dict[int, Logprob], k: int) -> list[Logprob]:
    return sorted(entries.values(), key=lambda e: e.rank)[:k]


def completion_logprobs(token_ids: list[int], steps: list[dict[int, Logprob] | None], k: int,
                        first_none: bool = False) -> dict:
    """The completions API's logprobs object for these tokens (`first_none`: the prompt's first token,
    which has no logprob)."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    offset = 0
    if first_none:
        steps = [None, *steps]
    for token, entries in zip(token_ids, steps, strict=False):
        if entries is None:
            out["tokens"].append("")
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            out["text_offset"].append(offset)
            continue
        chosen = entries[token]
        text = chosen.decoded_token or ""
        out["tokens"].append(text)
        out["token_logprobs"].append(chosen.logprob)
        out["top_logprobs"].append({e.decoded_token or "": e.logprob for e in ranked(entries, k)})
        out["text_offset"].append(offset)
        offset += len(text)
    return out


def merge_logprobs(first: dict, second: dict | None) -> dict:
    if second is None:
        return first
    shift = sum(len(t) for t in first["tokens"])
    merged = {key: first[key] + second[key] for key in ("tokens", "token_logprobs", "top_logprobs")}
    merged["text_offset"] = first["text_offset"] + [o + shift for o in second["text_offset"]]
    return merged


def chat_logprobs(token_ids: list[int], steps: list[dict[int, Logprob]], k: int) -> dict:
    """The chat API's logprobs object: per token its text, logprob, UTF-8 bytes and top alternatives."""
    def entry(e: Logprob) -> dict:
        text = e.decoded_token or ""
        return {"token": text, "logprob": e.logprob, "bytes": list(text.encode("utf-8", "replace"))}

    content = []
    for token, entries in zip(token_ids, steps, strict=False):
        item = entry(entries[token])
        item["top_logprobs"] = [entry(e) for e in ranked(entries, k)]
        content.append(item)
    return {"content": content}


def sse_event(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def sse(events: AsyncIterator[str]) -> StreamingResponse:
    """A server-sent-event stream; an error after the stream began becomes an error event before [DONE]."""
    async def guarded() -> AsyncIterator[str]:
        try:
            async for event in events:
                yield event
        except APIError as exc:
            yield sse_event({"error": {"message": exc.message, "type": exc.kind, "param": exc.param,
                                       "code": exc.status}})
            yield "data: [DONE]\n\n"

    return StreamingResponse(guarded(), media_type="text/event-stream")


async def wait_for_disconnect(request: Request) -> None:
    """Returns when the client closes the connection (its body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


# --- the app -------------------------------------------------------------------------------------------------------

def build_app(engine: AsyncLLM, served_model_name: str | None = None, metrics: ServerMetrics | None = None) -> FastAPI:
    """The FastAPI app serving `engine`. Its lifespan stops the engine thread when the server stops."""
    name = served_model_name or engine.model_name
    serving = OpenAIServing(engine, name)
    metrics = metrics or ServerMetrics(name)
    if engine.on_stats is None:
        engine.on_stats = metrics.record

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        engine.shutdown()

    app = FastAPI(title="llminfer", lifespan=lifespan)
    app.state.serving, app.state.metrics = serving, metrics

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.message, exc.status, exc.kind, exc.param)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        if any(err.get("type") == "json_invalid" for err in exc.errors()):
            return error_response(f"the request body is not valid JSON: {exc.errors()[0].get('ctx', {}).get('error')}",
                                  400, "BadRequestError")
        for err in exc.errors()[:5]:
            where = ".".join(str(part) for part in err.get("loc", ()) if part != "body")
            problems.append(f"{where or 'body'}: {err.get('msg', 'invalid')}")
        first = exc.errors()[0] if exc.errors() else {}
        param = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
        return error_response("; ".join(problems) or "invalid request", 400, "BadRequestError", param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "NotFoundError" if exc.status_code == 404 else "BadRequestError"
        return error_response(str(exc.detail), exc.status_code, kind)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await serving.completions(body, request)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request) -> Response:
        return await serving.chat(body, request)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": name, "object": "model", "created": int(time.time()),
                                            "owned_by": "llminfer", "max_model_len": serving.max_model_len}]}

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200 if engine.is_running else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        if engine.last_stats is not None:
            metrics.update_gauges(engine.last_stats)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    from llminfer.serve.batch import batch_router  # here, not at the top: batch.py imports this module
    app.include_router(batch_router(serving))
    return app


def serve(model: str, host: str = "127.0.0.1", port: int = 8000, served_model_name: str | None = None,
          log_level: str = "info", engine_core: str = "process", **llm_kwargs) -> None:
    """Start the engine (in a child process, or a thread of this one), build the app, and serve it with uvicorn
    until SIGINT or SIGTERM."""
    import uvicorn

    from llminfer.engine.llm import LLM

    if engine_core not in ("process", "thread"):
        raise ValueError(f"engine_core must be 'process' or 'thread', got {engine_core!r}")
    if engine_core == "process":
        engine = AsyncLLM.in_own_process(model, served_model_name or model, **llm_kwargs)
    else:
        engine = AsyncLLM.from_llm(LLM(model, **llm_kwargs))
    app = build_app(engine, served_model_name or model)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=60)
