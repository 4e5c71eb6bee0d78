"""New namespaces for a worker: mount, PID, IPC, UTS, network, cgroup.

unshare(2) moves the caller into the new mount, IPC, UTS, network and cgroup namespaces at
once; the new PID namespace applies to the caller's children only, so the worker forks
once more and the VM runs in that namespace's init (pid 1). The network namespace is left
empty (not even loopback is brought up): the worker reaches the network only through TAP
fds the host hands it.
"""

from __future__ import annotations

import os

from isovisor.worker import libc
from isovisor.worker.errors import JailError

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

WORKER_NAMESPACES = {
    "mnt": CLONE_NEWNS,
    "pid": CLONE_NEWPID,
    "ipc": CLONE_NEWIPC,
    "uts": CLONE_NEWUTS,
    "net": CLONE_NEWNET,
    "cgroup": CLONE_NEWCGROUP,
}
WORKER_HOSTNAME = "isovisor-vm"


def enter_new_namespaces() -> None:
    flags = 0
    for f in WORKER_NAMESPACES.values():
        flags |= f
    try:
        libc.unshare(flags)
    except OSError as exc:
        raise JailError("namespaces", f"unshare(mnt, pid, ipc, uts, net, cgroup): "
                        f"{os.strerror(exc.errno or 0)}") from None


def set_hostname(name: str = WORKER_HOSTNAME) -> None:
    try:
        libc.sethostname(name)
    except OSError as exc:
        raise JailError("uts", f"sethostname: {os.strerror(exc.errno or 0)}") from None


def namespace_ids(pid: int | str = "self") -> dict[str, str]:
    """The namespace links of a process (e.g. {'net': 'net:[4026532...]'}), for reports."""
    out = {}
    for name in WORKER_NAMESPACES:
        try:
            out[name] = os.readlink(f"/proc/{pid}/ns/{name}")
        except OSError:
            out[name] = "?"
    return out
