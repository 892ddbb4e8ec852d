"""`AsyncLLM`: the engine loop in a background thread, requests as async iterators (vLLM's AsyncLLM shape).

The offline `LLM.generate` runs the loop itself until its prompts finish. A server cannot: requests arrive
at any time from many clients and each wants its tokens as they come. So one thread owns the engine and
runs `step()` whenever there is work; the event loop talks to it through a command queue (add, abort) and
gets each step's outputs back through a per-request `asyncio.Queue`. The engine is only ever touched by
its thread, so it needs no lock.

Each yielded `RequestOutput` carries the completion's text so far (detokenised incrementally, see
`detokenizer.py`), so a stream sends `text[len(sent):]`; the last one carries the engine's final text.
Leaving the iterator early (a client that disconnects, a cancelled task) aborts the request and frees
its KV blocks.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from llminfer.engine.llm_engine import LLMEngine
from llminfer.engine.outputs import RequestOutput
from llminfer.sampling import SamplingParams
from llminfer.serve.detokenizer import IncrementalDetokenizer


class EngineDeadError(RuntimeError):
    """The engine thread has stopped: no request can be served any more."""


@dataclass
class _Add:
    request_id: str
    prompt: str | dict
    params: SamplingParams
    outputs: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    final_only: bool = False


@dataclass
class _Abort:
    request_id: str


_STOP = object()


class AsyncLLM:
    """Serve an `LLMEngine` to many concurrent async callers."""

    def __init__(self, engine: LLMEngine, model_name: str = "llminfer",
                 on_step: Callable[[LLMEngine, list[RequestOutput]], None] | None = None):
        """`on_step(engine, outputs)` runs in the engine thread after every step (the server's metrics)."""
        self.engine, self.model_name, self.on_step = engine, model_name, on_step
        self.tokenizer = engine.tokenizer
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, _Add] = {}   # engine thread only: where each running request's outputs go
        self._ids = itertools.count()
        self._error: BaseException | None = None
        self.on_step_error: Exception | None = None   # the last exception `on_step` raised, if any
        self._thread = threading.Thread(target=self._run, name="llminfer-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_llm(cls, llm, **kwargs) -> AsyncLLM:
        """Serve the engine an offline `LLM` built (its model, tokenizer and settings). The engine has one
        driver at a time: until `shutdown`, `llm.generate` refuses to run."""
        served = cls(llm.llm_engine, llm.model_name, **kwargs)
        llm.served_by = served
        return served

    # --- the caller's side (event loop) --------------------------------------------------------------------------

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive()

    async def generate(self, prompt: str | dict, sampling_params: SamplingParams | None = None,
                       request_id: str | None = None, final_only: bool = False) -> AsyncIterator[RequestOutput]:
        """Submit a request and yield its outputs as they change, the last one with `finished=True`.
        Invalid parameters raise ValueError before anything is yielded. `final_only` (vLLM's FINAL_ONLY
        output kind) yields only the finished output: a caller that will not stream saves the per-step
        hand-over and the incremental detokenisation."""
        if not self.is_running:
            raise EngineDeadError(f"the engine thread has stopped: {self._error!r}")
        params = sampling_params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling params must be a SamplingParams, got {type(params).__name__}")
        params = params.clone()
        params.validate()
        request_id = f"req-{next(self._ids)}" if request_id is None else request_id
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue = asyncio.Queue()
        self._commands.put(_Add(request_id, prompt, params, outputs, loop, final_only))
        detokenizers: list[IncrementalDetokenizer] = []
        finished = False
        try:
            while not finished:
                item = await outputs.get()
                while not outputs.empty() and not isinstance(item, BaseException):   # catch up: outputs are
                    item = outputs.get_nowait()                                      # cumulative, keep the latest
                if isinstance(item, BaseException):
                    finished = True   # refused at submission (nothing to abort: the id may be another's), or
                    raise item        # the engine stopped and has aborted it already
                finished = item.finished
                yield self._with_text(item, params, detokenizers)
        finally:
            if not finished:   # the caller left early, or the engine failed: free the request's blocks
                self._commands.put(_Abort(request_id))

    async def abort(self, request_id: str) -> None:
        self._commands.put(_Abort(request_id))

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
        """Stop the engine thread; requests still running are aborted."""
        self._commands.put(_STOP)
        self._thread.join(timeout)

    # --- the engine thread -----------------------------------------------------------------------------------------

    def _run(self) -> None:
        engine = self.engine
        try:
            while True:
                # Wait for a command only when idle; with work to do, take whatever has arrived and step.
                if not engine.has_unfinished_requests():
                    try:
                        command = self._commands.get(timeout=0.5)
                    except queue.Empty:
                        continue
                    if command is _STOP:
                        break
                    self._apply(command)
                while True:
                    try:
                        command = self._commands.get_nowait()
                    except queue.Empty:
                        break
                    if command is _STOP:
                        return self._abort_all("the engine shut down")
                    self._apply(command)
                if engine.has_unfinished_requests():
                    outputs = engine.step()
                    if self.on_step is not None:
                        try:
                            self.on_step(engine, outputs)
                        except Exception as exc:  # noqa: BLE001 - bookkeeping must never stop serving
                            self.on_step_error = exc
                    self._deliver(outputs)
        except BaseException as exc:  # noqa: BLE001 - the engine itself broke: every caller must hear it
            self._error = exc
            self._abort_all(f"the engine failed: {type(exc).__name__}: {exc}")
            return
        self._abort_all("the engine shut down")

    def _apply(self, command) -> None:
        if isinstance(command, _Abort):
            self.engine.abort(command.request_id)
            self._streams.pop(command.request_id, None)
            return
        try:
            self.engine.add_request(command.request_id, command.prompt, command.params)
        except Exception as exc:  # noqa: BLE001 - a bad request fails alone
            command.loop.call_soon_threadsafe(command.outputs.put_nowait, exc)
            return
        self._streams[command.request_id] = command

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        """Hand each output to its caller's queue: one wake-up of each caller's event loop per step, not one per
        output (a cross-thread call writes to the loop's self-pipe, and a step can carry hundreds of outputs)."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is None or (stream.final_only and not output.finished):
                continue
            if output.finished:
                del self._streams[output.request_id]
            by_loop.setdefault(stream.loop, []).append((stream.outputs, output))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:   # the caller's event loop is closed: nobody is listening any more
                for _, output in items:
                    self.engine.abort(output.request_id)

    def _abort_all(self, reason: str) -> None:
        for request_id, stream in list(self._streams.items()):
            self.engine.abort(request_id)
            try:
                stream.loop.call_soon_threadsafe(stream.outputs.put_nowait, EngineDeadError(reason))
            except RuntimeError:
                pass
        self._streams.clear()


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
