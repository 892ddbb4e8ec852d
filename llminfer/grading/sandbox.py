"""Run one test of student code in a forked child process, so that an infinite loop, a crash of the
interpreter or megabytes of printing cost that test and nothing else.

The child inherits the student's functions as they are (no pickling), runs the test with its output
captured, and sends back (passed, message, printed). Where there is no fork (Windows) the test runs
in this process, without a timeout.
"""

from __future__ import annotations

import faulthandler
import os
import pickle
import select
import signal
import sys
import sysconfig
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from llminfer.grading.compare import Mismatch

PRINTED_CHARS_KEPT = 1000   # of what student code prints, the start is kept for the report
MESSAGE_CHARS = 300
# Frames from these places are the grader's or a library's, not the student's.
_NOT_STUDENT = (str(Path(__file__).resolve().parent), sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["purelib"])


class CappedText:
    """A text stream that keeps the first `limit` characters written to it and counts the rest."""

    def __init__(self, limit: int = PRINTED_CHARS_KEPT):
        self.limit, self.kept, self.total = limit, [], 0

    def write(self, text: str) -> int:
        if self.total < self.limit:
            self.kept.append(text[: self.limit - self.total])
        self.total += len(text)
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False

    def text(self) -> str:
        return "".join(self.kept)

    def note(self) -> str:
        """A note for the report when more was printed than kept, else ''."""
        if self.total <= self.limit:
            return ""
        return f" (it printed {self.total:,} characters; the report keeps the first {self.limit:,})"


def attempt(test: Callable[[], str | None]) -> tuple[bool, str]:
    """Run `test`: (True, its detail) if it returns, (False, why) if it raises."""
    try:
        return True, test() or ""
    except NotImplementedError:
        return False, "not implemented yet: the stub still raises NotImplementedError"
    except Mismatch as exc:
        return False, _cut(str(exc))
    except BaseException as exc:  # SystemExit and KeyboardInterrupt from student code fail the test too
        return False, _cut(f"raised {type(exc).__name__}: {exc}{_where(exc)}")


def run_isolated(test: Callable[[], str | None], timeout: float) -> tuple[bool, str, str]:
    """Run `test` in a forked child with a time limit: (passed, message, the start of what it printed)."""
    if not hasattr(os, "fork"):
        capture = CappedText()
        stdout, stderr, sys.stdout, sys.stderr = sys.stdout, sys.stderr, capture, capture
        try:
            passed, message = attempt(test)
            return passed, message + capture.note(), capture.text()
        finally:
            sys.stdout, sys.stderr = stdout, stderr
    read_end, write_end = os.pipe()
    with warnings.catch_warnings():   # Python 3.12+ warns about forking a threaded process (a Jupyter kernel)
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:
        try:
            os.close(read_end)
            _child(test, write_end)
        finally:
            os._exit(0)   # never return into the parent's code
    os.close(write_end)
    data, timed_out = _read_until_eof(read_end, timeout)
    if timed_out:
        os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    if timed_out:
        return False, f"timed out after {timeout:g} s (an infinite loop?); the test was stopped", ""
    try:
        return pickle.loads(data)
    except Exception:  # nothing, or half a message: the child died before it could answer
        return False, _death(status), ""


def _child(test: Callable[[], str | None], write_end: int) -> None:
    faulthandler.disable()   # a crash is reported by the parent, not as a traceback dump on the terminal
    capture = CappedText()
    sys.stdout = sys.stderr = capture
    # Output from C code goes to the process's file descriptors, which a Jupyter kernel forwards: drop it.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    torch.set_num_threads(1)   # one thread per test: the parent's thread pool does not survive fork
    passed, message = attempt(test)
    data = pickle.dumps((passed, message + capture.note(), capture.text()))
    with os.fdopen(write_end, "wb") as pipe:
        pipe.write(data)


def _read_until_eof(fd: int, timeout: float) -> tuple[bytes, bool]:
    """Everything written to the pipe until the child closes it, and whether time ran out first."""
    chunks, deadline = [], time.monotonic() + timeout
    with os.fdopen(fd, "rb", buffering=0) as pipe:
        while (remaining := deadline - time.monotonic()) > 0:
            if select.select([pipe], [], [], remaining)[0]:
                chunk = pipe.read(1 << 16)
                if not chunk:
                    return b"".join(chunks), False
                chunks.append(chunk)
    return b"".join(chunks), True


def _death(status: int) -> str:
    if os.WIFSIGNALED(status):
        name = signal.Signals(os.WTERMSIG(status)).name
        return f"crashed: the process was killed by {name}" + (" (a segmentation fault)" if name == "SIGSEGV" else "")
    return (f"crashed: the process exited with status {os.WEXITSTATUS(status)} before the test finished "
            "(os._exit, or a crash in C code?)")


def _where(exc: BaseException) -> str:
    """Where in the student's code the exception came from (the last frame outside the grader)."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith(_NOT_STUDENT)]
    return f" (in {frames[-1].name}, line {frames[-1].lineno})" if frames else ""


def _cut(message: str) -> str:
    message = " ".join(message.split())
    return message if len(message) <= MESSAGE_CHARS else message[: MESSAGE_CHARS - 3] + "..."
