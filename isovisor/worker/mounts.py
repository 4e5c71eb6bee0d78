"""The worker's filesystem view: a private mount tree, pivot_root into a per-VM tmpfs.

The new root is a small tmpfs, mounted read-only, nosuid, nodev, noexec after it is
populated. Everything the worker runs is imported before the jail (zygote preload), and
open/openat are forbidden by seccomp after setup, so the root holds nothing by default;
`binds` adds read-only bind mounts (source -> path inside the root) for what a future
device may need to reach before seccomp. The old root is detached, so no host path is
reachable by any name afterwards.
"""

from __future__ import annotations

import os
from pathlib import Path

from isovisor.worker import libc
from isovisor.worker.errors import JailError

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000
MNT_DETACH = 0x2

# The mount point for the new root in the worker's private mount namespace: made by the
# host side once (empty, root-only); each worker mounts its own tmpfs over it privately.
JAIL_MOUNT_POINT = "/run/isovisor/jail-root"
ROOT_TMPFS_OPTIONS = "size=64k,nr_inodes=64,mode=0555"
SKELETON = ("dev", "proc", "tmp")  # empty directories, kept for tools' expectations


def code_paths() -> list[str]:
    """Where the code a VMM process runs comes from: isovisor's package and the
    interpreter's prefixes (the venv with its site-packages, the base installation)."""
    import sys

    import isovisor

    found = {os.path.realpath(p) for p in (os.path.dirname(isovisor.__file__), sys.prefix,
                                           sys.base_prefix) if p}
    # a path inside another listed one is covered by that one's recursive bind
    return sorted(p for p in found
                  if not any(p != q and p.startswith(q.rstrip("/") + "/") for q in found))


def read_only_code_view(paths: list[str]) -> None:
    """Zygote, before it imports the VMM: a private mount namespace in which every code
    path is a read-only bind of itself, so neither the zygote nor a worker (before its
    pivot_root, after which no host path exists) can change code a later launch runs.
    Raises JailError (the zygote then fails to start: fail closed)."""
    from isovisor.worker.namespaces import CLONE_NEWNS

    try:
        libc.unshare(CLONE_NEWNS)
        libc.mount(None, "/", None, MS_REC | MS_PRIVATE)
        for p in paths:
            libc.mount(p, p, None, MS_BIND | MS_REC)
            libc.mount(None, p, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
    except OSError as exc:
        raise _fail("code-view", "making the code paths read-only", exc) from None


def prepare_mount_point(path: str = JAIL_MOUNT_POINT) -> None:
    """Host side: create the (empty) mount point directory."""
    os.makedirs(path, mode=0o700, exist_ok=True)


def _fail(step: str, what: str, exc: OSError) -> JailError:
    return JailError(step, f"{what}: {os.strerror(exc.errno or 0)}")


def build_root(binds: dict[str, str] | None = None,
               mount_point: str = JAIL_MOUNT_POINT) -> None:
    """Make every mount private, mount and populate the new root, pivot_root into it and
    detach the old one. Must run in a fresh mount namespace."""
    binds = binds or {}
    for src in binds:
        if not os.path.exists(src):
            raise JailError("mounts", f"bind source {src} does not exist")
    try:
        libc.mount(None, "/", None, MS_REC | MS_PRIVATE)
    except OSError as exc:
        raise _fail("mounts", "making / private", exc) from None
    try:
        libc.mount("isovisor-jail", mount_point, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC,
                   ROOT_TMPFS_OPTIONS)
    except OSError as exc:
        raise _fail("mounts", f"tmpfs on {mount_point}", exc) from None
    root = Path(mount_point)
    try:
        os.chmod(root, 0o755)
        for d in SKELETON:
            (root / d).mkdir(mode=0o555)
        for src, dst in binds.items():
            target = root / dst.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            if os.path.isdir(src):
                target.mkdir(exist_ok=True)
            else:
                target.touch()
            libc.mount(src, str(target), None, MS_BIND | MS_REC)
            libc.mount(None, str(target), None,
                       MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)
        (root / ".old").mkdir(mode=0o700)
    except OSError as exc:
        raise _fail("mounts", "populating the root", exc) from None
    try:
        libc.pivot_root(mount_point, f"{mount_point}/.old")
        os.chdir("/")
        libc.umount2("/.old", MNT_DETACH)
        os.rmdir("/.old")
        os.chmod("/", 0o555)
        libc.mount(None, "/", None,
                   MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, None)
    except OSError as exc:
        raise _fail("pivot_root", "entering the new root", exc) from None
