"""Builds a runnable machine from a VmSpec: VM, legacy devices, kernel, vCPU state."""

from __future__ import annotations

import logging
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Literal

from isovisor.devices.legacy.i8042 import I8042
from isovisor.devices.legacy.rtc import CmosRtc
from isovisor.devices.legacy.serial_input import SerialInput
from isovisor.devices.legacy.serial_output import SerialOutput
from isovisor.devices.legacy.uart import REGISTER_COUNT, Uart16550
from isovisor.devices.ratelimit import RateLimiter
from isovisor.devices.virtio.blk import VirtioBlk, open_disk
from isovisor.devices.virtio.blk_disk import DiskError, DiskSpec
from isovisor.devices.virtio.device import VirtioDevice
from isovisor.devices.virtio.mmio import VirtioMmioTransport
from isovisor.devices.virtio.net import VirtioNet
from isovisor.devices.virtio.net_spec import NetError, NetSpec, open_net
from isovisor.devices.virtio.rng import VirtioRng
from isovisor.devices.virtio.slots import MAX_DEVICES, attach_virtio_mmio, virtio_mmio_slot
from isovisor.devices.virtio.vsock import VirtioVsock, VsockConfigError, VsockSpec, open_vsock
from isovisor.kvm import Kvm
from isovisor.kvm import constants as c
from isovisor.memory.layout import MiB
from isovisor.vmm import x86_setup
from isovisor.vmm.acpi import VirtioMmioSlot, write_acpi_tables
from isovisor.vmm.assists import try_assist
from isovisor.vmm.boot.loader import BootEntry, load_kernel
from isovisor.vmm.cpuid import build_cpuid
from isovisor.vmm.emulator_probe import EmulatorProbe, cached_probe
from isovisor.vmm.host_backends import HostBackends
from isovisor.vmm.msrs import boot_msrs
from isovisor.vmm.stop import StopEvent, StopReason
from isovisor.vmm.vm import Vm, VmError

log = logging.getLogger(__name__)

COM1_PORT = 0x3F8
COM1_IRQ = 4
I8042_DATA_PORT = 0x60
I8042_COMMAND_PORT = 0x64
RTC_INDEX_PORT = 0x70
RTC_IRQ = 8
# Images are read whole into memory: refuse absurd sizes with a clear error, not an OOM.
MAX_KERNEL_BYTES = 256 * MiB
MAX_INITRD_BYTES = 2048 * MiB
DEFAULT_MEMORY = 256 * MiB


@dataclass(frozen=True)
class SerialSpec:
    """Where COM1 goes: "stdio", "file:PATH" or "none"; input from stdin with "stdio"."""

    target: str = "stdio"
    rate: float | None = 1024 * 1024  # bytes per second
    total_limit: int | None = 1024 * MiB
    tail_size: int = 64 * 1024


@dataclass(frozen=True)
class VmSpec:
    kernel: Path
    initrd: Path | None = None
    cmdline: str = ""
    memory: int = DEFAULT_MEMORY
    vcpus: int = 1
    protocol: Literal["auto", "pvh", "linux"] = "auto"
    serial: SerialSpec = field(default_factory=SerialSpec)
    # What feeds COM1: "none", "stdin", "fd:N" (an open host fd) or "unix:PATH" (connect
    # to a listening Unix stream socket).
    serial_input: str = "none"
    # virtio devices, in the order they get MMIO slots (and ACPI devices)
    rng: bool = False
    rng_limiter: RateLimiter | None = None
    disks: tuple[DiskSpec, ...] = ()  # virtio-blk, one slot each, after rng
    nets: tuple[NetSpec, ...] = ()  # virtio-net on TAPs, one slot each, after the disks
    vsock: VsockSpec | None = None  # virtio-vsock to host Unix sockets, last


