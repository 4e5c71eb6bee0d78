"""Per-VM cgroups on the v1 layout (one hierarchy per controller), the v2 layout (one
unified hierarchy) and the hybrid of both that this host has.

Each VM gets `<hierarchy>/<launcher's own cgroup>/isovisor/vm-<uid>` in every hierarchy,
with: a CPU quota (`cpu.cfs_quota_us` / `cpu.max`) and a cpuset, a memory limit of guest
RAM + MEMORY_OVERHEAD with no swap, and a pids limit. On the hybrid layout the limits live
in the v1 controllers and the worker also joins the (controller-less) unified hierarchy,
so its cgroup namespace is rooted at its own cgroup there too. The host side creates and
removes the groups; the worker joins them (writes "0" to cgroup.procs) before it unshares
its cgroup namespace.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from isovisor.worker.errors import JailError

V1_CONTROLLERS = ("cpu", "cpuset", "memory", "pids")
CFS_PERIOD_US = 100_000
# What a worker needs beside guest RAM: the interpreter's copy-on-write pages after the
# fork from the zygote, thread stacks, KVM's per-VM and per-vCPU kernel objects and page
# tables, device buffers. Measured at under 24 MiB for an idle worker (bench/RESULTS.md);
# stated with headroom so a busy worker is not killed by the OOM killer for our own use.
MEMORY_OVERHEAD = 64 * 1024 * 1024
# Threads beside the vCPUs: main/control, serial input, device I/O threads, margin.
EXTRA_TASKS = 24
# CPU time for the VMM's own threads (device I/O, serial, control) on top of one core per
# vCPU. Without it the device threads compete with the vCPUs for the same quota: on a PVM
# host a vCPU waiting in `hlt` on a 50 us timer takes a whole core in KVM's emulation,
# and bench/blk.py's jailed worker spent 58 of 60 CFS periods throttled, at half the
# unjailed throughput. The guest still gets no more than its vCPUs' worth of vCPU time
# from this: the extra core only runs device work, which the devices' rate limiters bound.
VMM_THREAD_CORES = 1.0
GROUP_PARENT = "isovisor"


@dataclass(frozen=True)
class CgroupLimits:
    cpu_cores: float  # CPU time per period, in cores
    memory_bytes: int
    pids: int
    cpuset: str | None = None  # None: the parent's CPUs

    @staticmethod
    def for_vm(vcpus: int, guest_memory: int, cpuset: str | None = None) -> CgroupLimits:
        return CgroupLimits(vcpus + VMM_THREAD_CORES, guest_memory + MEMORY_OVERHEAD,
                            vcpus + EXTRA_TASKS, cpuset)


@dataclass(frozen=True)
class Layout:
    """Where the hierarchies are mounted; `v1` maps controller -> the directory of the
    launcher's own cgroup in that hierarchy. `v2` is the unified hierarchy's directory for
    the launcher, and `v2_controllers` the controllers it offers."""

    v1: dict[str, Path] = field(default_factory=dict)
    v2: Path | None = None
    v2_controllers: frozenset[str] = frozenset()

    @property
    def kind(self) -> str:
        if self.v1 and self.v2 is not None:
            return "hybrid"
        return "v1" if self.v1 else "v2"


def _own_paths() -> tuple[dict[str, str], str | None]:
    v1: dict[str, str] = {}
    v2: str | None = None
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        num, controllers, path = line.split(":", 2)
        if num == "0" and controllers == "":
            v2 = path
        for c in controllers.split(","):
            v1[c] = path
    return v1, v2


def detect() -> Layout:
    """Read /proc/self/mountinfo and /proc/self/cgroup."""
    own_v1, own_v2 = _own_paths()
    v1: dict[str, Path] = {}
    v2: Path | None = None
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        fields, rfields = left.split(), right.split()
        if len(fields) < 5 or len(rfields) < 3:
            continue
        root, mnt, fstype, opts = fields[3], fields[4], rfields[0], rfields[2].split(",")
        if fstype == "cgroup2" and own_v2 is not None:
            rel = os.path.relpath(own_v2, root) if own_v2.startswith(root) else "."
            v2 = Path(os.path.normpath(Path(mnt) / rel))
        elif fstype == "cgroup":
            for c in V1_CONTROLLERS:
                if c in opts and c in own_v1:
                    own = own_v1[c]
                    rel = os.path.relpath(own, root) if own.startswith(root) else "."
                    v1[c] = Path(os.path.normpath(Path(mnt) / rel))
    ctl: frozenset[str] = frozenset()
    if v2 is not None:
        with contextlib.suppress(OSError):
            ctl = frozenset((v2 / "cgroup.controllers").read_text().split())
    return Layout(v1, v2, ctl)


def _write(path: Path, value: str) -> None:
    try:
        with open(path, "w") as f:
            f.write(value)
    except OSError as exc:
        raise JailError("cgroups", f"{path}={value.strip()}: {exc.strerror}") from None


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError as exc:
        raise JailError("cgroups", f"{path}: {exc.strerror}") from None


def _mkdir(path: Path) -> None:
    try:
        path.mkdir(mode=0o755, exist_ok=True)
    except OSError as exc:
        raise JailError("cgroups", f"cannot create {path}: {exc.strerror}") from None


@dataclass
class VmCgroups:
    """The cgroup directories of one VM."""

    name: str
    dirs: list[Path]
    limits: CgroupLimits

    @property
    def procs_files(self) -> list[str]:
        return [str(d / "cgroup.procs") for d in self.dirs]

    def remove(self, attempts: int = 50) -> None:
        """rmdir every directory (children first); tasks that just died may linger for a
        moment in the accounting, hence the short retries."""
        for d in self.dirs:
            for _ in range(attempts):
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError as exc:
                    if exc.errno != errno.EBUSY:
                        break
                    time.sleep(0.01)


def _parent(base: Path) -> Path:
    parent = base / GROUP_PARENT
    _mkdir(parent)
    return parent


def _stale_cleanup(path: Path) -> None:
    """A directory left by a crashed launcher: reuse it only if it has no tasks."""
    if not path.exists():
        return
    procs = path / "cgroup.procs"
    if procs.exists() and _read(procs):
        raise JailError("cgroups", f"{path} already exists and has tasks")
    with contextlib.suppress(OSError):
        path.rmdir()


def _setup_v1(layout: Layout, name: str, lim: CgroupLimits, dirs: list[Path]) -> None:
    for c in V1_CONTROLLERS:
        if c not in layout.v1:
            raise JailError("cgroups", f"the cgroup v1 controller {c} is not mounted")
    for c in V1_CONTROLLERS:
        parent = _parent(layout.v1[c])
        if c == "cpuset":
            # A new v1 cpuset starts empty: inherit the parent's CPUs and memory nodes.
            for key in ("cpuset.cpus", "cpuset.mems"):
                if not (parent / key).exists() or not _read(parent / key):
                    _write(parent / key, _read(layout.v1[c] / key))
        d = parent / name
        _stale_cleanup(d)
        _mkdir(d)
        dirs.append(d)
        if c == "cpu":
            _write(d / "cpu.cfs_period_us", str(CFS_PERIOD_US))
            _write(d / "cpu.cfs_quota_us", str(max(1000, int(lim.cpu_cores * CFS_PERIOD_US))))
        elif c == "cpuset":
            _write(d / "cpuset.mems", _read(parent / "cpuset.mems"))
            _write(d / "cpuset.cpus", lim.cpuset or _read(parent / "cpuset.cpus"))
        elif c == "memory":
            _write(d / "memory.limit_in_bytes", str(lim.memory_bytes))
            memsw = d / "memory.memsw.limit_in_bytes"
            if memsw.exists():  # swap accounting on: RAM + swap == RAM, i.e. no swap
                _write(memsw, str(lim.memory_bytes))
        elif c == "pids":
            _write(d / "pids.max", str(lim.pids))


def _setup_v2(root: Path, controllers: frozenset[str], name: str, lim: CgroupLimits,
              limits_here: bool, dirs: list[Path]) -> None:
    parent = _parent(root)
    wanted = [c for c in V1_CONTROLLERS if c in controllers] if limits_here else []
    if limits_here:
        missing = [c for c in V1_CONTROLLERS if c not in controllers]
        if missing:
            raise JailError("cgroups", f"the unified hierarchy lacks {', '.join(missing)}")
        enable = " ".join(f"+{c}" for c in wanted)
        for d in (root, parent):
            _write(d / "cgroup.subtree_control", enable)
    d = parent / name
    _stale_cleanup(d)
    _mkdir(d)
    dirs.append(d)
    if limits_here:
        _write(d / "cpu.max", f"{max(1000, int(lim.cpu_cores * CFS_PERIOD_US))} {CFS_PERIOD_US}")
        cpus = lim.cpuset or _read(parent / "cpuset.cpus.effective")
        _write(d / "cpuset.cpus", cpus)
        _write(d / "memory.max", str(lim.memory_bytes))
        _write(d / "memory.swap.max", "0")
        _write(d / "pids.max", str(lim.pids))


def create(name: str, limits: CgroupLimits, layout: Layout | None = None) -> VmCgroups:
    """Create and configure the VM's groups; on failure remove what was made and raise
    JailError('cgroups', ...)."""
    layout = layout or detect()
    made: list[Path] = []
    try:
        if layout.v1:
            _setup_v1(layout, name, limits, made)
            if layout.v2 is not None:
                _setup_v2(layout.v2, layout.v2_controllers, name, limits, False, made)
        elif layout.v2 is not None:
            _setup_v2(layout.v2, layout.v2_controllers, name, limits, True, made)
        else:
            raise JailError("cgroups", "no cgroup hierarchy is mounted")
    except BaseException:
        VmCgroups(name, made, limits).remove(attempts=1)
        raise
    return VmCgroups(name, made, limits)


def join(procs_files: list[str]) -> None:
    """Move the calling process into each group (run in the worker, before unshare)."""
    for path in procs_files:
        _write(Path(path), "0")
