"""vCPU threads: exits reach the buses, pause/resume/stop from other threads, no GIL in
KVM_RUN, stop reasons."""

from __future__ import annotations

import threading
import time
from pathlib import Path

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


def test_kvm_run_does_not_hold_the_gil(kvm: Kvm) -> None:
    """Two vCPUs spinning in the guest use two host cores while Python threads run too."""
    vm = raw_vm(kvm, SPIN, vcpus=2)
    counter = 0
    stop = threading.Event()

    def python_work() -> None:
        nonlocal counter
        while not stop.is_set():
            counter += 1

    try:
        vm.start()
        time.sleep(0.3)
        ids = [v._thread.native_id for v in vm.vcpus if v._thread and v._thread.native_id]
        before = [_thread_cpu_seconds(i) for i in ids]
        t0 = time.monotonic()
        time.sleep(2.0)
        wall = time.monotonic() - t0
        used = [_thread_cpu_seconds(i) - b for i, b in zip(ids, before, strict=True)]
        # Both vCPU threads were inside KVM_RUN at once, on two cores: if KVM_RUN held the
        # GIL only one thread could be in it at a time and the sum could not exceed 1.0.
        assert all(u > 0.5 * wall for u in used), (used, wall)
        assert sum(used) > 1.25 * wall, (used, wall)
        worker = threading.Thread(target=python_work)
        worker.start()
        time.sleep(0.5)
        stop.set()
        worker.join()
        assert counter > 10_000  # the interpreter was free while both vCPUs were in KVM_RUN
    finally:
        vm.close()