def _read_image(path: Path, what: str, limit: int) -> bytes:
    try:
        size = path.stat().st_size
        if size > limit:
            raise VmError(f"{what} {path} is {size} bytes; the limit is {limit}")
        with path.open("rb") as f:
            return f.read(limit + 1)
    except FileNotFoundError:
        raise VmError(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise VmError(f"{what} {path} is a directory") from None
    except PermissionError:
        raise VmError(f"{what} {path} is not readable") from None


class Machine:
    """A VM with its devices, ready to run once."""

    def __init__(self, spec: VmSpec, kvm: Kvm, *, probe: EmulatorProbe | None = None,
                 backends: HostBackends | None = None) -> None:
        """`probe`: the emulator probe's result when the caller has it (the jailed worker:
        from its zygote), else read from the cache here. `backends`: device backends
        already open (the jailed worker), else the devices open what the spec names."""
        self.spec = spec
        self.kvm = kvm
        self.backends = backends
        kernel = _read_image(spec.kernel, "kernel", MAX_KERNEL_BYTES)
        initrd = _read_image(spec.initrd, "initrd", MAX_INITRD_BYTES) if spec.initrd else None
        self.probe: EmulatorProbe = probe if probe is not None else cached_probe(kvm)
        self.vm = Vm(kvm, spec.memory, spec.vcpus)
        self._out_file: BinaryIO | None = None
        self._in_socket: socket.socket | None = None
        self.serial_input: SerialInput | None = None
        try:
            self._add_legacy_devices()
            self.virtio: list[VirtioMmioTransport] = []
            self.virtio_slots: list[VirtioMmioSlot] = []
            self.disks: list[VirtioBlk] = []
            self.nets: list[VirtioNet] = []
            self.vsock: VirtioVsock | None = None
            self._add_virtio_devices()
            self.rsdp = write_acpi_tables(self.vm.mem, spec.vcpus, self.virtio_slots)
            self.boot: BootEntry = load_kernel(
                self.vm.mem, kernel, cmdline=spec.cmdline, initrd=initrd,
                protocol=spec.protocol, acpi_rsdp=self.rsdp,
            )
            self._setup_vcpus()
        except BaseException:
            self.close()
            raise

    # --- wiring ------------------------------------------------------------------------

    def _serial_sink(self) -> SerialOutput:
        s = self.spec.serial
        out: BinaryIO | None
        if s.target == "stdio":
            out = sys.stdout.buffer
        elif s.target.startswith("file:"):
            path = Path(s.target[5:])
            try:
                out = self._out_file = path.open("ab")
            except OSError as exc:
                raise VmError(f"--serial file {path}: {exc.strerror}") from None
        elif s.target == "none":
            out = None
        else:
            raise VmError(f"--serial {s.target!r}: expected stdio, file:PATH or none")
        return SerialOutput(
            out, rate=s.rate, total_limit=s.total_limit, tail_size=s.tail_size
        )

    def _add_legacy_devices(self) -> None:
        vm = self.vm
        self.serial_output = self._serial_sink()
        self.uart = Uart16550(vm.irq_line(COM1_IRQ), self.serial_output)
        vm.pio.register(COM1_PORT, REGISTER_COUNT, self.uart, "com1")
        self.i8042 = I8042(reset_callback=self._guest_reset)
        vm.pio.register(I8042_DATA_PORT, 1, self.i8042.data_port, "i8042-data")
        vm.pio.register(I8042_COMMAND_PORT, 1, self.i8042.command_port, "i8042-command")
        self.rtc = CmosRtc(memory_size=self.spec.memory)
        vm.pio.register(RTC_INDEX_PORT, 2, self.rtc, "cmos-rtc")

    def _add_virtio_devices(self) -> None:
        """One virtio-mmio slot per device, in a fixed order: rng first (more to come)."""
        if self.spec.rng:
            self._attach(VirtioRng(self.vm.security_events, rate_limiter=self.spec.rng_limiter))
        b = self.backends
        for i, disk in enumerate(self.spec.disks):
            try:
                self.disks.append(open_disk(disk, self.vm.security_events,
                                            fd=b.disk_fds[i] if b else None))
            except DiskError as exc:
                raise VmError(str(exc)) from None
            self._attach(self.disks[-1])
        for i, net in enumerate(self.spec.nets):
            try:
                self.nets.append(open_net(net, self.vm.security_events,
                                          backend=b.taps[i] if b else None))
            except NetError as exc:
                raise VmError(str(exc)) from None
            self._attach(self.nets[-1])
        if self.spec.vsock is not None:
            try:
                self.vsock = open_vsock(
                    self.spec.vsock, self.vm.security_events,
                    listener_socket=b.vsock_listener if b else None,
                    connector=b.vsock_connector if b else None,
                )
            except VsockConfigError as exc:
                raise VmError(str(exc)) from None
            self._attach(self.vsock)

    def _attach(self, device: VirtioDevice) -> VirtioMmioTransport:
        n = len(self.virtio)
        if n >= MAX_DEVICES:
            raise VmError(f"at most {MAX_DEVICES} virtio devices per VM")
        slot = virtio_mmio_slot(n)
        transport = attach_virtio_mmio(self.vm, device, slot)
        self.virtio.append(transport)
        self.virtio_slots.append(VirtioMmioSlot(slot.base, slot.size, slot.gsi))
        return transport

    def _guest_reset(self) -> None:
        self.vm.request_stop(StopEvent(StopReason.GUEST_RESET, None, "i8042 reset (0xFE)"))

    def _setup_vcpus(self) -> None:
        vm, boot = self.vm, self.boot
        x86_setup.write_gdt(vm.mem)
        if boot.protocol == "linux64":
            x86_setup.write_identity_page_tables(vm.mem)
        supported = self.kvm.supported_cpuid()
        msrs = boot_msrs()
        for i, fd in enumerate(vm.vcpu_fds):
            fd.set_cpuid2(build_cpuid(supported, i, vm.vcpu_count, set(self.probe.unemulable)))
            for index, value in msrs:
                if fd.set_msrs([(index, value)]) != 1:
                    log.info("vCPU %d: KVM refused MSR %#x; left at its reset value", i, index)
            if i != 0:
                continue  # APs wait for INIT/SIPI in the in-kernel local APIC
            sregs = fd.get_sregs()
            if boot.protocol == "pvh":
                x86_setup.pvh_sregs(sregs)
            else:
                x86_setup.long_mode_sregs(sregs)
            fd.set_sregs(sregs)
            fd.set_regs(x86_setup.entry_regs(boot.entry, boot.boot_struct, boot.protocol))
            fd.set_mp_state(c.KVM_MP_STATE_RUNNABLE)

    def _serial_input_fd(self) -> int | None:
        src = self.spec.serial_input
        if src == "none":
            return None
        if src == "stdin":
            try:
                return sys.stdin.fileno()
            except (OSError, ValueError, AttributeError):
                return None
        if src.startswith("fd:") and src[3:].isdigit():
            return int(src[3:])
        if src.startswith("unix:") and len(src) > 5:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                sock.connect(src[5:])
            except OSError as exc:
                sock.close()
                raise VmError(f"--serial-input {src}: cannot connect: {exc.strerror}") from None
            self._in_socket = sock
            return sock.fileno()
        raise VmError(f"--serial-input {src!r}: expected stdin, unix:PATH or none")

    # --- running ----------------------------------------------------------------------

    def start(self) -> None:
        enabled = self.probe.needs_assists
        mem = self.vm.mem
        assist = (lambda fd: try_assist(fd, mem, enabled)) if enabled else None
        fd = self._serial_input_fd()
        if fd is not None:
            self.serial_input = SerialInput(fd, self.uart)
            self.serial_input.start()
        self.vm.start(assist)

    def wait(self, timeout: float | None = None) -> StopEvent | None:
        return self.vm.wait(timeout)

    def run(self, timeout: float | None = None) -> StopEvent:
        """Start, wait until the guest stops (or `timeout`, then stop it), return why."""
        self.start()
        ev = self.wait(timeout)
        if ev is None:
            self.vm.stop(f"timed out after {timeout} s")
            ev = self.wait()
        assert ev is not None
        return ev

    def close(self) -> None:
        if self.serial_input is not None:
            self.serial_input.stop()
        if self.vm.vcpus and self.vm.stop_event is None:
            self.vm.stop("VM closed")
        for v in self.vm.vcpus:
            v.join(5.0)
        for transport in getattr(self, "virtio", []):
            transport.close()  # stops device I/O threads before guest memory goes
        for blk in getattr(self, "disks", []):
            blk.close()  # closes the image (and drops its lock)
        for net in getattr(self, "nets", []):
            net.close()  # closes the TAP
        vsock: VirtioVsock | None = getattr(self, "vsock", None)
        if vsock is not None:
            vsock.close()  # removes the listening socket
        self.vm.close()
        if self._in_socket is not None:
            self._in_socket.close()
            self._in_socket = None
        if self._out_file is not None:
            self._out_file.close()
            self._out_file = None
