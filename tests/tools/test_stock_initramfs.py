"""The stock-kernel initramfs, built without booting it (`make test`, a few seconds).

Synthetic kernel modules (real ELF64 files with a `.modinfo` section, as modpost writes
it) stand in for the Debian package: module dependencies and their load order, built-in
modules, missing and cyclic dependencies, modules.dep, the cpio contents and the /init
script (checked by a shell's parser, and for what it does in which order). The modules
of the real package are checked too when `make guest-linux` has cached them.
"""

from __future__ import annotations

import gzip
import re
import shutil
import stat
import struct
import subprocess
from pathlib import Path

import pytest

from isovisor.tools import guest_linux as gl
from isovisor.tools import initramfs as ir
from isovisor.tools import kernel_modules as km
from isovisor.vmm import host
from tests.guests.test_stock_linux_initramfs import pvm_skip_reason

RELEASE = "6.1.0-99-cloud-amd64"
# name -> (path under lib/modules/<release>, depends), shaped like Debian's cloud kernel
# (ext4 and its helpers built in; virtio-rng's file name has a dash).
FAKE_MODULES = {
    "virtio_ring": ("kernel/drivers/virtio/virtio_ring.ko", ""),
    "virtio": ("kernel/drivers/virtio/virtio.ko", "virtio_ring"),
    "virtio_mmio": ("kernel/drivers/virtio/virtio_mmio.ko", "virtio,virtio_ring"),
    "virtio_blk": ("kernel/drivers/block/virtio_blk.ko", "virtio,virtio_ring"),
    "failover": ("kernel/net/core/failover.ko", ""),
    "net_failover": ("kernel/drivers/net/net_failover.ko", "failover"),
    "virtio_net": ("kernel/drivers/net/virtio_net.ko", "virtio_ring,virtio,net_failover"),
    "virtio_rng": ("kernel/drivers/char/hw_random/virtio-rng.ko", "virtio,virtio_ring"),
    "virtio_balloon": ("kernel/drivers/virtio/virtio_balloon.ko", "virtio,virtio_ring"),
}
BUILTIN = ("kernel/fs/ext4/ext4.ko", "kernel/fs/jbd2/jbd2.ko", "kernel/fs/mbcache.ko")


def fake_ko(name: str, depends: str, extra: bytes = b"") -> bytes:
    """A minimal ELF64 relocatable with .shstrtab and .modinfo sections."""
    modinfo = b"license=GPL\0" + f"depends={depends}\0name={name}\0".encode() + extra
    shstrtab = b"\0.shstrtab\0.modinfo\0"
    data_off = 64
    str_off, info_off = data_off, data_off + len(shstrtab)
    shoff = info_off + len(modinfo)
    shoff += -shoff % 8
    ehdr = bytearray(64)
    ehdr[:16] = b"\x7fELF\x02\x01\x01" + bytes(9)
    struct.pack_into("<HHIQQQIHHHHHH", ehdr, 16, 1, 62, 1, 0, 0, shoff, 0, 64, 0, 0, 64, 3, 1)
    sections = bytes(64)  # SHN_UNDEF
    sections += struct.pack("<IIQQQQIIQQ", 1, 3, 0, 0, str_off, len(shstrtab), 0, 0, 1, 0)
    sections += struct.pack("<IIQQQQIIQQ", 11, 1, 2, 0, info_off, len(modinfo), 0, 0, 1, 0)
    body = bytes(ehdr) + shstrtab + modinfo
    return body + bytes(shoff - len(body)) + sections


def fake_tree(root: Path, modules: dict[str, tuple[str, str]] = FAKE_MODULES) -> Path:
    lib = root / "lib" / "modules" / RELEASE
    for name, (path, deps) in modules.items():
        (lib / path).parent.mkdir(parents=True, exist_ok=True)
        (lib / path).write_bytes(fake_ko(name, deps))
    (lib / "modules.builtin").write_text("".join(f"{p}\n" for p in BUILTIN))
    return lib


def fake_busybox(tmp_path: Path) -> Path:
    bb = tmp_path / "busybox"
    bb.write_bytes(b"\x7fELF" + b"fake busybox" * 10)
    return bb


# --- modinfo and the load order ----------------------------------------------------------


