"""Load a student's submission, a notebook (.ipynb or MyST .md) or a module (.py), into a namespace.

The rule for notebooks: every code cell runs, in order, in one namespace, as "Run all" would in
Jupyter, except that `check(...)` does nothing, IPython magics and shell lines (`%...`, `!...`) are
dropped, and a cell that raises or runs past its time limit is reported and skipped, so a broken cell
costs only what it would have defined. A module runs as one cell. Either way `__name__` is
"__submission__", so code under `if __name__ == "__main__":` does not run.
"""

from __future__ import annotations

import contextlib
import json
import signal
import sys
import threading
import traceback
import types
from collections.abc import Iterator
from pathlib import Path

import llminfer.grading
from llminfer.grading.sandbox import CappedText

SUFFIXES = (".ipynb", ".md", ".py")
CELL_TIMEOUT_S = 60.0
MODULE_NAME = "__submission__"


class CellTimeout(Exception):
    pass


def code_cells(path: Path) -> list[str]:
    """The source of each code cell of a notebook, or the whole text of a module as one cell."""
    if path.suffix == ".py":
        return [path.read_text(encoding="utf-8")]
    if path.suffix == ".ipynb":
        cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    elif path.suffix == ".md":
        import jupytext  # only MyST notebooks need it; it comes with the book's extras

        cells = jupytext.read(path)["cells"]
    else:
        raise ValueError(f"cannot grade {str(path)!r}: a submission is a {', '.join(SUFFIXES)} file")
    return ["".join(cell["source"]) for cell in cells if cell["cell_type"] == "code"]


def without_magics(source: str) -> str:
    """The cell without IPython's line magics and shell lines; empty for a cell magic (%%time, %%bash)."""
    if source.lstrip().startswith("%%"):
        return ""
    return "\n".join("" if line.lstrip().startswith(("%", "!")) else line for line in source.splitlines())


def load_submission(path: str | Path, cell_timeout: float = CELL_TIMEOUT_S) -> tuple[dict, list[str]]:
    """Run the submission's cells; return its namespace and a line for each cell that failed."""
    path = Path(path)
    module = types.ModuleType(MODULE_NAME)
    module.__file__ = str(path)
    namespace, log = vars(module), []
    with _as_module(module), _checks_do_nothing(), _printing_capped():
        for index, source in enumerate(code_cells(path), start=1):
            try:
                with _time_limit(cell_timeout):
                    exec(compile(without_magics(source), f"<cell {index}>", "exec"), namespace)
            except BaseException as exc:  # a cell's sys.exit() must not end the grading
                where = "the module" if path.suffix == ".py" else f"cell {index}"
                log.append(f"{where} raised {type(exc).__name__} at line {_line(exc)}: {exc}")
    return namespace, log


def _line(exc: BaseException) -> int | str:
    """The line of the submission's own code where `exc` came from."""
    if isinstance(exc, SyntaxError):
        return exc.lineno or "?"
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename.startswith("<cell ")]
    return frames[-1].lineno if frames else "?"


@contextlib.contextmanager
def _as_module(module: types.ModuleType) -> Iterator[None]:
    """Register the module while it loads: dataclasses and pickle look classes' modules up by name."""
    previous = sys.modules.get(module.__name__)
    sys.modules[module.__name__] = module
    try:
        yield
    finally:
        if previous is None:
            del sys.modules[module.__name__]
        else:
            sys.modules[module.__name__] = previous


@contextlib.contextmanager
def _checks_do_nothing() -> Iterator[None]:
    check = llminfer.grading.check
    llminfer.grading.check = lambda *args, **kwargs: None
    try:
        yield
    finally:
        llminfer.grading.check = check


@contextlib.contextmanager
def _printing_capped() -> Iterator[None]:
    capture = CappedText()
    with contextlib.redirect_stdout(capture), contextlib.redirect_stderr(capture):
        yield


@contextlib.contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    """Raise CellTimeout in the cell after `seconds` (where there is SIGALRM, in the main thread)."""
    if not hasattr(signal, "SIGALRM") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum, frame):
        raise CellTimeout(f"the cell ran for more than {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
