"""Library code an exercise must not call: switched off while the exercise's tests run.

An exercise that mirrors a library function (group-wise int4 mirrors `llminfer.quant.formats`) is worth nothing if
the answer may import that function. While a test runs, every function defined in the named modules raises
Mismatch instead. Its code object is swapped, not its module attribute, so a name the answer imported earlier
(`from llminfer.quant.formats import pack_int4`) is switched off too.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import sys
import types
from collections.abc import Callable, Iterator


def library_loader(prefixes: tuple[str, ...]) -> Callable[[], None]:
    """A setup hook that imports the modules once, in the grading process, so that every test can switch them off."""
    def load() -> None:
        for name in prefixes:   # a package imports all of its modules
            importlib.import_module(name)

    return load


def _refuse(*args, **kwargs):
    # Runs with a library function's globals: it imports what it needs, and finds its name on its own code.
    import sys

    from llminfer.grading.compare import Mismatch

    raise Mismatch(f"the answer calls llminfer's {sys._getframe().f_code.co_name}; the exercise is to write "
                   "it yourself (llminfer's own version is switched off while the tests run)")


def library_functions(prefixes: tuple[str, ...]) -> Iterator[types.FunctionType]:
    """Every function and method defined in the loaded modules named by `prefixes` (or inside them)."""
    seen = set()
    for name, module in list(sys.modules.items()):
        if not any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes):
            continue
        for value in list(vars(module).values()):
            members = list(vars(value).values()) if isinstance(value, type) and value.__module__ == name else [value]
            for member in members:
                member = member.fget if isinstance(member, property) else getattr(member, "__func__", member)
                member = inspect.unwrap(member) if callable(member) else member   # under @torch.no_grad()
                if (isinstance(member, types.FunctionType) and member.__module__ == name
                        and not member.__code__.co_freevars and member not in seen):
                    seen.add(member)
                    yield member


@contextlib.contextmanager
def switched_off(prefixes: tuple[str, ...]) -> Iterator[None]:
    """Inside, each function of `library_functions(prefixes)` raises Mismatch naming itself."""
    saved = {}
    for function in library_functions(prefixes):
        saved[function] = function.__code__
        function.__code__ = _refuse.__code__.replace(co_name=f"{function.__module__}.{function.__qualname__}")
    try:
        yield
    finally:
        for function, code in saved.items():
            function.__code__ = code


def without_library(prefixes: tuple[str, ...], run: Callable[[object], str]) -> Callable[[object], str]:
    """A test's `run`, with the library switched off while it runs."""
    def guarded(answer) -> str:
        with switched_off(prefixes):
            return run(answer)

    return guarded
