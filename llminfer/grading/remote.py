"""The scoring side of grading: tests run here, the student's answer runs in another process.

A test is written as if it held the answer (`test.run(answer)` calls it, builds instances, reads attributes),
but what it holds is a proxy (`RemoteAnswer`): each use is a request over the wire to the process that has the
answer, and what comes back is plain data of exact types. Expected values are computed here, compared here and
scored here; nothing the student's code returns can be an object of its making, and nothing it can reach (its
own process, the stack there, the files it can write) holds a reference answer or decides a score.

Two ways to get that process, one protocol:
- `run_test_in_fork`: fork this process (the answer is already in memory: `check()` in a notebook, the tests),
  the child serves the answer for one test;
- `contained.StudentProcess`: `llminfer grade` starts a clean, isolated interpreter for a submission file, with resource
  limits and, when the grader runs as root, as an unprivileged user; it forks a child per test.
"""

from __future__ import annotations

import builtins
import contextlib
import os
import signal
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from llminfer.grading import wire
from llminfer.grading.compare import Mismatch
from llminfer.grading.sandbox import cut, death

END_GRACE_S = 5.0   # for the child to send what it printed and exit after the test


class RemoteError(Exception):
    """The student's code raised; `kind` is the exception's type name, as the student's process reported it.

    `RemoteError.of(kind, message)` is also an instance of the built-in exception of that name (ValueError,
    IndexError, ...), so a test can expect the answer to raise one as if it ran here."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind, self.message = kind, message

    @classmethod
    def of(cls, kind: str, message: str) -> RemoteError:
        builtin = getattr(builtins, kind, None)
        if (isinstance(builtin, type) and issubclass(builtin, Exception) and not issubclass(builtin, StopIteration)
                and builtin.__module__ == "builtins"):
            if builtin not in _AS_BUILTIN:
                _AS_BUILTIN[builtin] = type(f"Remote{kind}", (cls, builtin), {"__init__": cls.__init__,
                                                                              "__str__": lambda self: self.message})
            return _AS_BUILTIN[builtin](kind, message)
        return cls(kind, message)


_AS_BUILTIN: dict[type, type] = {}


class ChildExited(Exception):
    """The child serving the answer ended before it replied."""

    def __init__(self, status: int | None):
        super().__init__(status)
        self.status = status


# --- what the wire carries from here: recipes and generators -------------------------------------------------------

_RECIPE_BY_ID: dict[int, tuple[object, wire.Recipe]] = {}
_RECIPE_BY_TYPE: dict[type, Callable[[object], wire.Recipe]] = {}


def send_as_recipe(obj: object, name: str, *args) -> object:
    """From now on `obj` crosses the wire as `support.RECIPES[name](*args)`, built on the student's side."""
    _RECIPE_BY_ID[id(obj)] = (obj, wire.Recipe(name, args))
    return obj


def send_type_as_recipe(cls: type, recipe: Callable[[object], wire.Recipe]) -> None:
    """Instances of `cls` cross the wire as `recipe(instance)`."""
    _RECIPE_BY_TYPE[cls] = recipe


def _encode_extra(value: object):
    if isinstance(value, RemoteObject):
        return wire.Handle(object.__getattribute__(value, "_number"))
    known = _RECIPE_BY_ID.get(id(value))
    if known is not None and known[0] is value:
        return known[1]
    if type(value) in _RECIPE_BY_TYPE:
        return _RECIPE_BY_TYPE[type(value)](value)
    return None


# --- the channel and the proxies ----------------------------------------------------------------------------------

