"""vCPU threads: exits reach the buses, pause/resume/stop from other threads, no GIL in
KVM_RUN, stop reasons."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from isovisor.kvm import Kvm
from isovisor.vmm.stop import StopReason
from isovisor.vmm.vcpu import VcpuState
from tests.vmm.rawguest import OUT_AB_THEN_SPIN, SPIN, Recorder, raw_vm


def _thread_cpu_seconds(native_id: int) -> float:
    fields = Path(f"/proc/self/task/{native_id}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100.0  # utime + stime, in clock ticks


def test_port_io_reaches_the_bus_and_host_stop(kvm: Kvm) -> None:
    vm = raw_vm(kvm, OUT_AB_THEN_SPIN)
    rec = Recorder()
    vm.pio.register(0x3F8, 8, rec, "recorder")
    try:
        vm.start()
        deadline = time.monotonic() + 10
        while len(rec.writes) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert rec.writes == [(0, b"A"), (0, b"B")]
        vm.stop()
        ev = vm.wait(10)
        assert ev is not None and ev.reason is StopReason.HOST_REQUEST
        assert all(v.state is VcpuState.STOPPED for v in vm.vcpus)
    finally:
        vm.close()


def test_unclaimed_port_io_is_counted_and_reads_all_ones(kvm: Kvm) -> None:
    # in al, 0x99 ; out 0x98, al ; jmp $   (nobody is registered at 0x98/0x99)
    code = bytes.fromhex("e499" "e698" "ebfe")
    vm = raw_vm(kvm, code)
    try:
        vm.start()
        deadline = time.monotonic() + 10
        while vm.pio.stats.unclaimed_writes < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert vm.pio.stats.unclaimed_reads == 1
        assert vm.pio.stats.unclaimed_writes == 1
        regs = vm.vcpu_fds[0]
        vm.pause()
        assert regs.get_regs().rax & 0xFF == 0xFF  # all-ones
    finally:
        vm.close()


def test_pause_resume_stop_from_another_thread(kvm: Kvm) -> None:
    vm = raw_vm(kvm, SPIN, vcpus=2)
    try:
        vm.start()
        for _ in range(5):
            assert vm.pause()
            assert all(v.state is VcpuState.PAUSED for v in vm.vcpus)
            rip = [fd.get_regs().rip for fd in vm.vcpu_fds]
            time.sleep(0.05)
            assert [fd.get_regs().rip for fd in vm.vcpu_fds] == rip
            vm.resume()
            time.sleep(0.05)
            assert all(v.state is VcpuState.RUNNING for v in vm.vcpus)
        stopper = threading.Thread(target=vm.stop)
        stopper.start()
        stopper.join()
        ev = vm.wait(10)
        assert ev is not None and ev.reason is StopReason.HOST_REQUEST
    finally:
        vm.close()


def _spin_cpu_seconds(kvm: Kvm, vcpus: int, seconds: float) -> tuple[list[float], float]:
    """CPU time each vCPU thread used while `vcpus` vCPUs spin in the guest for `seconds`."""
    vm = raw_vm(kvm, SPIN, vcpus=vcpus)
    try:
        vm.start()
        time.sleep(0.2)
        ids = [v._thread.native_id for v in vm.vcpus if v._thread and v._thread.native_id]
        before = [_thread_cpu_seconds(i) for i in ids]
        t0 = time.monotonic()
        time.sleep(seconds)
        wall = time.monotonic() - t0
        used = [_thread_cpu_seconds(i) - b for i, b in zip(ids, before, strict=True)]
        return used, wall
    finally:
        vm.close()


def _thread_state(native_id: int) -> str:
    return Path(f"/proc/self/task/{native_id}/stat").read_text().rsplit(")", 1)[1].split()[0]


def test_kvm_run_does_not_hold_the_gil(kvm: Kvm) -> None:
    """Two vCPUs spinning in the guest use two host cores while Python threads run too.

    If KVM_RUN held the GIL, a second vCPU thread would sleep waiting for the GIL while the
    first is in the guest: the two could never both be runnable, and together they would
    get no more CPU than one alone.
    """
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs two host cores")
    idle_host = os.getloadavg()[0] < 0.5
    vm = raw_vm(kvm, SPIN, vcpus=2)
    try:
        vm.start()
        time.sleep(0.2)
        ids = [v._thread.native_id for v in vm.vcpus if v._thread and v._thread.native_id]
        both_runnable = 0
        samples = 200
        for _ in range(samples):
            if all(_thread_state(i) == "R" for i in ids):
                both_runnable += 1
            time.sleep(0.005)
        assert both_runnable > 0.8 * samples, both_runnable
    finally:
        vm.close()
    if idle_host:  # CPU time is only comparable when nothing else competes for the cores
        one, _ = _spin_cpu_seconds(kvm, 1, 1.5)
        two, _ = _spin_cpu_seconds(kvm, 2, 1.5)
        assert sum(two) > 1.3 * one[0], (one, two)

    vm = raw_vm(kvm, SPIN, vcpus=2)
    counter = 0
    stop = threading.Event()

    def python_work() -> None:
        nonlocal counter
        while not stop.is_set():
            counter += 1

    try:
        vm.start()
        time.sleep(0.2)
        worker = threading.Thread(target=python_work)
        worker.start()
        time.sleep(0.5)
        stop.set()
        worker.join()
        assert counter > 10_000  # the interpreter was free while both vCPUs were in KVM_RUN
    finally:
        vm.close()


def test_ioeventfd_and_irqfd_plumbing(kvm: Kvm) -> None:
    """A guest write to a registered port signals the eventfd without reaching the bus."""
    import os
    import select

    # mov dx, 0x510 ; mov al, 7 ; out dx, al ; jmp $
    vm = raw_vm(kvm, bytes.fromhex("66ba1005" "b007" "ee" "ebfe"))
    rec = Recorder()
    vm.pio.register(0x510, 1, rec, "recorder")
    try:
        efd = vm.ioeventfd(0x510, 1, pio=True, datamatch=7)
        irq = vm.irqfd(5)
        vm.start()
        ready, _, _ = select.select([efd], [], [], 10)
        assert ready == [efd]
        assert int.from_bytes(os.read(efd, 8), "little") == 1
        assert rec.writes == []  # handled in the kernel: no exit to userspace
        os.write(irq, (1).to_bytes(8, "little"))  # injecting from a host thread is fine
    finally:
        vm.close()
