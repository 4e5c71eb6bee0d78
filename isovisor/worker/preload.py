"""What the zygote imports once, and how a worker seals the interpreter before seccomp.

After the jail the worker can open no file (seccomp kills open/openat, Landlock denies
every path, the root is an empty tmpfs). So everything the worker may run is imported in
the zygote, and at seal time:
- the path-based import machinery is replaced by a finder that fails at once with a clear
  ImportError (built-in and frozen modules still import: they touch no file);
- linecache, which tracebacks use to show source lines, stops reading or stat-ing files;
- the codecs the worker uses are looked up once, so no encodings module is imported late.
"""

from __future__ import annotations

import codecs
import importlib
import importlib.abc
import importlib.machinery
import linecache
import logging
import pkgutil
import sys
import time
from collections.abc import Sequence
from types import ModuleType

log = logging.getLogger(__name__)

# Packages whose modules a worker may run. Modules that fail to import (work in progress
# elsewhere in the tree) are skipped and logged: a worker that later needs one fails with
# ImportError, never with a seccomp kill.
PRELOAD_PACKAGES = ("isovisor.kvm", "isovisor.memory", "isovisor.devices", "isovisor.vmm",
                    "isovisor.worker")
STDLIB = ("json", "select", "socket", "signal", "traceback", "resource", "termios", "tty",
          "errno", "array", "ctypes", "mmap", "fcntl", "threading", "selectors", "struct",
          "enum", "dataclasses", "collections", "contextlib", "tempfile", "hashlib")
CODECS = ("utf-8", "ascii", "latin-1", "utf-16", "utf-32")


def preload() -> list[str]:
    """Import every worker module; returns the names that failed."""
    failed: list[str] = []
    for name in STDLIB:
        importlib.import_module(name)
    for pkg_name in PRELOAD_PACKAGES:
        pkg = importlib.import_module(pkg_name)
        for info in pkgutil.walk_packages(pkg.__path__, prefix=pkg_name + "."):
            if info.name.endswith(("__main__", ".zygote")):
                continue
            try:
                importlib.import_module(info.name)
            except Exception as exc:  # another team's module mid-change: skip, say so
                failed.append(info.name)
                log.debug("preload: %s not imported: %s", info.name, exc)
    for name in CODECS:
        codecs.lookup(name)
    time.localtime()  # glibc reads the timezone once; never again after the jail
    return failed


class _JailedImportBlocker(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Sequence[str] | None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        raise ImportError(f"{fullname} was not preloaded: a jailed worker imports nothing "
                          "after setup (add it to isovisor.worker.preload)")


def _no_lines(*_args: object, **_kwargs: object) -> list[str]:
    return []


def _no_check(*_args: object, **_kwargs: object) -> None:
    return None


def seal() -> None:
    """Make the interpreter touch no file from now on (see the module docstring)."""
    keep = [f for f in sys.meta_path
            if f in (importlib.machinery.BuiltinImporter, importlib.machinery.FrozenImporter)]
    sys.meta_path[:] = [*keep, _JailedImportBlocker()]
    sys.path_hooks.clear()
    sys.path_importer_cache.clear()
    sys.dont_write_bytecode = True
    linecache.clearcache()
    linecache.checkcache = _no_check
    linecache.updatecache = _no_lines
