"""VM-level ioctls: memory slots, irqchip, PIT, IRQ lines, irqfd, ioeventfd."""

from __future__ import annotations

import os

from isovisor.kvm import constants as c
from isovisor.kvm import structs as s
from isovisor.kvm.ioctl import ioctl


class VmFd:
    """A KVM VM file descriptor (owned: closed by close())."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def check_extension(self, cap: int) -> int:
        return ioctl(self.fd, c.KVM_CHECK_EXTENSION, int(cap))

    def set_user_memory_region(
        self, slot: int, guest_phys_addr: int, size: int, userspace_addr: int, flags: int = 0
    ) -> None:
        region = s.kvm_userspace_memory_region(slot, flags, guest_phys_addr, size, userspace_addr)
        ioctl(self.fd, c.KVM_SET_USER_MEMORY_REGION, region)

    def set_tss_addr(self, addr: int) -> None:
        ioctl(self.fd, c.KVM_SET_TSS_ADDR, addr)

    def set_identity_map_addr(self, addr: int) -> None:
        value = s.u64(addr)
        ioctl(self.fd, c.KVM_SET_IDENTITY_MAP_ADDR, value)

    def create_irqchip(self) -> None:
        ioctl(self.fd, c.KVM_CREATE_IRQCHIP)

    def create_pit2(self, flags: int = c.KVM_PIT_SPEAKER_DUMMY) -> None:
        cfg = s.kvm_pit_config()
        cfg.flags = flags
        ioctl(self.fd, c.KVM_CREATE_PIT2, cfg)

    def get_pit2(self) -> s.kvm_pit_state2:
        st = s.kvm_pit_state2()
        ioctl(self.fd, c.KVM_GET_PIT2, st)
        return st

    def set_pit2(self, st: s.kvm_pit_state2) -> None:
        ioctl(self.fd, c.KVM_SET_PIT2, st)

    def get_irqchip(self, chip_id: int) -> s.kvm_irqchip:
        chip = s.kvm_irqchip()
        chip.chip_id = chip_id
        ioctl(self.fd, c.KVM_GET_IRQCHIP, chip)
        return chip

    def set_irqchip(self, chip: s.kvm_irqchip) -> None:
        ioctl(self.fd, c.KVM_SET_IRQCHIP, chip)

    def irq_line(self, irq: int, level: int) -> None:
        ioctl(self.fd, c.KVM_IRQ_LINE, s.kvm_irq_level(irq, level))

    def irqfd(self, eventfd: int, gsi: int, *, deassign: bool = False) -> None:
        req = s.kvm_irqfd()
        req.fd, req.gsi = eventfd, gsi
        req.flags = c.KVM_IRQFD_FLAG_DEASSIGN if deassign else 0
        ioctl(self.fd, c.KVM_IRQFD, req)

    def ioeventfd(
        self,
        eventfd: int,
        addr: int,
        length: int,
        *,
        pio: bool = False,
        datamatch: int | None = None,
        deassign: bool = False,
    ) -> None:
        req = s.kvm_ioeventfd()
        req.addr, req.len, req.fd = addr, length, eventfd
        flags = 0
        if pio:
            flags |= c.KVM_IOEVENTFD_FLAG_PIO
        if datamatch is not None:
            flags |= c.KVM_IOEVENTFD_FLAG_DATAMATCH
            req.datamatch = datamatch
        if deassign:
            flags |= c.KVM_IOEVENTFD_FLAG_DEASSIGN
        req.flags = flags
        ioctl(self.fd, c.KVM_IOEVENTFD, req)

    def enable_cap(self, cap: int, *args: int) -> None:
        req = s.kvm_enable_cap()
        req.cap = cap
        for i, a in enumerate(args):
            req.args[i] = a
        ioctl(self.fd, c.KVM_ENABLE_CAP, req)

    def create_vcpu(self, vcpu_id: int) -> int:
        return ioctl(self.fd, c.KVM_CREATE_VCPU, vcpu_id)