class Channel:
    """Requests to the child serving one test's answer, each answered before a deadline."""

    def __init__(self, requests: int, replies: int, deadline: float):
        self.requests, self.replies, self.deadline, self.count = requests, replies, deadline, 0
        self.iterators: list[Iterator] = []   # ours, handed to the answer, read by it item by item
        self.generators: set[int] = set()     # random generators whose state the answer's side has

    def _encode(self, value: object):
        if isinstance(value, torch.Generator):   # its state once; then the answer's side draws from its own copy
            token = id(value)
            if token in self.generators:
                return lambda encoder: {"g": [token, -1]}
            self.generators.add(token)
            return lambda encoder: {"g": [token, encoder.blob(value.get_state().numpy().tobytes())]}
        if isinstance(value, Iterator) and not isinstance(value, RemoteIterator):
            self.iterators.append(value)
            token = len(self.iterators) - 1
            return lambda encoder: {"i": token}
        return _encode_extra(value)

    def _answer_pull(self, token: object) -> None:
        if type(token) is not int or not 0 <= token < len(self.iterators):
            raise wire.WireError("a request for an iterator that was never sent")
        try:
            message = {"item": next(self.iterators[token])}
        except StopIteration:
            message = {"stop": True}
        wire.send(self.requests, message, extra=self._encode)

    def receive(self) -> dict:
        return wire.receive(self.replies, self.deadline, extra=self._decode_extra)

    def request(self, op: str, *args, **fields):
        kwargs = fields.pop("kwargs", {})
        self.count += 1
        wire.send(self.requests, {"id": self.count, "op": op, "args": list(args), "kwargs": kwargs, **fields},
                  extra=self._encode)
        reply = self.receive()
        while "pull" in reply:   # the answer reads the next item of an iterator we gave it
            self._answer_pull(reply["pull"])
            reply = self.receive()
        if "exit" in reply:
            raise ChildExited(reply["exit"] if type(reply["exit"]) is int else None)
        if reply.get("id") != self.count:
            raise wire.WireError("a reply that answers no request")
        if "error" in reply:
            error = reply["error"]
            if type(error) is not list or len(error) != 2 or not all(type(part) is str for part in error):
                raise wire.WireError("a malformed error")
            raise RemoteError.of(*error)
        if "ok" not in reply:
            raise wire.WireError("a reply with no value")
        _write_back(args, reply.get("args"))
        return reply["ok"]

    def _decode_extra(self, tag: str, payload: object, decoder: wire.Decoder) -> object:
        if tag == "h" and type(payload) is int:
            return RemoteObject(self, payload)
        if tag == "m" and type(payload) is str:
            return wire.Method(payload)
        if tag == "it" and type(payload) is int:
            return RemoteIterator(self, payload)
        raise wire.WireError(f"malformed reply: tag {tag!r}")


def _write_back(sent: tuple, returned: object) -> None:
    """What the answer wrote into the tensors it was given, written into ours (the tests check it)."""
    if type(returned) is not list or len(returned) != len(sent):
        return
    for ours, theirs in zip(sent, returned, strict=True):
        if (isinstance(ours, torch.Tensor) and isinstance(theirs, torch.Tensor) and theirs.shape == ours.shape
                and theirs.dtype == ours.dtype and not torch.equal(theirs, ours.detach().cpu())):
            with torch.no_grad():
                ours.copy_(theirs)


class RemoteAnswer:
    """The student's answer (a function, a class or a Triton kernel) in the process serving it."""

    def __init__(self, channel: Channel, kind: str):
        self.channel, self.kind = channel, kind

    def __call__(self, *args, **kwargs):
        return self.channel.request("new" if self.kind == "class" else "call", *args, kwargs=kwargs)

    def map(self, calls: list[tuple]) -> list:
        """[answer(*args) for args in calls], in one request (a statistical test makes thousands of calls)."""
        return self.channel.request("map", [list(args) for args in calls])

    def harness(self, name: str, *args, **kwargs):
        """support.HARNESSES[name](answer, *args, **kwargs), run where the answer is."""
        return self.channel.request("harness", *args, name=name, kwargs=kwargs)

    def __repr__(self) -> str:
        return f"<the answer ({self.kind}), in the student's process>"


class RemoteObject:
    """An instance of the student's class, in the process serving it: attributes and methods by request."""

    __slots__ = ("_channel", "_number")

    def __init__(self, channel: Channel, number: int):
        object.__setattr__(self, "_channel", channel)
        object.__setattr__(self, "_number", number)

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        channel, number = object.__getattribute__(self, "_channel"), object.__getattribute__(self, "_number")
        value = channel.request("getattr", handle=number, name=name)
        if isinstance(value, wire.Method):
            return lambda *args, **kwargs: channel.request("method", *args, handle=number, name=name, kwargs=kwargs)
        return value

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("the grader does not set attributes of the answer's objects")

    def __repr__(self) -> str:
        return "<an object of the answer's class, in the student's process>"


class RemoteIterator(Iterator):
    """An iterator the answer returned (a generator of events), read here one item per request."""

    def __init__(self, channel: Channel, number: int):
        self.channel, self.number = channel, number

    def __next__(self):
        try:
            return self.channel.request("next", handle=self.number)
        except RemoteError as exc:
            if exc.kind == "StopIteration":
                raise StopIteration from None
            raise


def call_each(answer, calls: list[tuple]) -> list:
    """The answer called with each tuple of arguments: in one request to the answer's process."""
    if isinstance(answer, RemoteAnswer):
        results = answer.map(calls)
        if type(results) is not list or len(results) != len(calls):
            raise wire.WireError("the batch of calls came back with the wrong number of results")
        return results
    return [answer(*args) for args in calls]


def run_kernel(kernel, launcher: str, tensors: tuple, *extra) -> torch.Tensor:
    """Launch a student's Triton kernel with `support.LAUNCHERS[launcher]` where the kernel is."""
    from llminfer.grading import support

    if isinstance(kernel, RemoteAnswer):
        out = kernel.harness("run_kernel", launcher, tensors, *extra)
        if not isinstance(out, torch.Tensor):
            raise Mismatch(f"the launch returned a {type(out).__name__}, expected a tensor")
        return out
    return support.run_kernel(kernel, launcher, tensors, *extra)


