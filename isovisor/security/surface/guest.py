"""Inventory entries a guest reaches through the machine: port I/O and MMIO registrations,
virtio device types (features, queues, config space), the split virtqueue, ACPI tables.
Everything here is read off a surface-mode machine (machine.py), so it is what the
builder really wires."""

from __future__ import annotations

import ast
import inspect
import struct
import sys
import textwrap
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from isovisor.devices.bus import BusRange
from isovisor.devices.virtio import constants as vc
from isovisor.devices.virtio.device import VirtioDevice
from isovisor.devices.virtio.mmio import VirtioMmioTransport
from isovisor.security.surface.astscan import attribute_refs, qualname
from isovisor.security.surface.machine import SurfaceMachine
from isovisor.security.surface.model import GUEST_VMM, Entry, details, hexa

_MMIO_MODULE = "isovisor.devices.virtio.mmio"


def _base_name(name: str) -> str:
    """Registration names carry their address ("virtio-blk@0xd0001000"): the id does not."""
    return name.split("@", 1)[0]


def _irqs_of(device: object, machine: SurfaceMachine) -> list[int]:
    """The interrupt lines the device model holds (the builder hands each its own)."""
    lines = {id(line): irq for irq, line in machine.vm.irq_lines.items()}
    held = vars(device).values() if hasattr(device, "__dict__") else ()
    return sorted({lines[id(v)] for v in held if id(v) in lines})


def pio_entries(machine: SurfaceMachine) -> list[Entry]:
    out = []
    for r in machine.vm.pio.ranges():
        out.append(Entry(
            id=f"pio:{r.name}", boundary=GUEST_VMM, source=qualname(type(r.device)),
            details=details(ports=[hexa(r.base), hexa(r.end - 1)], length=r.length,
                            irqs=_irqs_of(r.device, machine) or None),
        ))
    return out


def transport_registers() -> dict[str, str]:
    """virtio-mmio registers the transport's code handles: name -> offset."""
    regs: dict[str, str] = {}
    for ref in attribute_refs(_MMIO_MODULE, "c"):
        value = getattr(vc, ref.dotted, None)
        if ref.dotted.startswith("MMIO_") and isinstance(value, int) \
                and value % 4 == 0 and value <= vc.MMIO_CONFIG:
            regs[ref.dotted[5:].lower()] = hexa(value)
    return dict(sorted(regs.items(), key=lambda kv: int(kv[1], 16)))


def mmio_entries(machine: SurfaceMachine) -> list[Entry]:
    groups: dict[str, list[BusRange]] = defaultdict(list)
    for r in machine.vm.mmio.ranges():
        groups[_base_name(r.name)].append(r)
    registers = transport_registers()
    out = []
    for name, ranges in groups.items():
        windows = []
        for r in ranges:
            dev = r.device
            window: dict[str, Any] = {"base": hexa(r.base), "size": hexa(r.length)}
            if isinstance(dev, VirtioMmioTransport):
                window["gsi"] = dev.gsi
                window["notify_ioeventfds"] = sorted(
                    e.datamatch for e in machine.vm.ioeventfds
                    if r.base <= e.addr < r.end and e.datamatch is not None)
            windows.append(window)
        dev0 = ranges[0].device
        virtio = isinstance(dev0, VirtioMmioTransport)
        out.append(Entry(
            id=f"mmio:{name}", boundary=GUEST_VMM, source=qualname(type(dev0)),
            details=details(windows=windows,
                            registers=registers if virtio else None,
                            config_offset=hexa(vc.MMIO_CONFIG) if virtio else None),
        ))
    return out


def _bit_names(module_globals: dict[str, Any], prefix: str = "F_") -> dict[int, str]:
    names: dict[int, str] = {}
    for k, v in sorted(module_globals.items()):
        if k.startswith(prefix) and isinstance(v, int) and v > 0 and v & (v - 1) == 0:
            names.setdefault(v.bit_length() - 1, k[len(prefix):])
    return names


def _feature_list(bits: int, device_names: dict[int, str]) -> list[str]:
    transport = _bit_names(vars(vc))
    out = []
    for b in range(bits.bit_length()):
        if bits >> b & 1:
            # §6: bits 24..40 are the transport's/ring's; the rest belong to the device.
            table = transport if 24 <= b <= 40 else device_names
            out.append(f"{b}:{table.get(b, '?')}")
    return out


def _device_type_name(device_type: int) -> str:
    for k, v in vars(vc).items():
        if k.startswith("DEVICE_ID_") and v == device_type:
            return k[len("DEVICE_ID_"):].lower()
    return "?"


