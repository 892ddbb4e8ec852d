"""The student's side of grading: the process that runs student code and nothing that decides a score.

`serve(answer, mirrors, requests, replies)` answers the scoring process's requests about one answer (call it,
build an instance of it, call a method, read an attribute, read an iterator it returned, run a support harness
with it) over the wire, in plain data. It runs in a child forked for one test, so each test starts from the
state the submission loaded in.

`python -I -m llminfer.grading.student FILE --fds R,W --targets NAME,...` is the process `llminfer grade`
starts for one submission file, isolated (`-I`: no user site, no current folder on the path) in a fresh folder
that holds only that file. It imports everything the grader's side needs before any student code runs, refuses
imports of `llminfer.grading.exercises` (the references), lowers its resource limits, loads the submission,
says which answers it defines, and then forks a child per test on request.
"""

from __future__ import annotations

import faulthandler
import importlib.abc
import os
import sys
from collections.abc import Iterator

import torch

from llminfer.grading import support, wire
from llminfer.grading.compare import Mismatch
from llminfer.grading.forbidden import library_loader, switched_off
from llminfer.grading.sandbox import CappedText, where_in_student_code

FORBIDDEN_PACKAGE = "llminfer.grading.exercises"


def describe(answer: object) -> str:
    """What kind of thing an answer is: 'kernel', 'class', 'function' or 'other'."""
    if support.triton is not None and isinstance(answer, support.triton.runtime.KernelInterface):
        return "kernel"
    if isinstance(answer, type):
        return "class"
    return "function" if callable(answer) else "other"


class _Objects:
    """What the scoring process may refer to by tag: objects made here (handles), recipes, random generators,
    and its own iterators (read item by item: `_Pulled`)."""

    def __init__(self, requests: int = -1, replies: int = -1):
        self.handles: list[object] = []
        self.generators: dict[int, torch.Generator] = {}
        self.requests, self.replies = requests, replies

    def decode(self, tag: str, payload: object, decoder: wire.Decoder) -> object:
        if tag == "h" and type(payload) is int and 0 <= payload < len(self.handles):
            return self.handles[payload]
        if tag == "r" and type(payload) is list and len(payload) == 2 and payload[0] in support.RECIPES:
            return support.RECIPES[payload[0]](*decoder.decode(payload[1]))
        if tag == "i" and type(payload) is int:
            return _Pulled(payload, self)
        if tag == "g" and type(payload) is list and len(payload) == 2:
            token, index = payload
            if token not in self.generators and index != -1:   # the same generator, the same stream, call after call
                generator = torch.Generator()
                generator.set_state(torch.frombuffer(bytearray(decoder.blob(index)), dtype=torch.uint8))
                self.generators[token] = generator
            if token in self.generators:
                return self.generators[token]
        raise wire.WireError(f"malformed request: tag {tag!r}")

    def handle(self, value: object) -> wire.Handle:
        self.handles.append(value)
        return wire.Handle(len(self.handles) - 1)

    def encode_extra(self, value: object):
        """An iterator the answer returns stays here; the scoring side reads it item by item ('next')."""
        if isinstance(value, Iterator):
            number = self.handle(value).number
            return lambda encoder: {"it": number}
        return None


class _Pulled(Iterator):
    """An iterator of the scoring side's (the chunks of a stream), read one item at a time when the answer asks:
    the scoring side sees exactly how far the answer has read."""

    def __init__(self, token: int, objects: _Objects):
        self.token, self.objects, self.done = token, objects, False

    def __next__(self):
        if self.done:
            raise StopIteration
        _write_all(self.objects.replies, wire.pack({"pull": self.token}))
        message = wire.receive(self.objects.requests, extra=self.objects.decode)
        if message.get("stop") is not None or "item" not in message:
            self.done = True
            raise StopIteration
        return message["item"]


def _plain_or_method(value: object, name: str) -> object:
    return wire.Method(name) if callable(value) and not isinstance(value, (type, torch.Tensor)) else value


def serve(answer: object, mirrors: tuple[str, ...], requests: int, replies: int) -> None:
    """Answer requests about `answer` until 'end', with the library functions it mirrors switched off."""
    faulthandler.disable()   # a crash is reported by the scoring side, not as a traceback dump on a terminal
    capture = CappedText()
    sys.stdout = sys.stderr = capture
    devnull = os.open(os.devnull, os.O_WRONLY)   # output from C code goes to the file descriptors: drop it
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    torch.set_num_threads(1)   # one thread per test: the parent's thread pool does not survive fork
    objects = _Objects(requests, replies)
    library_loader(mirrors)()
    with switched_off(mirrors):
        while True:
            try:
                request = wire.receive(requests, extra=objects.decode)
            except (wire.Closed, wire.WireError):
                return
            op, args, kwargs = request.get("op"), list(request.get("args") or []), dict(request.get("kwargs") or {})
            if op == "end":
                _write_all(replies, wire.pack({"id": request.get("id"), "printed": capture.text(),
                                               "note": capture.note()}))
                return
            try:
                versions = [a._version if isinstance(a, torch.Tensor) else None for a in args]
                value = _perform(answer, objects, op, request, args, kwargs)
                # The tensors it was given and wrote into (their version counter moved): the tests check those too.
                written = [a if v is not None and a._version != v else None
                           for a, v in zip(args, versions, strict=True)]
                reply = {"id": request.get("id"), "ok": value, **({"args": written} if any(
                    w is not None for w in written) else {})}
                data = wire.pack(reply, extra=objects.encode_extra)
            except BaseException as exc:  # SystemExit and KeyboardInterrupt from student code fail the test too
                data = wire.pack({"id": request.get("id"), "error": _error(exc)})
            try:
                _write_all(replies, data)
            except OSError:
                return


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _perform(answer: object, objects: _Objects, op: object, request: dict, args: list, kwargs: dict) -> object:
    if op == "call":
        return answer(*args, **kwargs)
    if op == "map" and len(args) == 1 and type(args[0]) is list:
        return [answer(*call) for call in args[0]]
    if op == "new":
        return objects.handle(answer(*args, **kwargs))
    if op in ("method", "getattr"):
        handle = request.get("handle")
        if type(handle) is not int or not 0 <= handle < len(objects.handles):
            raise wire.WireError("malformed request: no such object")
        name = request.get("name")
        if type(name) is not str or name.startswith("__"):
            raise wire.WireError(f"malformed request: attribute {name!r}")
        value = getattr(objects.handles[handle], name)
        return value(*args, **kwargs) if op == "method" else _plain_or_method(value, name)
    if op == "next":
        handle = request.get("handle")
        if type(handle) is not int or not 0 <= handle < len(objects.handles):
            raise wire.WireError("malformed request: no such iterator")
        return next(objects.handles[handle])
    if op == "harness" and request.get("name") in support.HARNESSES:
        return support.HARNESSES[request["name"]](answer, *args, **kwargs)
    raise wire.WireError(f"malformed request: operation {op!r}")


