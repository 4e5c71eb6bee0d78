"""A machine in "surface mode": the real builder wiring every device kind, without KVM.

`Machine.__init__` (isovisor.vmm.builder) runs unchanged, so whatever it registers on the
buses is what the inventory sees; only what needs KVM or host hardware is stood in for:

- `Vm` -> `SurfaceVm`: real port-I/O and MMIO buses, real guest memory (a memfd, no KVM
  slot), a real security-event log; interrupt lines, ioeventfds and irqfds are recorded
  (the eventfds are plain ones);
- the emulator probe -> "nothing to assist"; the kernel loader -> a fixed entry (the
  loaders are inventoried from their own code); vCPU register set-up -> skipped;
- TAP devices -> an in-memory backend (opening a real TAP needs one to exist).

The VmSpec is filled from its own fields: every `bool` device switch on, and every device
spec type (`DiskSpec`, `NetSpec`, `VsockSpec`, ...) given the samples below. A VmSpec field
of a spec type this module has no sample for fails generation: a new device kind cannot
join the builder without joining the inventory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import tempfile
import types
import typing
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from isovisor.devices.bus import Bus, mmio_bus, pio_bus
from isovisor.devices.events import SecurityEventLog
from isovisor.devices.irq import RecordingLine
from isovisor.memory import GuestMemory
from isovisor.security.surface.model import SurfaceError

SURFACE_MEMORY = 64 << 20
SURFACE_DISK_BYTES = 1 << 20
SURFACE_TAP = "isv-surface0"
SURFACE_VSOCK_CID = 3
# VmSpec field types that configure the machine but add no device: left at their default.
NOT_DEVICES = frozenset({"SerialSpec", "RateLimiter", "BucketSpec"})


@dataclass(frozen=True)
class IoEventFd:
    addr: int
    length: int
    datamatch: int | None
    pio: bool


class SurfaceVm:
    """Stands in for isovisor.vmm.vm.Vm (same constructor, same device-facing API)."""

    def __init__(self, kvm: object, memory_size: int, vcpu_count: int) -> None:
        self.kvm = kvm
        self.vcpu_count = vcpu_count
        self.pio: Bus = pio_bus()
        self.mmio: Bus = mmio_bus()
        self.memory: GuestMemory | None = GuestMemory(memory_size)
        self.security_events = SecurityEventLog()
        self.irq_lines: dict[int, RecordingLine] = {}
        self.ioeventfds: list[IoEventFd] = []
        self.irqfds: list[int] = []
        self.vcpus: list[object] = []
        self.vcpu_fds: list[object] = []
        self.stop_event: object | None = None
        self.stop_listeners: list[Callable[[object], None]] = []
        self._eventfds: list[int] = []

    @property
    def mem(self) -> GuestMemory:
        assert self.memory is not None, "surface VM is closed"
        return self.memory

    def irq_line(self, irq: int) -> RecordingLine:
        return self.irq_lines.setdefault(irq, RecordingLine())

    def _eventfd(self) -> int:
        fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._eventfds.append(fd)
        return fd

    def ioeventfd(self, addr: int, length: int, *, datamatch: int | None = None,
                  pio: bool = False) -> int:
        self.ioeventfds.append(IoEventFd(addr, length, datamatch, pio))
        return self._eventfd()

    def irqfd(self, gsi: int) -> int:
        self.irqfds.append(gsi)
        return self._eventfd()

    def request_stop(self, event: object) -> None:
        if self.stop_event is None:
            self.stop_event = event

    def stop(self, detail: str = "") -> None:
        self.request_stop(detail)

    def close(self) -> None:
        for fd in self._eventfds:
            os.close(fd)
        self._eventfds = []
        if self.memory is not None:
            self.memory.close()
            self.memory = None


class MemoryTap:
    """A NetBackend with nothing behind it: never readable, swallows frames."""

    ufo = False

    def __init__(self, name: str, *, create: bool = False, netns: str | None = None) -> None:
        self.name = name  # (open_tap's signature: `create` and `netns` change nothing here)
        self._fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.offloads = 0

    @property
    def fd(self) -> int:
        return self._fd

    def set_offloads(self, flags: int) -> None:
        self.offloads = flags

    def readv(self, buffers: Sequence[memoryview | bytearray]) -> int | None:
        return None

    def writev(self, buffers: Sequence[memoryview | bytes]) -> int:
        return sum(len(b) for b in buffers)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


@dataclass(frozen=True)
class _Probe:
    unemulable: frozenset[str] = frozenset()
    needs_assists: frozenset[str] = frozenset()


@dataclass
class SurfaceMachine:
    """The built machine and what it took to build it; `close()` releases everything."""

    machine: Any  # isovisor.vmm.builder.Machine
    vm: SurfaceVm
    spec: Any  # isovisor.vmm.builder.VmSpec
    workdir: Path
    closers: list[Callable[[], None]] = field(default_factory=list)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.machine.close()
        for close in reversed(self.closers):
            with contextlib.suppress(Exception):
                close()


def _samples(workdir: Path) -> dict[str, Callable[[], tuple[Any, ...]]]:
    """Device spec type name -> the sample values a surface machine gets (one or more
    variants: a read-write and a read-only disk offer different feature bits)."""

    def disks() -> tuple[Any, ...]:
        from isovisor.devices.virtio.blk_disk import DiskSpec

        out = []
        for name, ro in (("rw.img", False), ("ro.img", True)):
            path = workdir / name
            with path.open("wb") as f:
                f.truncate(SURFACE_DISK_BYTES)
            out.append(DiskSpec(path=path, readonly=ro, serial="surface"))
        return tuple(out)

    def nets() -> tuple[Any, ...]:
        from isovisor.devices.virtio.net_spec import NetSpec

        return (NetSpec(tap=SURFACE_TAP, mac="52:54:00:00:00:01"),)

    def vsocks() -> tuple[Any, ...]:
        from isovisor.devices.virtio.vsock.spec import VsockSpec

        return (VsockSpec(cid=SURFACE_VSOCK_CID, uds=workdir / "vsock.sock"),)

    return {"DiskSpec": disks, "NetSpec": nets, "VsockSpec": vsocks}


def _inner_types(tp: Any) -> tuple[str, Any]:
    """("tuple", X) for tuple[X, ...]; ("optional", X) for X | None; ("plain", tp)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return "tuple", args[0]
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            return "optional", rest[0]
    return "plain", tp


