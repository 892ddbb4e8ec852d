"""Hold Ctrl-C until the engine is in a consistent state.

A KeyboardInterrupt can arrive between any two bytecodes: in the middle of a step it could leave a
block allocated to no one, or a token appended but not counted. Inside `deferred_interrupt()` a
SIGINT is only remembered; it is raised when the block ends, at most one step (milliseconds) later.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def deferred_interrupt() -> Iterator[None]:
    """Run the block to its end even if SIGINT arrives, then raise KeyboardInterrupt.

    Only the main thread receives signals, and only when Python's own handler is installed do we know
    what the user expects; anywhere else this does nothing."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt
