"""The answer in a clean, contained process, for `llminfer grade`: one submission file loaded by an isolated
interpreter (`llminfer.grading.student`) in a fresh folder, with resource limits and, as root, as an unprivileged
user; everything it starts is stopped after each test and at the end. The tests reach it through the proxies of
`remote`, exactly as they reach an answer in a forked child.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from llminfer.grading import wire
from llminfer.grading.remote import END_GRACE_S, Channel, Connection, RemoteAnswer, judge
from llminfer.grading.sandbox import MESSAGE_CHARS, cut


@dataclass(frozen=True)
class Limits:
    """What a submission's process may use. Memory is address space (RLIMIT_AS), processes count only when it
    runs as its own user (RLIMIT_NPROC counts a user's processes), CPU seconds are per process."""

    memory_bytes: int = 16 << 30
    file_bytes: int = 64 << 20
    processes: int = 128
    cpu_seconds: int = 900
    load_seconds: float = 120.0


def become_subreaper() -> bool:
    """Make orphans of this process's descendants its children (Linux), so that a process a submission starts and
    detaches can still be found and stopped. True if it worked."""
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0) == 0   # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        return False


def _processes() -> list[tuple[int, int, int]]:
    """(pid, parent pid, real uid) of every process, from /proc."""
    found = []
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
            uid = os.stat(f"/proc/{entry}").st_uid
        except (OSError, ValueError, IndexError):
            continue
        found.append((int(entry), ppid, uid))
    return found


class StudentProcess:
    """One submission file, loaded in an isolated interpreter in a fresh folder, serving its answers test by test.
    A timeout or a crash of the whole process ends it; the next test starts it again."""

    def __init__(self, path: Path, targets: dict[str, tuple[str, ...]], limits: Limits = Limits(),
                 run_as: str | None = None, warm: tuple[str, ...] = ()):
        """`targets`: the names of the answers to serve, each with the library code it mirrors; `warm`: what the
        process loads before the submission (support.WARM)."""
        self.path, self.targets, self.limits, self.warm = path, targets, limits, warm
        self.user = pwd.getpwnam(run_as) if run_as else None
        self.process: subprocess.Popen | None = None
        self.folder: str | None = None
        self.log: list[str] = []
        self.defined: dict[str, str] = {}

    # starting and stopping

    def start(self) -> None:
        self.folder = tempfile.mkdtemp(prefix="llminfer-grade-")
        home = Path(self.folder)
        copy = home / ("submission" + self.path.suffix)
        shutil.copyfile(self.path, copy)
        if self.user:
            for path in (home, copy):
                os.chown(path, self.user.pw_uid, self.user.pw_gid)
        request_read, request_write = os.pipe()
        reply_read, reply_write = os.pipe()
        mirrors = sorted({m for ms in self.targets.values() for m in ms})
        limits = [self.limits.memory_bytes, self.limits.file_bytes, self.limits.processes if self.user else 0,
                  self.limits.cpu_seconds]
        command = [sys.executable, "-I", "-m", "llminfer.grading.student", copy.name,
                   "--fds", f"{request_read},{reply_write}", "--targets", ",".join(self.targets),
                   "--mirrors", ",".join(mirrors), "--warm", ",".join(self.warm),
                   "--limits", ",".join(str(x) for x in limits)]
        self.errors = tempfile.TemporaryFile()
        user = {"user": self.user.pw_uid, "group": self.user.pw_gid, "extra_groups": []} if self.user else {}
        try:
            self.process = subprocess.Popen(command, cwd=home, env=self._environment(home), stdin=subprocess.DEVNULL,
                                            stdout=subprocess.DEVNULL, stderr=self.errors, pass_fds=(request_read,
                                            reply_write), start_new_session=True, **user)
        finally:
            os.close(request_read)
            os.close(reply_write)
        self.requests, self.replies = request_write, reply_read
        try:
            hello = wire.receive(self.replies, time.monotonic() + self.limits.load_seconds)
        except wire.Timeout:
            self.stop()
            self.log = [f"loading it took more than {self.limits.load_seconds:g} s; it was stopped and nothing in "
                        "it was graded"]
            return
        except (wire.Closed, wire.WireError, OSError):
            tail = self._stderr_tail()
            self.stop()
            self.log = [f"loading it ended the grading process ({tail}); nothing in this file was graded"]
            return
        log, defined = hello.get("log"), hello.get("defined")
        self.log = [cut(line) for line in log if type(line) is str][:100] if type(log) is list else []
        self.defined = {name: kind for name, kind in defined.items() if name in self.targets and type(kind) is str
                        } if type(defined) is dict else {}

    def _environment(self, home: Path) -> dict[str, str]:
        keep = ("PATH", "LANG", "LC_ALL", "LD_LIBRARY_PATH", "CUDA_VISIBLE_DEVICES", "TRITON_INTERPRET")
        env = {key: os.environ[key] for key in keep if key in os.environ}
        if not torch.cuda.is_available():   # Triton kernels then run in its interpreter, chosen at definition
            env["TRITON_INTERPRET"] = "1"
        return {**env, "HOME": str(home), "TMPDIR": str(home), "MPLBACKEND": "Agg",
                "TRITON_CACHE_DIR": str(home / ".triton"), "MPLCONFIGDIR": str(home / ".matplotlib")}

    def _stderr_tail(self) -> str:
        try:
            self.errors.seek(0)
            lines = self.errors.read().decode(errors="replace").strip().splitlines()
        except (OSError, AttributeError):
            lines = []
        return lines[-1][:MESSAGE_CHARS] if lines else "no message"

    def stop(self) -> None:
        """Stop the process, everything it started (also what detached from it), and remove its folder."""
        if self.process is not None:
            for _ in range(5):
                if not self._kill_everything():
                    break
            with contextlib.suppress(ChildProcessError):
                self.process.wait(timeout=10)
            self.process = None
            for fd in (self.requests, self.replies):
                wire.forget(fd)
                with contextlib.suppress(OSError):
                    os.close(fd)
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None

    def _kill_everything(self, spare_process: bool = False) -> bool:
        """One round of SIGKILL: the process's group and every descendant, orphans re-parented to this process (as
        a subreaper) and theirs, and every process of the submission's user; the process itself too unless
        `spare_process` (between tests, to stop what a test left running). True if there was anything to kill."""
        worker, me = self.process.pid, os.getpid()
        if not spare_process:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(worker, signal.SIGKILL)
        snapshot = [(pid, ppid, uid) for pid, ppid, uid in _processes() if pid != me]
        children: dict[int, list[int]] = {}
        for pid, ppid, _ in snapshot:
            children.setdefault(ppid, []).append(pid)
        roots = [worker] + [pid for pid, ppid, _ in snapshot if ppid == me and pid != worker]
        roots += [pid for pid, _, uid in snapshot if self.user and uid == self.user.pw_uid and pid != worker]
        victims, stack = set(), list(roots)
        while stack:
            pid = stack.pop()
            if pid not in victims:
                victims.add(pid)
                stack += children.get(pid, [])
        if spare_process:
            victims.discard(worker)
        for pid in victims:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        for pid in victims:   # reap the orphans that became our children
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(pid, os.WNOHANG)
        return bool(victims - {worker})

    # tests

    def run_test(self, target: str, test: Callable[[object], str | None], timeout: float) -> tuple[bool, str, str]:
        """Run `test` against the answer named `target`, served by a child forked for it."""
        if self.process is None or self.process.poll() is not None:
            self.stop()
            self.start()
        if target not in self.defined:
            return False, f"no function or class named {target!r} is defined", ""
        deadline = time.monotonic() + timeout
        channel = Channel(self.requests, self.replies, deadline)
        try:
            wire.send(self.requests, {"op": "test", "target": target, "mirrors": list(self.targets[target])})
        except OSError:   # it ended between tests (a thread of the submission's, exiting): this test cannot run
            self.stop()
            return False, "the submission's process ended between tests (does its code exit by itself?)", ""

        def finish(killed: bool) -> int | None:
            if killed:
                self.stop()   # the whole process: what the test left behind cannot be trusted to end by itself
                return None
            channel.deadline = time.monotonic() + END_GRACE_S
            try:
                reply = channel.receive()
            except (wire.Timeout, wire.Closed, wire.WireError, OSError):
                self.stop()
                return None
            if "exit" not in reply:   # anything else here is not the protocol: start afresh for the next test
                self.stop()
                return None
            self._kill_everything(spare_process=True)   # what the test started ends with it
            return reply["exit"] if type(reply["exit"]) is int else None

        return judge(test, Connection(channel, RemoteAnswer(channel, self.defined[target]), finish), timeout)