def test_modinfo_reads_the_depends_field() -> None:
    elf = fake_ko("virtio_net", "virtio_ring,virtio,net_failover")
    assert km.modinfo(elf)["name"] == ["virtio_net"]
    assert km.depends(elf) == ("virtio_ring", "virtio", "net_failover")
    assert km.depends(fake_ko("virtio_ring", "")) == ()


def test_modinfo_rejects_what_is_not_a_module() -> None:
    with pytest.raises(km.ModuleError, match="not an ELF"):
        km.modinfo(b"#!/bin/sh\n" + bytes(64))
    elf = bytearray(fake_ko("x", ""))
    elf[4] = 1  # ELFCLASS32
    with pytest.raises(km.ModuleError, match="64-bit"):
        km.modinfo(bytes(elf))
    elf = bytearray(fake_ko("x", ""))
    struct.pack_into("<Q", elf, 0x28, len(elf))  # section headers past the end
    with pytest.raises(km.ModuleError, match="out of bounds"):
        km.modinfo(bytes(elf))
    no_modinfo = fake_ko("x", "").replace(b".modinfo", b".comment")
    with pytest.raises(km.ModuleError, match=r"no \.modinfo"):
        km.modinfo(no_modinfo)


def test_load_order_puts_every_module_after_its_dependencies(tmp_path: Path) -> None:
    tree = km.ModuleTree.scan(fake_tree(tmp_path))
    order = km.load_order(tree, km.GUEST_MODULES)
    names = [m.name for m in order]
    # ext4 is built in (modules.builtin); virtio_balloon is not asked for
    assert names == ["virtio_ring", "virtio", "virtio_mmio", "virtio_blk", "failover",
                     "net_failover", "virtio_net", "virtio_rng"]
    for i, m in enumerate(order):
        assert set(m.depends) <= set(names[:i]), m
    assert order[-1].path == "kernel/drivers/char/hw_random/virtio-rng.ko"


def test_modules_dep_loads_back_to_front(tmp_path: Path) -> None:
    order = km.load_order(km.ModuleTree.scan(fake_tree(tmp_path)), km.GUEST_MODULES)
    lines = dict(line.split(":", 1) for line in km.modules_dep(order).splitlines())
    assert lines["kernel/drivers/virtio/virtio_ring.ko"] == ""
    net = lines["kernel/drivers/net/virtio_net.ko"].split()
    assert set(net) == {FAKE_MODULES[n][0] for n in
                        ("virtio_ring", "virtio", "net_failover", "failover")}
    # modprobe loads the list from its end: every module after its own dependencies
    loaded: list[str] = []
    by_path = {m.path: m for m in order}
    for path in reversed(net):
        assert all(FAKE_MODULES[d][0] in loaded for d in by_path[path].depends), path
        loaded.append(path)


def test_missing_and_cyclic_dependencies_are_clear_errors(tmp_path: Path) -> None:
    broken = dict(FAKE_MODULES)
    broken["virtio_blk"] = (FAKE_MODULES["virtio_blk"][0], "virtio,virtio_ring,blk_mq_virtio")
    tree = km.ModuleTree.scan(fake_tree(tmp_path / "a", broken))
    with pytest.raises(km.ModuleError, match=r"blk_mq_virtio \(needed by virtio_blk\)"):
        km.load_order(tree, km.GUEST_MODULES)
    cyclic = dict(FAKE_MODULES)
    cyclic["virtio_ring"] = (FAKE_MODULES["virtio_ring"][0], "virtio")
    tree = km.ModuleTree.scan(fake_tree(tmp_path / "b", cyclic))
    with pytest.raises(km.ModuleError, match="cycle: virtio -> virtio_ring -> virtio"):
        km.load_order(tree, km.GUEST_MODULES)
    no_rng = {k: v for k, v in FAKE_MODULES.items() if k != "virtio_rng"}
    tree = km.ModuleTree.scan(fake_tree(tmp_path / "c", no_rng))
    assert "virtio_rng" not in [m.name for m in km.load_order(tree, km.GUEST_MODULES)]
    no_blk = {k: v for k, v in FAKE_MODULES.items() if k != "virtio_blk"}
    tree = km.ModuleTree.scan(fake_tree(tmp_path / "d", no_blk))
    with pytest.raises(km.ModuleError, match="virtio_blk is neither"):
        km.load_order(tree, km.GUEST_MODULES)


