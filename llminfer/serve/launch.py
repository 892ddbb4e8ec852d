"""Start `llminfer serve` as a child process on a free loopback port, wait until it answers, stop it with
SIGTERM: what the tests, the serving benchmark and the chapters all need, in one place."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A running `llminfer serve MODEL --host 127.0.0.1 --port <free> ARGS...`."""

    def __init__(self, model: str = "tiny-shakespeare", *args: str, startup_timeout: float = 180.0):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "llminfer.cli", "serve", model, "--host", "127.0.0.1", "--port", str(self.port),
             "--log-level", "warning", *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "NO_PROXY": "127.0.0.1"})
        deadline = time.monotonic() + startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}: {self.proc.stdout.read()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.proc.kill()
        raise RuntimeError(f"the server did not answer /health within {startup_timeout:.0f} s")

    def stop(self, timeout: float = 60.0) -> bool:
        """SIGTERM, then wait: True if it drained and exited as uvicorn does (uvicorn re-raises the signal it
        caught once it has shut down, so the status is -SIGTERM, or 0); killed and False otherwise."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout) in (0, -signal.SIGTERM)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return False


@contextlib.contextmanager
def running_server(model: str = "tiny-shakespeare", *args: str) -> Iterator[ServerProcess]:
    server = ServerProcess(model, *args)
    try:
        yield server
    finally:
        server.stop()
