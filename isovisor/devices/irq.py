"""Interrupt lines as devices see them: they never call ioctls themselves."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol


class InterruptLine(Protocol):
    """One interrupt input (an ISA IRQ / IOAPIC pin). `set(True)` raises it."""

    def set(self, level: bool) -> None: ...


class CallbackLine:
    """An InterruptLine that forwards level changes to a callable (the VM's irqchip)."""

    def __init__(self, irq: int, setter: Callable[[int, int], None]) -> None:
        self.irq = irq
        self._setter = setter
        self.level = False

    def set(self, level: bool) -> None:
        if level != self.level:
            self.level = level
            self._setter(self.irq, int(level))


class RecordingLine:
    """An InterruptLine that records its level changes (for device unit tests)."""

    def __init__(self) -> None:
        self.level = False
        self.history: list[bool] = []

    def set(self, level: bool) -> None:
        self.level = level
        self.history.append(level)
