"""Kernel modules from a Debian kernel package: which ones a guest needs, in load order.

Debian's kernel packages ship `lib/modules/<release>/kernel/**.ko` and `modules.builtin`
but no `modules.dep`: depmod writes it when the package is installed. The dependencies
are in each module itself: modpost records the modules whose symbols it uses in the
`depends=` field of its `.modinfo` ELF section (what `modinfo -F depends` prints, and what
depmod's symbol resolution agrees with). This module reads those fields, resolves the
closure of the modules a guest asks for (skipping the ones built into the kernel, which
`modules.builtin` lists) and orders it so that every module comes after all of its
dependencies, as `modprobe` would load them. `modules_dep` renders the result in
modules.dep's format (`path: dep dep ...`, loadable back to front) for the initramfs.
"""

from __future__ import annotations

import lzma
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

# The modules a guest needs to use isovisor's devices under Debian's stock kernel, which
# builds them as modules: the virtio core and ring, the virtio-mmio transport (found
# through our ACPI tables, LNRO0005), the block, network and entropy drivers. ext4 and
# its helpers are built into Debian's cloud kernel; they are listed so that a kernel that
# builds them as modules gets them too.
GUEST_MODULES = ("virtio_mmio", "virtio_blk", "virtio_net", "virtio_rng", "ext4")
# Modules whose absence is not an error when they are built in or not built at all.
OPTIONAL_MODULES = frozenset({"virtio_rng"})

_ELF_MAGIC = b"\x7fELF"
_XZ_MAGIC = b"\xfd7zXZ\x00"


class ModuleError(Exception):
    """A module is missing, malformed, or its dependencies cannot be ordered."""


@dataclass(frozen=True)
class Module:
    name: str  # normalized: "-" -> "_"
    path: str  # relative to lib/modules/<release>, e.g. kernel/drivers/virtio/virtio.ko
    depends: tuple[str, ...]


def normalize(name: str) -> str:
    return name.replace("-", "_")


def module_name(path: str) -> str:
    base = path.rsplit("/", 1)[-1]
    for suffix in (".ko.xz", ".ko"):
        if base.endswith(suffix):
            return normalize(base[: -len(suffix)])
    raise ModuleError(f"{path} is not a kernel module (.ko or .ko.xz)")


def module_bytes(path: Path) -> bytes:
    """The ELF image of a module file (.ko, or .ko.xz decompressed)."""
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        if not data.startswith(_XZ_MAGIC):
            raise ModuleError(f"{path} is not xz-compressed")
        data = lzma.decompress(data)
    return data


def modinfo(elf: bytes, where: str = "module") -> dict[str, list[str]]:
    """The key=value strings of an ELF64 little-endian module's `.modinfo` section."""
    if len(elf) < 64 or elf[:4] != _ELF_MAGIC:
        raise ModuleError(f"{where}: not an ELF file")
    if elf[4] != 2 or elf[5] != 1:
        raise ModuleError(f"{where}: not a 64-bit little-endian ELF")
    shoff, = struct.unpack_from("<Q", elf, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", elf, 0x3A)
    if shentsize != 64 or shoff + shnum * 64 > len(elf) or shstrndx >= shnum:
        raise ModuleError(f"{where}: section header table out of bounds")

    def section(i: int) -> tuple[int, int, int]:
        name, _type, _flags, _addr, offset, size = struct.unpack_from(
            "<IIQQQQ", elf, shoff + i * 64)
        if offset + size > len(elf):
            raise ModuleError(f"{where}: section {i} runs past the end of the file")
        return name, offset, size

    _n, str_off, str_size = section(shstrndx)
    names = elf[str_off : str_off + str_size]
    for i in range(shnum):
        name_off, offset, size = section(i)
        end = names.find(b"\0", name_off)
        if names[name_off:end] == b".modinfo":
            info: dict[str, list[str]] = {}
            for item in elf[offset : offset + size].split(b"\0"):
                key, sep, value = item.decode(errors="replace").partition("=")
                if sep:
                    info.setdefault(key, []).append(value)
            return info
    raise ModuleError(f"{where}: no .modinfo section")


def depends(elf: bytes, where: str = "module") -> tuple[str, ...]:
    fields = modinfo(elf, where).get("depends", [""])
    return tuple(normalize(d) for d in fields[0].split(",") if d)


@dataclass
class ModuleTree:
    """The modules of one kernel release: lib/modules/<release>/ of an unpacked package."""

    root: Path
    by_name: dict[str, str]  # name -> path relative to root
    builtin: frozenset[str]

    @classmethod
    def scan(cls, root: Path) -> ModuleTree:
        if not root.is_dir():
            raise ModuleError(f"{root} is not a directory of kernel modules")
        by_name: dict[str, str] = {}
        for p in sorted((root / "kernel").rglob("*.ko*")):
            rel = p.relative_to(root).as_posix()
            if rel.endswith((".ko", ".ko.xz")):
                by_name[module_name(rel)] = rel
        builtin_file = root / "modules.builtin"
        builtin = frozenset(
            module_name(line.strip()) for line in
            (builtin_file.read_text().splitlines() if builtin_file.is_file() else [])
            if line.strip()
        )
        return cls(root, by_name, builtin)

    def module(self, name: str) -> Module:
        rel = self.by_name[name]
        return Module(name, rel, depends(module_bytes(self.root / rel), rel))


def load_order(tree: ModuleTree, wanted: Iterable[str],
               optional: frozenset[str] = OPTIONAL_MODULES) -> list[Module]:
    """The closure of `wanted` that is not built in, each module after its dependencies
    (depth first, in the order asked for and listed: deterministic)."""
    order: list[Module] = []
    done: set[str] = set()
    visiting: list[str] = []

    def visit(name: str, needed_by: str | None) -> None:
        if name in done or name in tree.builtin:
            return
        if name in visiting:
            cycle = " -> ".join([*visiting[visiting.index(name):], name])
            raise ModuleError(f"module dependency cycle: {cycle}")
        if name not in tree.by_name:
            if needed_by is None and name in optional:
                return
            why = f" (needed by {needed_by})" if needed_by else ""
            raise ModuleError(f"module {name}{why} is neither in {tree.root} nor built in")
        visiting.append(name)
        mod = tree.module(name)
        for dep in mod.depends:
            visit(dep, name)
        visiting.pop()
        done.add(name)
        order.append(mod)

    for name in wanted:
        visit(normalize(name), None)
    return order


def modules_dep(order: Sequence[Module]) -> str:
    """modules.dep lines for `order`: each module's dependency closure listed so that
    loading it back to front (as modprobe does) loads every module after its own
    dependencies, which is how depmod orders it. Built-in dependencies are left out."""
    by_name = {m.name: m for m in order}
    lines = []
    for m in order:
        post: list[str] = []  # dependencies, each after its own (load order)
        for d in m.depends:
            _post_order(d, by_name, post)
        lines.append(f"{m.path}:" + "".join(f" {p}" for p in reversed(post)))
    return "\n".join(lines) + "\n"


def _post_order(name: str, by_name: dict[str, Module], out: list[str]) -> None:
    dep = by_name.get(name)
    if dep is None or dep.path in out:
        return  # built in, or listed already
    for d in dep.depends:
        _post_order(d, by_name, out)
    out.append(dep.path)