def _config_format(cls: type[VirtioDevice]) -> str | None:
    """The struct format config_space() packs with, read from its source."""
    fn = cls.config_space
    if fn is VirtioDevice.config_space:
        return None
    module = sys.modules[cls.__module__]
    tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and node.func.attr == "pack":
            target = node.func.value
            if isinstance(target, ast.Name) and target.id == "struct" and node.args and \
                    isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                return node.args[0].value
            if isinstance(target, ast.Name):
                obj = getattr(module, target.id, None)
                if isinstance(obj, struct.Struct):
                    return obj.format
    return None


def _config_writable(dev: VirtioDevice) -> list[int]:
    """Offsets a driver write changes (probed byte by byte on a throwaway device)."""
    if type(dev).config_write is VirtioDevice.config_write:
        return []
    base = dev.config_space()
    changed = []
    for off in range(len(base)):
        dev.write_config(off, bytes([base[off] ^ 0xFF]))
        if dev.config_space() != base:
            changed.append(off)
            dev.write_config(off, bytes([base[off]]))
    return changed


def virtio_entries(devices: Iterable[VirtioDevice]) -> list[Entry]:
    by_class: dict[type[VirtioDevice], list[VirtioDevice]] = defaultdict(list)
    for d in devices:
        by_class[type(d)].append(d)
    out = []
    for cls, instances in by_class.items():
        names = _bit_names(vars(sys.modules[cls.__module__]))
        variants = sorted({d.avail_features for d in instances})
        union = 0
        for v in variants:
            union |= v
        config = instances[0].config_space()
        out.append(Entry(
            id=f"virtio:{cls.name}", boundary=GUEST_VMM, source=qualname(cls),
            details=details(
                device_type=cls.device_type,
                device_type_name=_device_type_name(cls.device_type),
                queues=list(cls.queue_max_sizes),
                features_offered=_feature_list(union, names),
                feature_variants=[_feature_list(v, names) for v in variants]
                if len(variants) > 1 else None,
                config_size=len(config),
                config_format=_config_format(cls),
                config_writable=_config_writable(instances[0]),
                request_handler=qualname(cls.process_queue),
            ),
        ))
    return out


def virtqueue_entry() -> Entry:
    from isovisor.devices.virtio.chain import DescriptorChain
    from isovisor.devices.virtio.queue import Virtqueue, check_layout

    return Entry(
        id="virtqueue:split", boundary=GUEST_VMM, source=qualname(Virtqueue),
        details=details(
            ring_features=_feature_list(vc.TRANSPORT_FEATURES, {}),
            max_queue_size=vc.MAX_QUEUE_SIZE,
            max_chain_bytes=hexa(vc.MAX_CHAIN_BYTES),
            descriptor_size=vc.DESC_SIZE,
            walker=qualname(DescriptorChain),
            setup_check=qualname(check_layout),
        ),
    )


def acpi_entry(machine: SurfaceMachine) -> Entry:
    """The tables the guest parses, as written into its RAM by the builder."""
    from isovisor.vmm.acpi import write_acpi_tables

    mem = machine.vm.mem
    rsdp = machine.machine.rsdp
    xsdt = mem.read_u64(rsdp + 24)
    xsdt_len = mem.read_u32(xsdt + 4)
    tables = [("RSD PTR ", rsdp, 36), ("XSDT", xsdt, xsdt_len)]
    pointers = [mem.read_u64(xsdt + 36 + 8 * i) for i in range((xsdt_len - 36) // 8)]
    for addr in pointers:
        tables.append((mem.read_exact(addr, 4).decode("ascii", "replace"), addr,
                       mem.read_u32(addr + 4)))
        if tables[-1][0] == "FACP":
            dsdt = mem.read_u64(addr + 140)
            tables.append(("DSDT", dsdt, mem.read_u32(dsdt + 4)))
    return Entry(
        id="acpi:tables", boundary=GUEST_VMM, source=qualname(write_acpi_tables),
        details=details(tables=[{"signature": sig.strip(), "addr": hexa(a), "length": n}
                                for sig, a, n in sorted(tables, key=lambda t: t[1])]),
    )


def machine_entries(machine: SurfaceMachine) -> list[Entry]:
    devices = [t.device for t in machine.machine.virtio]
    return [*pio_entries(machine), *mmio_entries(machine), *virtio_entries(devices),
            virtqueue_entry(), acpi_entry(machine)]
