"""What running student code in another process needs on both sides: capped capture of what it prints, and
the messages that say how it failed (where in the student's code, how the process died)."""

from __future__ import annotations

import os
import signal
import sysconfig
import traceback
from pathlib import Path

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


def death(status: int) -> str:
    """Why a process ended before it answered, from its wait status."""
    if os.WIFSIGNALED(status):
        name = signal.Signals(os.WTERMSIG(status)).name
        return f"crashed: the process was killed by {name}" + (" (a segmentation fault)" if name == "SIGSEGV" else "")
    return (f"crashed: the process exited with status {os.WEXITSTATUS(status)} before the test finished "
            "(os._exit, or a crash in C code?)")


def where_in_student_code(exc: BaseException) -> str:
    """Where in the student's code the exception came from (the last frame outside the grader)."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith(_NOT_STUDENT)]
    return f" (in {frames[-1].name}, line {frames[-1].lineno})" if frames else ""


def cut(message: str) -> str:
    """One line of at most MESSAGE_CHARS characters."""
    message = " ".join(message.split())
    return message if len(message) <= MESSAGE_CHARS else message[: MESSAGE_CHARS - 3] + "..."
