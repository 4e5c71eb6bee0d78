"""Why a VM stopped, and the exit status `isovisor run` gives each reason."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class StopReason(enum.Enum):
    """Each stop reason has its own process exit status (documented in README.md)."""

    GUEST_RESET = 0  # i8042 reset (0xFE) or KVM_SYSTEM_EVENT_RESET
    TRIPLE_FAULT = 10  # KVM_EXIT_SHUTDOWN
    GUEST_SHUTDOWN = 11  # KVM_SYSTEM_EVENT_SHUTDOWN (power off)
    GUEST_CRASH = 12  # KVM_SYSTEM_EVENT_CRASH
    EMULATION_ERROR = 13  # KVM could not emulate an instruction / internal error
    HOST_REQUEST = 14  # stopped by the host (Ctrl-C, API, signal)
    VMM_ERROR = 15  # a fault inside the VMM itself (a bug: reported, contained)

    @property
    def exit_status(self) -> int:
        return int(self.value)


@dataclass(frozen=True)
class StopEvent:
    reason: StopReason
    vcpu: int | None
    detail: str

    def describe(self) -> str:
        who = f"vCPU {self.vcpu}: " if self.vcpu is not None else ""
        return f"{self.reason.name.lower().replace('_', ' ')}: {who}{self.detail}"