def fill_spec(spec_cls: type[Any], kernel: Path, workdir: Path) -> Any:
    """A VmSpec with every device kind it can describe (see the module docstring)."""
    samples = _samples(workdir)
    hints = typing.get_type_hints(spec_cls)
    values: dict[str, Any] = {"kernel": kernel}
    for f in dataclasses.fields(spec_cls):
        if f.name == "kernel":
            continue
        shape, inner = _inner_types(hints[f.name])
        name = getattr(inner, "__name__", str(inner))
        if inner is bool and shape == "plain" and f.default is False:
            values[f.name] = True  # a device switch (rng)
        elif name in samples:
            made = samples[name]()
            values[f.name] = made if shape == "tuple" else made[0]
        elif name in NOT_DEVICES:
            continue
        elif dataclasses.is_dataclass(inner):
            raise SurfaceError(
                f"VmSpec.{f.name} ({name}) looks like a device the surface generator cannot "
                "build: add a sample for it in isovisor/security/surface/machine.py (or list "
                "the type in NOT_DEVICES if it adds nothing a guest can reach)")
    return spec_cls(**values)


def _patch_everywhere(stack: contextlib.ExitStack, original: object, replacement: object) -> None:
    """Replace `original` in every isovisor module that imported it by name."""
    for mod in list(sys.modules.values()):
        name = getattr(mod, "__name__", "")
        if not name.startswith("isovisor."):
            continue
        for attr, value in list(vars(mod).items()):
            if value is original:
                stack.enter_context(_setattr(mod, attr, replacement))


@contextlib.contextmanager
def _setattr(obj: object, name: str, value: object) -> Iterator[None]:
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def build_surface_machine() -> SurfaceMachine:
    """Run the real builder with every device kind; the caller must `close()` the result."""
    from isovisor.devices import tap
    from isovisor.vmm import builder
    from isovisor.vmm.boot.plan import BootEntry

    tmp = tempfile.TemporaryDirectory(prefix="isovisor-surface-")
    workdir = Path(tmp.name)
    kernel = workdir / "kernel"
    kernel.write_bytes(b"\0" * 64)  # never parsed: load_kernel is stood in for
    spec = fill_spec(builder.VmSpec, kernel, workdir)
    spec = dataclasses.replace(spec, memory=SURFACE_MEMORY, serial=builder.SerialSpec("none"))

    def load_kernel(*_args: object, **_kwargs: object) -> BootEntry:
        return BootEntry("pvh", 0x100000, 0x6000, 0x100000, 0x100000, None)

    with contextlib.ExitStack() as stack:
        stack.enter_context(_setattr(builder, "Vm", SurfaceVm))
        stack.enter_context(_setattr(builder, "cached_probe", lambda _kvm: _Probe()))
        stack.enter_context(_setattr(builder, "load_kernel", load_kernel))
        stack.enter_context(_setattr(builder.Machine, "_setup_vcpus", lambda self: None))
        _patch_everywhere(stack, tap.open_tap, MemoryTap)
        try:
            machine = builder.Machine(spec, typing.cast(Any, None))
        except Exception as exc:
            tmp.cleanup()
            raise SurfaceError(f"the surface-mode machine could not be built: "
                               f"{type(exc).__name__}: {exc}") from exc
    vm = machine.vm
    assert isinstance(vm, SurfaceVm)
    return SurfaceMachine(machine, vm, spec, workdir, [tmp.cleanup])
