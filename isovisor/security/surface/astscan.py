"""Reading facts out of source code (what a function calls, which enum members it names)
without running it: the parts of the inventory that are code paths, not objects."""

from __future__ import annotations

import ast
import functools
import importlib
import inspect
from collections.abc import Iterator
from dataclasses import dataclass
from types import ModuleType


@functools.cache
def module_tree(module_name: str) -> ast.Module:
    module: ModuleType = importlib.import_module(module_name)
    return ast.parse(inspect.getsource(module))


@dataclass(frozen=True)
class Ref:
    """A dotted name used in the code, and the function (Class.method) it appears in."""

    dotted: str
    function: str


def _dotted(node: ast.AST) -> str | None:
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return None


def _walk(node: ast.AST, scope: tuple[str, ...]) -> Iterator[tuple[ast.AST, str]]:
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            inner = (*scope, child.name)
            yield child, ".".join(inner)
            yield from _walk(child, inner)
        else:
            yield child, ".".join(scope)
            yield from _walk(child, scope)


def attribute_refs(module_name: str, prefix: str) -> list[Ref]:
    """Every `prefix.NAME` attribute use in the module (e.g. prefix "c.ExitReason"),
    with the function it sits in; sorted and without duplicates."""
    found: set[Ref] = set()
    for node, where in _walk(module_tree(module_name), ()):
        if isinstance(node, ast.Attribute):
            dotted = _dotted(node)
            if dotted is not None and dotted.startswith(prefix + ".") and \
                    dotted.count(".") == prefix.count(".") + 1:
                found.add(Ref(dotted[len(prefix) + 1:], where))
    return sorted(found, key=lambda r: (r.dotted, r.function))


def calls_in(module_name: str, function: str) -> list[str]:
    """Names of the plain functions `function` calls (`f(...)`, not `obj.f(...)`), in
    source order, without duplicates."""
    for node, where in _walk(module_tree(module_name), ()):
        if isinstance(node, ast.FunctionDef) and where == function:
            names: list[str] = []
            for sub in ast.walk(node):
                if isinstance(sub, ast.Call) and isinstance(sub.func, ast.Name) \
                        and sub.func.id not in names:
                    names.append(sub.func.id)
            return names
    raise LookupError(f"{module_name} has no function {function}")


def preceding_comments(module_name: str) -> dict[str, str]:
    """Module-level `NAME = ...` assignments -> the nearest `# ...` comment line above
    them (the heading of their group), for constants grouped under comments."""
    module = importlib.import_module(module_name)
    lines = inspect.getsource(module).splitlines()
    heading = ""
    out: dict[str, str] = {}
    for line in lines:
        stripped = line.strip()
        if line.startswith("#"):
            heading = stripped.lstrip("# ").strip()
        elif not stripped:
            continue
        elif line[0].isalpha() and "=" in line:
            name = line.split("=", 1)[0].strip().split(":")[0].strip()
            if name.isidentifier():
                out[name] = heading
        elif not line[0].isspace():
            heading = ""
    return out


def qualname(obj: object) -> str:
    """module.Qualified.name of a class or function."""
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"
