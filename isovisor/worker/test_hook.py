"""TEST-ONLY hook: makes a jailed worker attempt forbidden things, to prove they fail.

ATTACK SURFACE: this module is part of the worker and is listed in the attack-surface
inventory (docs/WORKER.md, "Attack surface"). It is inert unless the *launcher's*
environment has ISOVISOR_ENABLE_TEST_HOOKS=1 and the launch request names an action; the
guest cannot reach it (it runs before guest code, from the launch request only), and a
production host never sets the variable (the launcher refuses hook requests without it).

Actions (`LaunchRequest.test_hook`):
- "probe": before seccomp, record what the worker can see and what each attempt returns
  (the layers below seccomp: namespaces, empty root, uid, no capabilities, Landlock).
- "execve", "ptrace", "socket-inet", "open-shadow", "read-vm-memory:<pid>": after the
  whole jail, attempt it; seccomp must kill the worker (the host reports the syscall).
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
from typing import Any

from isovisor.worker import libc

ENABLE_ENV = "ISOVISOR_ENABLE_TEST_HOOKS"
FORBIDDEN_ACTIONS = ("execve", "ptrace", "socket-inet", "open-shadow", "read-vm-memory")
PTRACE_ATTACH = 16
# How far the probe looks for other processes (pids are allocated upwards from 1 in a
# fresh PID namespace, so anything visible would be small).
PROBE_MAX_PID = 32768


def valid(action: str) -> bool:
    name, _, arg = action.partition(":")
    if name == "read-vm-memory":
        return arg.isdigit()
    return action == "probe" or (name in FORBIDDEN_ACTIONS and not arg)


def _attempt(fn: Any) -> str:
    try:
        result = fn()
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, str(exc.errno))
    return f"succeeded: {result!r}"


def _ptrace(pid: int) -> int:
    ret = libc.libc().ptrace(ctypes.c_long(PTRACE_ATTACH), ctypes.c_long(pid), None, None)
    if ret < 0:
        raise OSError(ctypes.get_errno(), "ptrace")
    return int(ret)


def _socket_inet() -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(1)
        s.connect(("192.0.2.1", 80))  # TEST-NET-1: never a real host
    return "connected"


def _exec() -> None:
    os.execv("/bin/sh", ["sh", "-c", "exit 99"])


def _read_mem(pid: int) -> bytes:
    fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
    try:
        return os.pread(fd, 16, 0x400000)
    finally:
        os.close(fd)


def _visible_pids() -> list[int]:
    seen = []
    for pid in range(1, PROBE_MAX_PID + 1):
        try:
            os.kill(pid, 0)
            seen.append(pid)
        except ProcessLookupError:
            pass
        except PermissionError:
            seen.append(pid)
    return seen


def probe(other_pid: int | None = None) -> dict[str, Any]:
    """What the jailed worker sees and gets, just before seccomp."""
    report: dict[str, Any] = {
        "pid": os.getpid(),
        "resuid": list(os.getresuid()),
        "resgid": list(os.getresgid()),
        "groups": os.getgroups(),
        "hostname": socket.gethostname(),
        "visible_pids": _visible_pids(),
        "interfaces": [name for _, name in socket.if_nameindex()],
        "cwd": os.getcwd(),
    }
    attempts = {
        "open /etc/shadow": lambda: os.open("/etc/shadow", os.O_RDONLY),
        "open /proc/1/mem": lambda: _read_mem(1),
        "socket(AF_INET) connect": _socket_inet,
        "ptrace(ATTACH, 1)": lambda: _ptrace(1),
        "execve /bin/sh": _exec,
        "mkdir /x": lambda: os.mkdir("/x"),
        "list /": lambda: sorted(os.listdir("/")),
    }
    if other_pid is not None:
        attempts[f"open /proc/{other_pid}/mem"] = lambda: _read_mem(other_pid)
    report["attempts"] = {name: _attempt(fn) for name, fn in attempts.items()}
    return report


def run_forbidden(action: str) -> str:
    """Attempt a forbidden action after the jail; returns only if it was NOT stopped."""
    name, _, arg = action.partition(":")
    fns: dict[str, Any] = {
        "execve": _exec,
        "ptrace": lambda: _ptrace(1),
        "socket-inet": _socket_inet,
        "open-shadow": lambda: os.open("/etc/shadow", os.O_RDONLY),
        "read-vm-memory": lambda: _read_mem(int(arg or "1")),
    }
    return _attempt(fns[name])
