"""Applying a mutant inside the current process: the function is recompiled from its
source with one snippet replaced and put where the original was (the module or class
attribute, and every module that imported it by name). Source files are never written."""

from __future__ import annotations

import ast
import importlib
import inspect
import sys
import textwrap
from collections.abc import Callable
from typing import Any

from tests.security.mutation.mutants import Mutant


class MutantError(Exception):
    """The mutant no longer fits the code (the snippet moved or changed)."""


def _resolve(m: Mutant) -> tuple[Any, str, Any]:
    module = importlib.import_module(m.module)
    owner: Any = module
    *path, name = m.function.split(".")
    for part in path:
        owner = getattr(owner, part)
    return owner, name, inspect.getattr_static(owner, name)


def apply(m: Mutant) -> Callable[[], None]:
    """Weaken the check; returns a function that restores the original."""
    owner, name, original = _resolve(m)
    func = original.__func__ if isinstance(original, staticmethod | classmethod) else original
    source = textwrap.dedent(inspect.getsource(func))
    if source.count(m.before) != 1:
        raise MutantError(f"{m.name}: {m.before!r} occurs {source.count(m.before)} times in "
                          f"{m.module}.{m.function}: update tests/security/mutation/mutants.py")
    tree = ast.parse(source.replace(m.before, m.after))
    fn_def = tree.body[0]
    assert isinstance(fn_def, ast.FunctionDef)
    fn_def.decorator_list = []
    lineno = func.__code__.co_firstlineno
    ast.increment_lineno(tree, lineno - 1)
    code = compile(tree, inspect.getsourcefile(func) or "<mutant>", "exec")
    namespace: dict[str, Any] = {}
    exec(code, func.__globals__, namespace)
    mutated = namespace[fn_def.name]
    if func.__closure__:
        raise MutantError(f"{m.name}: closures are not supported")
    if isinstance(original, staticmethod):
        mutated = staticmethod(mutated)
    elif isinstance(original, classmethod):
        mutated = classmethod(mutated)
    patched = [(owner, name, original)]
    setattr(owner, name, mutated)
    if inspect.ismodule(owner):
        for mod in list(sys.modules.values()):
            name = getattr(mod, "__name__", "")
            if mod is owner or not name.startswith(("isovisor", "fuzz", "tests")):
                continue
            for attr, value in list(vars(mod).items()):
                if value is original:
                    patched.append((mod, attr, value))
                    setattr(mod, attr, mutated)

    def restore() -> None:
        for obj, attr, value in reversed(patched):
            setattr(obj, attr, value)

    return restore
