"""Load on other cores while a benchmark runs, to see how its result holds up on a shared machine."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

# The child is a bare interpreter running this, not a fork of the parent: it carries no torch state,
# imports nothing, and its deadline ends it even if the parent dies without stopping it.
SPIN = """
import signal, sys, time
signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the parent, which then stops us
deadline = time.monotonic() + float(sys.argv[1])
print("spinning", flush=True)
while time.monotonic() < deadline:
    pass
"""


def check_busy_cores(n: int) -> None:
    """Refuse a count of busy cores that is not an int from 0 to the number of CPUs."""
    cpus = os.cpu_count() or 1
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= cpus:
        raise ValueError(f"busy_cores must be an integer from 0 to {cpus} (the CPU count), got {n!r}")


@contextmanager
def busy_cores(n: int, max_seconds: float) -> Iterator[list[subprocess.Popen]]:
    """Run `n` processes that each spin a core for the body of the `with`, and yield them once all spin.

    They are killed on the way out, however the body ends; each also stops by itself after
    `max_seconds`. Leaving the body after one of them stopped raises: the load was not there throughout."""
    check_busy_cores(n)
    children: list[subprocess.Popen] = []
    try:
        for _ in range(n):
            children.append(subprocess.Popen([sys.executable, "-c", SPIN, str(max_seconds)],
                                             stdout=subprocess.PIPE, text=True))
        for child in children:
            if child.stdout.readline() != "spinning\n":
                raise RuntimeError(f"busy-loop process {child.pid} exited before it started spinning")
        yield children
        stopped = [child.pid for child in children if child.poll() is not None]
        if stopped:
            raise RuntimeError(f"busy-loop processes {stopped} stopped before the end of the benchmark "
                               f"(max_seconds={max_seconds})")
    finally:
        for child in children:
            child.kill()
        for child in children:
            child.wait()
            child.stdout.close()
