"""Inventory entries of the VMM core: the KVM exits the vCPU loop handles, the
instruction assists, and the boot-image loaders (read from their code)."""

from __future__ import annotations

import importlib
import inspect
from collections import defaultdict

from isovisor.kvm import constants as kc
from isovisor.security.surface.astscan import attribute_refs, calls_in, qualname
from isovisor.security.surface.model import CLIENT_API, GUEST_VMM, Entry, details, hexa

VCPU_MODULE = "isovisor.vmm.vcpu"
LOADER_MODULE = "isovisor.vmm.boot.loader"
ENTRY_POINT = "load_kernel"


def exit_entries() -> list[Entry]:
    """One entry per KVM exit reason the vCPU loop names, plus one for all the others
    (which stop the VM)."""
    where: dict[str, set[str]] = defaultdict(set)
    for ref in attribute_refs(VCPU_MODULE, "c.ExitReason"):
        where[ref.dotted].add(ref.function)
    events = sorted({r.dotted for r in attribute_refs(VCPU_MODULE, "c.SystemEvent")})
    suberrors = sorted({r.dotted for r in attribute_refs(VCPU_MODULE, "c.InternalSuberror")})
    out = []
    for name, functions in where.items():
        reason = kc.ExitReason[name]
        extra: dict[str, object] = {}
        if reason is kc.ExitReason.SYSTEM_EVENT:
            extra["system_events"] = events
        if reason is kc.ExitReason.INTERNAL_ERROR:
            extra["suberrors"] = suberrors
        out.append(Entry(
            id=f"exit:{name.lower()}", boundary=GUEST_VMM, source=VCPU_MODULE + ".Vcpu",
            details=details(value=int(reason), handlers=sorted(functions), **extra),
        ))
    rest = sorted(r.name for r in kc.ExitReason if r.name not in where)
    out.append(Entry(
        id="exit:unhandled", boundary=GUEST_VMM, source=VCPU_MODULE + ".Vcpu._other_exit",
        details=details(reasons=rest, action="stop the VM (emulation error)"),
    ))
    return out


def assist_entries() -> list[Entry]:
    from isovisor.vmm import assists

    out = []
    for name in sorted(assists.ASSISTS):
        opcode = getattr(assists, f"OPCODE_{name.upper()}", None)
        out.append(Entry(
            id=f"assist:{name}", boundary=GUEST_VMM, source=qualname(assists.try_assist),
            details=details(opcode=hexa(opcode) if isinstance(opcode, int) else None,
                            hosts="PVM only (emulator_probe.needs_assists)"),
        ))
    return out


def boot_entries() -> list[Entry]:
    """One entry per loader load_kernel dispatches to. Kernel images and initrds come
    from tenants (the images API), so the boundary is client/api: they are parsed in the
    VMM before any guest code runs."""
    from isovisor.vmm import builder

    loader = importlib.import_module(LOADER_MODULE)
    shared = [n for n in calls_in(LOADER_MODULE, ENTRY_POINT)
              if not n.startswith("load_") and inspect.isfunction(getattr(loader, n, None))
              and getattr(getattr(loader, n), "__module__", "").startswith("isovisor.vmm.boot")]
    out = []
    for name in calls_in(LOADER_MODULE, ENTRY_POINT):
        fn = getattr(loader, name, None)
        if not name.startswith("load_") or fn is None:
            continue
        params = [p for p in inspect.signature(fn).parameters if p not in ("mem",)]
        out.append(Entry(
            id=f"boot:{name[len('load_'):]}", boundary=CLIENT_API, source=qualname(fn),
            details=details(
                inputs=params, dispatch=qualname(getattr(loader, ENTRY_POINT)),
                shared_parsers=[qualname(getattr(loader, n)) for n in shared],
                max_kernel_bytes=builder.MAX_KERNEL_BYTES,
                max_initrd_bytes=builder.MAX_INITRD_BYTES,
            ),
        ))
    return out


def vmm_entries() -> list[Entry]:
    return [*exit_entries(), *assist_entries(), *boot_entries()]
