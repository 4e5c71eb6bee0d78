"""Instruction assists (int3, fwait on PVM hosts): the decision from the exit's bytes or
guest memory through KVM_TRANSLATE, and its effect. Oracles: a refused assist changes
nothing; an accepted one matches the architecture (RIP + 1; #BP injected for int3 only;
fwait never past a pending x87 fault or CR0.TS+MP)."""

from __future__ import annotations

from fuzz import rig
from fuzz.data import Data
from fuzz.fakevcpu import FakeVcpuFd, fill_struct
from isovisor.kvm import constants as kc
from isovisor.vmm import assists

COVERS = ("assist:*",)


def one_input(data: bytes) -> None:
    d = Data(data)
    mem = rig.memory()
    fd = FakeVcpuFd()
    run = fd.kvm_run
    run.exit_reason = int(kc.ExitReason.INTERNAL_ERROR) if d.u8() < 0xF0 else d.u32()
    fill_struct(run.exit.emulation_failure, d.take(40))
    if d.flag():
        run.exit.internal.suberror = int(kc.InternalSuberror.EMULATION)
    fill_struct(fd.regs, d.take(144))
    fill_struct(fd.sregs, d.take(312))
    fd.sregs.cr0 = d.u64()
    fill_struct(fd.events, d.take(64))
    fd.fpu.fsw = d.u16()
    fd.translation_valid = d.flag()
    fd.translation_offset = d.u32() % rig.RAM
    mem.write_all(rig.BUF, d.take(32))
    enabled = frozenset(n for n, bit in (("int3", 1), ("fwait", 2)) if d.u8() & bit)
    rip = int(fd.regs.rip)
    name = assists.try_assist(fd, mem, enabled)  # type: ignore[arg-type]
    if name is None:
        assert fd.writes == [], f"a refused assist changed {fd.writes}"
        return
    assert name in enabled
    assert int(fd.regs.rip) != rip or rip in (0xFFFF, 0xFFFF_FFFF, (1 << 64) - 1)
    if name == "int3":
        assert fd.events.exception.injected == 1 and fd.events.exception.nr == 3
    else:
        assert "events" not in fd.writes
        assert not (fd.sregs.cr0 & assists.CR0_TS and fd.sregs.cr0 & assists.CR0_MP)
        assert not fd.fpu.fsw & assists.FSW_ES
    fd.close()