# --- the archive and its /init -----------------------------------------------------------


def build(tmp_path: Path) -> tuple[dict[str, ir.Entry], list[str], list[str]]:
    out = tmp_path / "stock.cpio.gz"
    loaded = ir.build_stock_initramfs(out, fake_tree(tmp_path), RELEASE, fake_busybox(tmp_path))
    entries = ir.read_newc(gzip.decompress(out.read_bytes()))
    return {e.name: e for e in entries}, [e.name for e in entries], loaded


def test_archive_holds_the_modules_with_their_directories(tmp_path: Path) -> None:
    entries, names, loaded = build(tmp_path)
    root = f"lib/modules/{RELEASE}"
    for name in loaded:
        path = f"{root}/{FAKE_MODULES[name][0]}"
        assert entries[path].data == (fake_tree(tmp_path) / FAKE_MODULES[name][0]).read_bytes()
        # the kernel's unpacker does not create parents: each directory comes first
        parts = path.split("/")
        for i in range(1, len(parts)):
            d = "/".join(parts[:i])
            assert stat.S_ISDIR(entries[d].mode) and names.index(d) < names.index(path), d
    assert f"{root}/kernel/drivers/virtio/virtio_balloon.ko" not in entries  # not needed
    dep = entries[f"{root}/modules.dep"].data.decode()
    assert dep.startswith("kernel/drivers/virtio/virtio_ring.ko:\n")
    assert entries["bin/busybox"].data.startswith(b"\x7fELF")
    for applet in ("sh", "insmod", "mount", "umount", "mknod", "sleep", "reboot", "cat"):
        assert entries[f"bin/{applet}"].data == b"busybox", applet
    assert stat.S_ISDIR(entries["mnt"].mode) and entries["dev/console"].rdev == (5, 1)
    assert entries["init"].mode == stat.S_IFREG | 0o755 and names[-1] == "init"


def test_init_loads_in_order_then_uses_the_disk_and_resets(tmp_path: Path) -> None:
    entries, _names, loaded = build(tmp_path)
    init = entries["init"].data.decode()
    assert init.startswith("#!/bin/sh\n")
    loads = re.findall(r"^load (\S+) (\S+)$", init, re.MULTILINE)
    assert [n for n, _ in loads] == loaded
    assert [p for _, p in loads] == [f"/lib/modules/{RELEASE}/{FAKE_MODULES[n][0]}"
                                     for n in loaded]
    steps = [f"{ir.MARK} init running", "load virtio_ring", f"{ir.MARK} modules loaded",
             "mount -t ext4 /dev/vda /mnt", f"{ir.MARK} mounted /dev/vda",
             f"cat /mnt/{ir.DISK_MARKER}", f"> /mnt/{ir.GUEST_WROTE}", "umount /mnt",
             f"{ir.MARK} net ", f"{ir.MARK} done", "reboot -f"]
    at = [init.index(s) for s in steps]
    assert at == sorted(at), steps
    assert init.rstrip().endswith("\nreboot -f")


def test_init_is_valid_shell(tmp_path: Path) -> None:
    entries, _names, _loaded = build(tmp_path)
    script = tmp_path / "init"
    script.write_bytes(entries["init"].data)
    shells = [[s, "-n"] for s in ("sh", "dash") if shutil.which(s)]
    if ir.BUSYBOX.is_file():
        shells.append([str(ir.BUSYBOX), "sh", "-n"])
    assert shells, "no shell to check the script with"
    for argv in shells:
        res = subprocess.run([*argv, str(script)], capture_output=True, text=True, check=False)
        assert res.returncode == 0, (argv, res.stderr)


def test_odd_names_never_reach_the_script() -> None:
    with pytest.raises(ir.CpioError, match="not a plain path"):
        ir.stock_init_script(RELEASE, [("virtio", "kernel/x.ko; rm -rf /")])
    with pytest.raises(ir.CpioError, match="not a plain path"):
        ir.stock_init_script("6.1 $(reboot)", [])


def test_reproducible(tmp_path: Path) -> None:
    bb = fake_busybox(tmp_path)
    lib = fake_tree(tmp_path)
    ir.build_stock_initramfs(tmp_path / "a.gz", lib, RELEASE, bb)
    ir.build_stock_initramfs(tmp_path / "b.gz", lib, RELEASE, bb)
    assert (tmp_path / "a.gz").read_bytes() == (tmp_path / "b.gz").read_bytes()


