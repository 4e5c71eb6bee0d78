"""Per-thread role filters: every Python thread started in a worker installs its role's
filter on itself before its target runs (so before any guest-facing code), or ends the
worker.

Hooked at `threading.Thread.run`, the one path every thread of the VMM takes (they are
created with `target=`); the control loop checks that every live thread went through it,
so a thread that bypassed the hook (a subclass overriding run) stops the VM.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

from isovisor.worker.seccomp.install import install
from isovisor.worker.seccomp.policy import role_for_thread

EXIT_ROLE_FILTER_FAILED = 103

_filtered: set[int] = set()
_lock = threading.Lock()


def install_role_hook(programs: dict[str, bytes],
                      role_of: Callable[[str], str] = role_for_thread) -> None:
    original = threading.Thread.run

    def run(self: threading.Thread) -> None:
        role = role_of(self.name)
        try:
            install(programs[role], step=f"seccomp ({role} thread {self.name})")
        except BaseException as exc:  # fail closed: no unfiltered thread runs
            os.write(2, f"isovisor worker: {exc}\n".encode())
            os._exit(EXIT_ROLE_FILTER_FAILED)
        with _lock:
            _filtered.add(threading.get_ident())
        original(self)

    threading.Thread.run = run  # type: ignore[method-assign]


def unfiltered_threads() -> list[str]:
    """Live threads (other than the main one) that did not install a role filter."""
    main = threading.main_thread()
    with _lock:
        done = set(_filtered)
    return [t.name for t in threading.enumerate()
            if t is not main and t.ident is not None and t.ident not in done and t.is_alive()]
