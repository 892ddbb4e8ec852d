"""Library code an exercise must not call: switched off, in the process serving the answer, while a test runs.

An exercise that mirrors a library function (group-wise int4 mirrors `llminfer.quant.formats`) is worth nothing if
the answer may import that function. An exercise names what it mirrors: a module ("llminfer.quant", with
everything defined in it and below it) or one name in a module ("llminfer.kv.block_pool:BlockPool", a function or
every method of a class). In the process that serves the answer each such function raises Mismatch instead. Its
code object is swapped, not its module attribute, so a name the answer imported earlier
(`from llminfer.quant.formats import pack_int4`) is switched off too. The references run in the scoring process,
where nothing is switched off.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import sys
import types
from collections.abc import Callable, Iterator


def library_loader(prefixes: tuple[str, ...]) -> Callable[[], None]:
    """A hook that imports the named modules, so that they can be switched off."""
    def load() -> None:
        for name in prefixes:   # a package imports all of its modules
            importlib.import_module(name.split(":")[0])

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
        whole = any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes if ":" not in prefix)
        named = {prefix.split(":")[1] for prefix in prefixes if prefix.split(":")[0] == name and ":" in prefix}
        if not (whole or named) or module is None:
            continue
        for key, value in list(vars(module).items()):
            if not whole and key not in named:
                continue
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