# --- the cache in guest_linux ------------------------------------------------------------


def test_modules_are_cached_verified_and_built_into_the_initramfs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    kernel = gl.CachedKernel(RELEASE, cache / "vmlinuz", cache / "vmlinux",
                             f"linux-image-{RELEASE} 6.1.999-1")
    names = gl.cache_modules(fake_tree(tmp_path / "pkg"), cache / f"modules-{RELEASE}")
    assert names[:3] == ["virtio_ring", "virtio", "virtio_mmio"]

    def no_apt(*_a: object, **_k: object) -> Path:
        raise AssertionError("a verified cache must not download")

    monkeypatch.setattr(gl, "download", no_apt)
    log: list[str] = []
    initrd = gl.ensure_initramfs(cache, kernel, busybox=fake_busybox(tmp_path), log=log.append)
    assert initrd.modules == tuple(names)
    assert (cache / "initramfs.cpio.gz").resolve() == initrd.path
    assert any("verified" in line for line in log)
    ko = cache / f"modules-{RELEASE}" / FAKE_MODULES["virtio_blk"][0]
    ko.write_bytes(ko.read_bytes() + b"tampered")
    with pytest.raises(gl.GuestLinuxError, match="does not match"):
        gl.ensure_initramfs(cache, kernel, busybox=fake_busybox(tmp_path), log=log.append)


def test_missing_modules_are_fetched_from_the_kernels_own_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    kernel = gl.CachedKernel(RELEASE, cache / "vmlinuz", cache / "vmlinux",
                             f"linux-image-{RELEASE} 6.1.999-1")
    asked: list[tuple[str, str | None]] = []

    def fake_download(package: str, directory: Path, apt_options: object = (),
                      deb_name: str | None = None) -> Path:
        asked.append((package, deb_name))
        deb = directory / f"{deb_name}_6.1.999-1_amd64.deb"
        deb.write_bytes(b"deb")
        return deb

    def fake_run(argv: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        assert argv[:2] == ["dpkg-deb", "-x"]
        fake_tree(Path(argv[3]).parent / "pkgroot")
        shutil.copytree(Path(argv[3]).parent / "pkgroot", argv[3])
        return subprocess.CompletedProcess(argv, 0, "", "")

    monkeypatch.setattr(gl, "download", fake_download)
    monkeypatch.setattr(gl, "_run", fake_run)
    initrd = gl.ensure_initramfs(cache, kernel, busybox=fake_busybox(tmp_path),
                                 log=lambda _m: None)
    assert asked == [(f"linux-image-{RELEASE}=6.1.999-1", f"linux-image-{RELEASE}")]
    assert "virtio_mmio" in initrd.modules


def test_the_real_packages_modules_when_cached() -> None:
    cached = sorted(gl.DEFAULT_CACHE.glob("modules-*/SHA256SUMS"))
    if not cached:
        pytest.skip("`make guest-linux` has not cached the stock kernel's modules")
    root = cached[-1].parent
    order = km.load_order(km.ModuleTree.scan(root), km.GUEST_MODULES)
    names = [m.name for m in order]
    for first, then in (("virtio_ring", "virtio"), ("virtio", "virtio_mmio"),
                        ("virtio", "virtio_blk"), ("virtio", "virtio_net")):
        assert names.index(first) < names.index(then)
    info = km.modinfo(km.module_bytes(root / order[names.index("virtio_mmio")].path))
    assert any("LNRO0005" in a for a in info["alias"])  # found through our ACPI tables


def test_the_boot_test_skips_only_on_a_pvm_host() -> None:
    """tests/guests/test_stock_linux_initramfs.py decides from the detected host."""
    pvm = host.classify("flags\t: fpu sse2 hypervisor\n", pvm_module_loaded=True)
    hw = host.classify("flags\t: fpu vmx sse2\n", pvm_module_loaded=False)
    amd = host.classify("flags\t: fpu svm sse2\n", pvm_module_loaded=True)
    assert "PVM host" in (pvm_skip_reason(pvm) or "")
    assert pvm_skip_reason(hw) is None and pvm_skip_reason(amd) is None
