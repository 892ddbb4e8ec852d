"""The engine core: the loop that owns an `LLMEngine` and steps it, run in a thread or in a process of its own.

It speaks in messages, so the same loop serves both places. In: ("add", id, prompt, params, final_only),
("abort", id), ("stop",). Out: ("outputs", [RequestOutput], EngineStats) after every step, ("rejected", id,
error) for a request `add_request` refused, ("dead", reason) if the loop itself fails.

In a thread (`ThreadCore`) the engine shares the interpreter lock with the server's event loop: every bit of
Python one does (parsing a request, writing an event) delays the other's next step. In a process
(`ProcessCore`, vLLM V1's EngineCore design) the two run truly in parallel and exchange pickled messages
over a pipe; the model and its KV cache live only in the child.
"""

from __future__ import annotations

import multiprocessing
import queue
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from llminfer.engine.llm_engine import LLMEngine
from llminfer.engine.outputs import RequestOutput


@dataclass
class EngineStats:
    """What the server's metrics need from one step, small enough to send between processes."""

    num_running: int
    num_waiting: int
    num_used_blocks: int
    num_blocks: int
    prefix_queries: int = 0       # prompt tokens looked up in the prefix cache this step
    prefix_hits: int = 0          # ...and found there
    preemptions: int = 0
    aborted_ids: list[str] = field(default_factory=list)
    time: float = 0.0             # time.perf_counter() when the step ended (system-wide monotonic on Linux)
    # Per request that changed in the step: (id, prompt tokens, output tokens so far, arrival time, finish
    # reason or None). Sent for every request, also those whose caller gets only the final output.
    progress: list[tuple[str, int, int, float, str | None]] = field(default_factory=list)


def engine_stats(engine: LLMEngine, outputs: list[RequestOutput] | None = None) -> EngineStats:
    stats = EngineStats(len(engine.scheduler.running), len(engine.scheduler.waiting), engine.pool.num_used_blocks,
                        engine.pool.num_blocks, time=time.perf_counter())
    for o in outputs or ():
        reason = next((c.finish_reason for c in o.outputs if c.finish_reason), "abort") if o.finished else None
        stats.progress.append((o.request_id, len(o.prompt_token_ids), sum(len(c.token_ids) for c in o.outputs),
                               o.metrics.arrival_time, reason))
    if outputs is not None and engine.trace:
        record = engine.trace[-1]
        prompt_lengths = {o.request_id: len(o.prompt_token_ids) for o in outputs}
        for request_id, hits in record.prefix_hits.items():
            seq = engine.requests.get(request_id)
            stats.prefix_queries += seq.num_prompt_tokens if seq is not None else prompt_lengths.get(request_id, hits)
            stats.prefix_hits += hits
        stats.preemptions = len(record.preempted)
    return stats


def engine_loop(engine: LLMEngine, receive: Callable[[bool], tuple | None], emit: Callable[[tuple], None]) -> None:
    """Take messages, step while there is work, emit each step's outputs. `receive(block)` returns a message or
    None (waiting up to half a second when `block`); returns on ("stop",), aborting what is left."""
    final_only: set[str] = set()   # requests whose caller wants only the finished output
    try:
        while True:
            message = receive(not engine.has_unfinished_requests())
            while message is not None:
                kind = message[0]
                if kind == "stop":
                    for request_id in list(engine.requests):
                        engine.abort(request_id)
                    return
                if kind == "abort":
                    engine.abort(message[1])
                    final_only.discard(message[1])
                    stats = engine_stats(engine)
                    stats.aborted_ids = [message[1]]
                    emit(("stats", stats))
                elif kind == "add":
                    _, request_id, prompt, params, final = message
                    try:
                        engine.add_request(request_id, prompt, params)
                    except Exception as exc:  # noqa: BLE001 - a bad request fails alone
                        emit(("rejected", request_id, exc))
                    else:
                        if final:
                            final_only.add(request_id)
                message = receive(False)
            if engine.has_unfinished_requests():
                outputs = engine.step()
                stats = engine_stats(engine, outputs)
                final_only.difference_update(o.request_id for o in outputs if o.finished)
                emit(("outputs", [o for o in outputs if o.finished or o.request_id not in final_only], stats))
    except BaseException as exc:  # noqa: BLE001 - the loop itself broke: every caller must hear it
        emit(("dead", f"{type(exc).__name__}: {exc}"))


class ThreadCore:
    """The engine loop in a background thread of this process."""

    def __init__(self, engine: LLMEngine, emit: Callable[[tuple], None]):
        self.engine = engine
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=engine_loop, args=(engine, self._receive, emit),
                                        name="llminfer-engine", daemon=True)
        self._thread.start()

    def _receive(self, block: bool) -> tuple | None:
        try:
            return self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
        except queue.Empty:
            return None

    def send(self, message: tuple) -> None:
        self._inbox.put(message)

    @property
    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def shutdown(self, timeout: float = 10.0) -> None:
        self.send(("stop",))
        self._thread.join(timeout)


def _process_main(model: str, llm_kwargs: dict, connection) -> None:
    """The child: build the engine, tell the parent it is ready (or why not), then run the loop on the pipe."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C goes to the whole group; the parent decides
    try:
        from llminfer.engine.llm import LLM

        engine = LLM(model, **llm_kwargs).llm_engine
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which raises it
        connection.send(("failed", exc))
        return
    config = engine.model.config
    connection.send(("ready", engine.max_model_len, config.vocab_size, engine.scheduler.max_num_seqs))

    def receive(block: bool) -> tuple | None:
        if not connection.poll(0.5 if block else 0):
            return None
        try:
            return connection.recv()
        except EOFError:   # the parent is gone
            return ("stop",)

    engine_loop(engine, receive, connection.send)
    connection.send(("stopped",))


class ProcessCore:
    """The engine loop in a child process; a reader thread here turns its messages into `emit` calls."""

    engine = None   # the engine lives in the child

    def __init__(self, model: str, llm_kwargs: dict, emit: Callable[[tuple], None], startup_timeout: float = 600):
        context = multiprocessing.get_context("spawn")   # not fork: torch's thread pools do not survive a fork
        self._connection, child = context.Pipe()
        self._process = context.Process(target=_process_main, args=(model, llm_kwargs, child),
                                        name="llminfer-engine-core", daemon=True)
        self._process.start()
        child.close()
        if not self._connection.poll(startup_timeout):
            self._process.kill()
            raise RuntimeError(f"the engine process did not start within {startup_timeout:.0f} s")
        message = self._connection.recv()
        if message[0] == "failed":
            self._process.join(5)
            raise message[1]
        _, self.max_model_len, self.vocab_size, self.max_num_seqs = message
        self._send_lock = threading.Lock()
        self._emit = emit
        self._reader = threading.Thread(target=self._read, name="llminfer-engine-reader", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                message = self._connection.recv()
            except (EOFError, OSError):
                self._emit(("dead", f"the engine process exited (status {self._process.exitcode})"))
                return
            if message[0] == "stopped":
                return
            self._emit(message)

    def send(self, message: tuple) -> None:
        with self._send_lock:   # callers on several threads; a pipe carries one message at a time
            self._connection.send(message)

    @property
    def is_alive(self) -> bool:
        return self._process.is_alive() and self._reader.is_alive()

    def shutdown(self, timeout: float = 10.0) -> None:
        try:
            self.send(("stop",))
        except OSError:
            pass
        self._reader.join(timeout)
        self._process.join(timeout)
        if self._process.is_alive():
            self._process.kill()
