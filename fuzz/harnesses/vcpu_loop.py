"""The vCPU loop's exit dispatch (every exit reason it names, and the others) over the
buses of a surface-mode machine: port I/O (single and rep string), MMIO of every width,
internal errors, system events, shutdown, entry failures. Oracles: nothing escapes the
loop, no device model faults on guest input, and the loop ends with the stop reason the
exit implies."""

from __future__ import annotations

from typing import Any

from fuzz.data import Data
from fuzz.fakevcpu import FakeVcpuFd, script_exit
from isovisor.vmm.stop import StopEvent, StopReason
from isovisor.vmm.vcpu import Vcpu

COVERS = ("exit:*",)
MAX_EXITS = 64
_machine: Any = None


def setup() -> None:
    global _machine
    from isovisor.security.surface.machine import build_surface_machine

    _machine = build_surface_machine()


def one_input(data: bytes) -> None:
    if _machine is None:
        setup()
    vm = _machine.vm
    ports = [r.base for r in vm.pio.ranges()]
    windows = [r.base for r in vm.mmio.ranges()]
    faults = vm.pio.stats.device_faults + vm.mmio.stats.device_faults
    d = Data(data)
    fd = FakeVcpuFd()
    stops: list[StopEvent] = []
    vcpu = Vcpu(0, fd, vm.pio, vm.mmio, stops.append)  # type: ignore[arg-type]
    exits = [0]

    def script(run: Any) -> bool:
        if exits[0] >= MAX_EXITS or d.exhausted or stops:
            return False
        exits[0] += 1
        script_exit(d, run, ports, windows)
        return True

    fd.script = script
    fd.on_exhausted = vcpu.stop
    try:
        vcpu._loop()
    finally:
        for t in _machine.machine.virtio:
            t.reset()
        fd.close()
    assert not any(ev.reason is StopReason.VMM_ERROR for ev in stops), stops
    now = vm.pio.stats.device_faults + vm.mmio.stats.device_faults
    assert now == faults, "a device model raised on guest input (contained by the bus)"