def _error(exc: BaseException) -> list[str]:
    """[kind, message] for the scoring side: the exception's type and text, and where in student code."""
    if isinstance(exc, NotImplementedError):
        return ["NotImplementedError", ""]
    if isinstance(exc, Mismatch):
        return ["Mismatch", str(exc)]
    if isinstance(exc, wire.WireError):
        return ["WireError", str(exc)]
    try:
        text = str(exc)
    except BaseException:  # an exception whose __str__ raises
        text = "(its message could not be read)"
    return [type(exc).__name__, f"{text}{where_in_student_code(exc)}"]


# --- the process `llminfer grade` starts for one file ---------------------------------------------------------------

class _RefuseReferences(importlib.abc.MetaPathFinder):
    """Refuse `llminfer.grading.exercises`: it holds the reference answers."""

    def find_spec(self, name, path=None, target=None):
        if name == FORBIDDEN_PACKAGE or name.startswith(FORBIDDEN_PACKAGE + "."):
            raise ImportError(f"a submission being graded cannot import {name}: it holds the grader's reference "
                              "answers (helpers for exercises are in llminfer.grading.support)")
        return None


def _limit_resources(memory_bytes: int, file_bytes: int, processes: int, cpu_seconds: int) -> None:
    import resource

    for limit, value in ((resource.RLIMIT_AS, memory_bytes), (resource.RLIMIT_FSIZE, file_bytes),
                         (resource.RLIMIT_NPROC, processes), (resource.RLIMIT_CPU, cpu_seconds),
                         (resource.RLIMIT_CORE, 0)):
        if value is None or value <= 0 and limit != resource.RLIMIT_CORE:
            continue
        soft, hard = resource.getrlimit(limit)
        value = value if hard == resource.RLIM_INFINITY else min(value, hard)
        try:
            resource.setrlimit(limit, (value, value))
        except (ValueError, OSError):
            pass   # a limit already lower than asked stays as it is


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path")
    parser.add_argument("--fds", required=True)
    parser.add_argument("--targets", default="")
    parser.add_argument("--mirrors", default="")
    parser.add_argument("--warm", default="")
    parser.add_argument("--limits", default="0,0,0,0", help="memory bytes, file bytes, processes, CPU seconds")
    args = parser.parse_args(argv)
    requests, replies = (int(fd) for fd in args.fds.split(","))
    targets = [t for t in args.targets.split(",") if t]
    from llminfer.grading.submission import load_submission

    if args.path.endswith(".md"):
        import jupytext  # noqa: F401  (imported before student code can put anything in its way)
    library_loader(tuple(m for m in args.mirrors.split(",") if m))()
    for name in [w for w in args.warm.split(",") if w in support.WARM]:
        support.WARM[name]()
    for name in [n for n in sys.modules if n == FORBIDDEN_PACKAGE or n.startswith(FORBIDDEN_PACKAGE + ".")]:
        del sys.modules[name]
    sys.meta_path.insert(0, _RefuseReferences())
    _limit_resources(*(int(x) for x in args.limits.split(",")))
    try:
        namespace, log = load_submission(args.path)
    except BaseException as exc:  # a file that cannot be read at all: say why, define nothing
        namespace, log = {}, [f"could not be loaded: {type(exc).__name__}: {exc}"]
    defined = {t: describe(namespace[t]) for t in targets if t in namespace}
    wire.send(replies, {"log": [str(line) for line in log], "defined": defined})
    while True:
        try:   # no byte past the message: the child forked next reads the rest of this pipe
            request = wire.receive(requests, ahead=False)
        except (wire.Closed, wire.WireError):
            return 0
        if request.get("op") != "test" or request.get("target") not in defined:
            return 0
        pid = os.fork()
        if pid == 0:
            try:
                serve(namespace[request["target"]], tuple(request.get("mirrors") or ()), requests, replies)
            finally:
                os._exit(0)
        _, status = os.waitpid(pid, 0)
        wire.send(replies, {"exit": status, "pid": pid})


if __name__ == "__main__":
    sys.exit(main())