# --- one test --------------------------------------------------------------------------------------------------------

@dataclass
class Connection:
    """One test's child: the channel to it, the proxy of the answer, and how to end it (`finish(killed)` returns
    the child's wait status when it is known)."""

    channel: Channel
    answer: RemoteAnswer
    finish: Callable[[bool], int | None]


def judge(test: Callable[[object], str | None], connection: Connection, timeout: float) -> tuple[bool, str, str]:
    """Run `test` on the proxy of the answer: (passed, message, the start of what the answer printed)."""
    killed = False
    try:
        try:
            detail = test(connection.answer)
            passed, message = True, detail if type(detail) is str else ""
        except Mismatch as exc:
            passed, message = False, cut(str(exc))
        except RemoteError as exc:
            passed, message = False, _raised(exc)
        except wire.Timeout:
            killed = True
            return False, f"timed out after {timeout:g} s (an infinite loop?); the test was stopped", ""
        except (ChildExited, wire.Closed) as exc:
            killed = True
            status = exc.status if isinstance(exc, ChildExited) else None
            return False, death(status if status is not None else connection.finish(True) or 0), ""
        except wire.WireError as exc:
            killed = True
            return False, cut(f"the answer's process sent what the grader cannot read: {exc}"), ""
        except RecursionError:
            passed, message = False, "the grader could not check the answer: it is nested too deeply"
        except Exception as exc:  # the test's own checks met data they could not handle: the answer fails
            passed, message = False, cut(f"the grader could not check the answer: {type(exc).__name__}: {exc}")
        printed, note = _end(connection)
        return passed, cut(message + note) if note else message, printed
    except BaseException:
        killed = True
        raise
    finally:
        connection.finish(killed)


def _end(connection: Connection) -> tuple[str, str]:
    """Ask the child for what the answer printed, and let it exit."""
    channel = connection.channel
    channel.deadline = min(channel.deadline, time.monotonic() + END_GRACE_S) if channel.deadline else None
    try:
        channel.count += 1
        wire.send(channel.requests, {"id": channel.count, "op": "end"})
        reply = channel.receive()
        printed, note = reply.get("printed"), reply.get("note")
        return (printed[:1000] if type(printed) is str else "", note[:200] if type(note) is str else "")
    except (wire.Timeout, wire.Closed, wire.WireError, OSError):
        return "", ""


def _raised(exc: RemoteError) -> str:
    if exc.kind == "NotImplementedError":
        return "not implemented yet: the stub still raises NotImplementedError"
    if exc.kind == "Mismatch":
        return cut(exc.message)
    return cut(f"raised {exc.kind}: {exc.message}")


# --- the answer in a forked child (check() in a notebook, the tests) --------------------------------------------------

def run_test_in_fork(test: Callable[[object], str | None], answer: object, mirrors: tuple[str, ...],
                     timeout: float) -> tuple[bool, str, str]:
    """Fork: the child serves `answer` with the library functions it mirrors switched off, this process runs
    `test` against it with a time limit of `timeout` seconds."""
    from llminfer.grading import student

    request_read, request_write = os.pipe()
    reply_read, reply_write = os.pipe()
    with warnings.catch_warnings():   # Python 3.12+ warns about forking a threaded process (a Jupyter kernel)
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:
        try:
            os.close(request_write)
            os.close(reply_read)
            os.setpgid(0, 0)   # its own process group: what it starts is stopped with it
            student.serve(answer, mirrors, request_read, reply_write)
        finally:
            os._exit(0)   # never return into the parent's code
    os.close(request_read)
    os.close(reply_write)
    status: list[int] = []

    def finish(killed: bool) -> int | None:
        if not status:
            if killed:
                _kill_group(pid)
            else:   # it was asked to end: give it a moment, then stop it and whatever it started
                deadline = time.monotonic() + END_GRACE_S
                while time.monotonic() < deadline and os.waitpid(pid, os.WNOHANG) == (0, 0):
                    time.sleep(0.002)
                _kill_group(pid)
            with contextlib.suppress(ChildProcessError):
                status.append(os.waitpid(pid, 0)[1])
            for fd in (request_write, reply_read):
                wire.forget(fd)
                with contextlib.suppress(OSError):
                    os.close(fd)
        return status[0] if status else None

    channel = Channel(request_write, reply_read, time.monotonic() + timeout)
    return judge(test, Connection(channel, RemoteAnswer(channel, student.describe(answer)), finish), timeout)


def _kill_group(pid: int) -> None:
    for kill in (os.killpg, os.kill):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            kill(pid, signal.SIGKILL)
