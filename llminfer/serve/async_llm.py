"""`AsyncLLM`: requests as async iterators over an engine loop that runs elsewhere (vLLM's AsyncLLM shape).

The offline `LLM.generate` runs the loop itself until its prompts finish. A server cannot: requests arrive
at any time from many clients and each wants its tokens as they come. So the engine loop runs on its own
(`engine_core.py`: in a background thread, or in a child process), and the event loop talks to it with
messages: add and abort go in, each step's outputs come back and are handed to a per-request
`asyncio.Queue`. The engine is only ever touched by its loop, so it needs no lock.

Each yielded `RequestOutput` carries the completion's text so far (detokenised incrementally, here in the
caller's process, see `detokenizer.py`), so a stream sends `text[len(sent):]`; the last one carries the
engine's final text. Leaving the iterator early (a client that disconnects, a cancelled task) aborts the
request and frees its KV blocks.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from llminfer.engine.llm_engine import LLMEngine
from llminfer.engine.outputs import RequestOutput
from llminfer.sampling import SamplingParams
from llminfer.serve.detokenizer import IncrementalDetokenizer
from llminfer.serve.engine_core import EngineStats, ProcessCore, ThreadCore, engine_stats


class EngineDeadError(RuntimeError):
    """The engine loop has stopped: no request can be served any more."""


@dataclass
class _Stream:
    outputs: asyncio.Queue
    loop: asyncio.AbstractEventLoop


class AsyncLLM:
    """Serve an engine to many concurrent async callers."""

    def __init__(self, engine: LLMEngine, model_name: str = "llminfer",
                 on_stats: Callable[[EngineStats, list[RequestOutput]], None] | None = None):
        """Run `engine`'s loop in a background thread. `on_stats(stats, outputs)` runs after every step and
        abort (the server's metrics), on the loop's thread."""
        self._setup(model_name, engine.tokenizer, on_stats)
        self.engine = engine
        self.max_model_len, self.vocab_size = engine.max_model_len, engine.model.config.vocab_size
        self.max_num_seqs = engine.scheduler.max_num_seqs
        self.last_stats = engine_stats(engine)
        self._core = ThreadCore(engine, self._on_message)

    def _setup(self, model_name: str, tokenizer, on_stats) -> None:
        self.model_name, self.tokenizer, self.on_stats = model_name, tokenizer, on_stats
        self._streams: dict[str, _Stream] = {}   # where each running request's outputs go
        self._lock = threading.Lock()             # _streams is changed by callers and by the loop's messages
        self._ids = itertools.count()
        self._error: str | None = None
        self.on_stats_error: Exception | None = None   # the last exception `on_stats` raised, if any

    @classmethod
    def from_llm(cls, llm, **kwargs) -> AsyncLLM:
        """Serve the engine an offline `LLM` built (its model, tokenizer and settings), in a thread. The engine
        has one driver at a time: until `shutdown`, `llm.generate` refuses to run."""
        served = cls(llm.llm_engine, llm.model_name, **kwargs)
        llm.served_by = served
        return served

    @classmethod
    def in_own_process(cls, model: str, model_name: str | None = None,
                       on_stats: Callable[[EngineStats, list[RequestOutput]], None] | None = None,
                       **llm_kwargs) -> AsyncLLM:
        """Build `LLM(model, **llm_kwargs)` in a child process and run its loop there (vLLM V1's EngineCore):
        the engine's Python then never waits for this process's, and the reverse."""
        from llminfer.models.loader import load_tokenizer
        from llminfer.models.registry import resolve_model_path

        self = cls.__new__(cls)
        tokenizer = None
        if not llm_kwargs.get("skip_tokenizer_init", False):
            tokenizer_path = llm_kwargs.get("tokenizer")
            tokenizer = load_tokenizer(resolve_model_path(tokenizer_path or model))
        self._setup(model_name or model, tokenizer, on_stats)
        self.engine = None
        self.last_stats = None
        self._core = ProcessCore(model, llm_kwargs, self._on_message)
        self.max_model_len, self.vocab_size = self._core.max_model_len, self._core.vocab_size
        self.max_num_seqs = self._core.max_num_seqs
        return self

    # --- the caller's side (event loop) --------------------------------------------------------------------------

    @property
    def is_running(self) -> bool:
        return self._error is None and self._core.is_alive

    async def generate(self, prompt: str | dict, sampling_params: SamplingParams | None = None,
                       request_id: str | None = None, final_only: bool = False) -> AsyncIterator[RequestOutput]:
        """Submit a request and yield its outputs as they change, the last one with `finished=True`.
        Invalid parameters raise ValueError before anything is yielded. `final_only` (vLLM's FINAL_ONLY
        output kind) yields only the finished output: a caller that will not stream saves the per-step
        hand-over and the incremental detokenisation."""
        if not self.is_running:
            raise EngineDeadError(f"the engine loop has stopped: {self._error or 'shut down'}")
        params = sampling_params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling params must be a SamplingParams, got {type(params).__name__}")
        params = params.clone()
        params.validate()
        request_id = f"req-{next(self._ids)}" if request_id is None else request_id
        if not isinstance(request_id, str):
            raise ValueError(f"request_id must be a str or None, got {type(request_id).__name__}")
        outputs: asyncio.Queue = asyncio.Queue()
        with self._lock:
            if request_id in self._streams:
                raise ValueError(f"request id {request_id!r} is already running")
            self._streams[request_id] = _Stream(outputs, asyncio.get_running_loop())
        self._core.send(("add", request_id, prompt, params, final_only))
        detokenizers: list[IncrementalDetokenizer] = []
        finished = False
        try:
            while not finished:
                item = await outputs.get()
                while not outputs.empty() and not isinstance(item, BaseException):   # catch up: outputs are
                    item = outputs.get_nowait()                                      # cumulative, keep the latest
                if isinstance(item, BaseException):
                    finished = True   # refused at submission, or the engine stopped (and aborted it)
                    raise item
                finished = item.finished
                yield self._with_text(item, params, detokenizers)
        finally:
            if not finished:   # the caller left early: free the request's blocks
                await self.abort(request_id)

    async def abort(self, request_id: str) -> None:
        with self._lock:
            self._streams.pop(request_id, None)
        if self._core.is_alive:
            self._core.send(("abort", request_id))

    def _with_text(self, output: RequestOutput, params: SamplingParams,
                   detokenizers: list[IncrementalDetokenizer]) -> RequestOutput:
        """Fill each running completion's text with what its detokenizer can send so far."""
        if self.tokenizer is None or not params.detokenize:
            return output
        while len(detokenizers) < len(output.outputs):
            detokenizers.append(IncrementalDetokenizer(self.tokenizer, params.stop, params.min_tokens))
        completions = []
        for completion, detokenizer in zip(output.outputs, detokenizers, strict=True):
            if completion.finish_reason is None:
                detokenizer.update(completion.token_ids)
                text = detokenizer.text[:detokenizer.sent]
            elif completion.finish_reason in ("abort", "error") and not completion.text:
                text = detokenizer.text[:detokenizer.sent]   # the engine kept no text: the stream stops here
            else:
                detokenizer.finish(completion.text)
                text = completion.text
            completions.append(dataclasses.replace(completion, text=text))
        return dataclasses.replace(output, outputs=completions)

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the engine loop; requests still running are aborted and their callers told."""
        self._core.shutdown(timeout)
        self._fail_all("the engine shut down")

    # --- messages from the engine loop (its thread, or the thread reading the engine process's pipe) ----------------

    def _on_message(self, message: tuple) -> None:
        kind = message[0]
        if kind == "outputs":
            _, outputs, stats = message
            self._deliver(outputs)
            self._record(stats, outputs)
        elif kind == "stats":
            self._record(message[1], [])
        elif kind == "rejected":
            _, request_id, error = message
            with self._lock:
                stream = self._streams.pop(request_id, None)
            if stream is not None:
                _call_soon(stream.loop, stream.outputs.put_nowait, error)
        elif kind == "dead":
            self._error = message[1]
            self._fail_all(f"the engine failed: {message[1]}")

    def _record(self, stats: EngineStats, outputs: list[RequestOutput]) -> None:
        self.last_stats = stats
        if self.on_stats is not None:
            try:
                self.on_stats(stats, outputs)
            except Exception as exc:  # noqa: BLE001 - bookkeeping must never stop serving
                self.on_stats_error = exc

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        """Hand each output to its caller's queue: one wake-up of each caller's event loop per step, not one per
        output (a cross-thread call writes to the loop's self-pipe, and a step can carry hundreds of outputs)."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        with self._lock:
            for output in outputs:
                stream = self._streams.get(output.request_id)
                if stream is None:
                    continue
                if output.finished:
                    del self._streams[output.request_id]
                by_loop.setdefault(stream.loop, []).append((stream.outputs, output))
        for loop, items in by_loop.items():
            if not _call_soon(loop, _put_all, items):   # the caller's event loop is closed: nobody listens
                for _, output in items:
                    if not output.finished and self._core.is_alive:
                        self._core.send(("abort", output.request_id))

    def _fail_all(self, reason: str) -> None:
        with self._lock:
            streams, self._streams = list(self._streams.values()), {}
        for stream in streams:
            _call_soon(stream.loop, stream.outputs.put_nowait, EngineDeadError(reason))


def _call_soon(loop: asyncio.AbstractEventLoop, fn, *args) -> bool:
    try:
        loop.call_soon_threadsafe(fn, *args)
        return True
    except RuntimeError:   # the loop is closed
        return False


def _put_all(items: list[tuple[asyncio.Queue, RequestOutput]]) -> None:
    for outputs, output in items:
        outputs.put_nowait(output)


def wait_idle(engine: LLMEngine, timeout: float = 10.0) -> bool:
    """For tests and shutdown: wait until the engine has no unfinished request (True) or time runs out."""
    deadline = time.monotonic() + timeout
    while engine.has_unfinished_requests():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True
