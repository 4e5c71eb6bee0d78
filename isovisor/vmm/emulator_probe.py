"""Which instructions this host's KVM cannot execute in guest kernel mode (PVM hosts only).

On a PVM host guest ring-0 code is interpreted by KVM's x86 instruction emulator, which lacks
some instructions: KVM_RUN then stops with KVM_EXIT_INTERNAL_ERROR (suberror EMULATION). This
module measures, once per host boot, which CPUID features' instructions fail that way, so the
VMM can hide them from guests (CPUID masks, `clearcpuid=`) and enable the few assists it can
do itself (assists.py). On hardware-virtualization hosts nothing here runs.

How: one throw-away VM (16 MiB, no irqchip). For each probe a fresh vCPU (a fresh CPUID: KVM
refuses KVM_SET_CPUID2 after the first KVM_RUN) in 64-bit long mode, ring 0, identity paging,
RSI -> a 64-byte-aligned scratch buffer, runs `<probe instruction>; out 0x80, al`.

  * IO exit on DONE_PORT                  -> the instruction works
  * KVM_EXIT_INTERNAL_ERROR (emulation)   -> not emulable (masked)
  * an exception (IDT stub -> FAULT_PORT), a triple fault, a rejected CR4/XCR0, any other
    exit                                   -> not supported here (masked as well)

Bounded by construction (no watchdog needed): every probe is straight-line code, the rest of
the code page is HLT, every exception vector has a stub ending in HLT, there is no irqchip
(HLT exits to userspace), and each probe issues at most _MAX_RUNS KVM_RUNs.
"""

from __future__ import annotations

import contextlib
import ctypes
import enum
import json
import os
import platform
import stat
import struct
import tempfile
import time
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import isovisor
from isovisor.kvm import CpuidEntry, Kvm, KvmError, VcpuFd, VmFd
from isovisor.kvm.constants import (
    KVM_EXIT_IO_OUT,
    KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES,
    ExitReason,
    InternalSuberror,
)
from isovisor.kvm.ioctl import ioctl
from isovisor.memory import GuestMemory, layout
from isovisor.vmm import x86_setup
from isovisor.vmm.assists import ASSISTS as ASSISTS  # re-exported: what needs_assists holds
from isovisor.vmm.assists import MAX_INSN_LEN
from isovisor.vmm.cpu_features import FEATURES, with_dependents
from isovisor.vmm.host import HostInfo, HostKind, detect

# --- guest layout of the probe VM (below the EBDA and in the first 16 MiB) ----------------
PROBE_RAM_SIZE = 16 * layout.MiB
IDT_ADDR = 0x3000  # 32 gates x 16 bytes
STUBS_ADDR = 0x4000  # one 8-byte stub per exception vector
PML5_ADDR = 0x1_0000  # for the la57 probe: PML5[0] -> the identity PML4
CODE_ADDR = layout.HIGH_MEMORY_START
SCRATCH_ADDR = 0x20_0000  # 64-byte aligned (XSAVE) and 16-byte aligned (CMPXCHG16B)
SCRATCH_SIZE = 0x4000  # XSAVE with AVX-512 state needs ~2.7 KiB; rep movsb copies into +0x1000
STACK_TOP = 0x30_0000

DONE_PORT = 0x80  # `out 0x80, al` after the probed instruction: it ran
FAULT_PORT = 0x81  # the exception stubs: `mov al, vector; out 0x81, al; hlt`
OUT_DONE = bytes([0xE6, DONE_PORT])
OPCODE_HLT = 0xF4
EXCEPTION_VECTORS = 32
VECTOR_BP = 3
VECTOR_NAMES = {0: "#DE", 3: "#BP", 6: "#UD", 7: "#NM", 8: "#DF", 13: "#GP", 14: "#PF", 19: "#XM"}

# A probe needs one KVM_RUN; a few more tolerate EINTR from a signal. Never a loop.
_MAX_RUNS = 4

# --- architectural bits ------------------------------------------------------------------
CR4_OSFXSR = 1 << 9  # SSE instructions enabled
CR4_UMIP = 1 << 11
CR4_LA57 = 1 << 12  # 5-level paging
CR4_FSGSBASE = 1 << 16
CR4_OSXSAVE = 1 << 18
CR4_SMEP = 1 << 20
CR4_SMAP = 1 << 21
CR4_PKE = 1 << 22
XCR0_X87_SSE_AVX = 0x7
XCR0_AVX512 = 0xE7  # + opmask, ZMM_Hi256, Hi16_ZMM
PTE_PRESENT_RW = 0x3
IDT_GATE_INTERRUPT = 0x8E  # present, DPL 0, 64-bit interrupt gate

# KVM_SET_XCRS (linux/kvm.h): _IOW(KVMIO, 0xa7, struct kvm_xcrs); not in isovisor.kvm yet.
_KVM_MAX_XCRS = 16


class _kvm_xcr(ctypes.Structure):
    _fields_ = [("xcr", ctypes.c_uint32), ("reserved", ctypes.c_uint32), ("value", ctypes.c_uint64)]


class _kvm_xcrs(ctypes.Structure):
    _fields_ = [
        ("nr_xcrs", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("xcrs", _kvm_xcr * _KVM_MAX_XCRS),
        ("padding", ctypes.c_uint64 * 16),
    ]


_KVM_XCRS_SIZE = 392
if ctypes.sizeof(_kvm_xcrs) != _KVM_XCRS_SIZE:  # pragma: no cover - a layout bug
    raise ImportError("struct kvm_xcrs layout does not match the ABI")
_IOC_WRITE = 1
KVM_SET_XCRS = (_IOC_WRITE << 30) | (_KVM_XCRS_SIZE << 16) | (0xAE << 8) | 0xA7


class Outcome(enum.Enum):
    WORKS = "works"
    NOT_EMULABLE = "not emulable"
    NOT_SUPPORTED = "not supported"
    SKIPPED = "skipped"


@dataclass(frozen=True)
class EmulatorProbe:
    """What the probe found. Empty on hardware-virtualization hosts (nothing was run)."""

    unemulable: frozenset[str]  # cpu_features.FEATURES names to hide from guests
    needs_assists: frozenset[str]  # subset of ASSISTS
    details: tuple[tuple[str, str], ...] = ()  # (probe name, what happened), in probe order
    elapsed_s: float = 0.0
    probed: bool = False

    def detail(self, name: str) -> str | None:
        return dict(self.details).get(name)


_EMPTY = EmulatorProbe(frozenset(), frozenset())


@dataclass(frozen=True)
class _Probe:
    name: str  # a FEATURES name, or an ASSISTS name
    code: bytes  # the instruction(s) under test; OUT_DONE is appended
    cr4: int = 0
    cpuid: tuple[str, ...] = ()  # feature bits set in the guest's CPUID besides `name`
    requires: tuple[str, ...] = ()  # probes that must work first (else SKIPPED, masked)
    xcr0: int = 0  # set with KVM_SET_XCRS when non-zero
    la57: bool = False
    regs: dict[str, int] = field(default_factory=dict)


_XSAVE_CR4 = CR4_OSXSAVE | CR4_OSFXSR

# Encodings checked with objdump -M intel.
PROBES: tuple[_Probe, ...] = (
    _Probe("xsave", bytes.fromhex("0fae26"), _XSAVE_CR4),  # xsave [rsi], edx:eax = 1 (x87)
    _Probe("popcnt", bytes.fromhex("f30fb8c1")),  # popcnt eax, ecx
    _Probe("cx16", bytes.fromhex("480fc70e")),  # cmpxchg16b [rsi]
    _Probe("movbe", bytes.fromhex("0f38f006")),  # movbe eax, [rsi]
    _Probe("bmi1", bytes.fromhex("c4e260f2c1")),  # andn eax, ebx, ecx
    _Probe("bmi2", bytes.fromhex("c4e37bf0c103")),  # rorx eax, ecx, 3
    _Probe("adx", bytes.fromhex("660f38f6c1")),  # adcx eax, ecx
    _Probe("rdrand", bytes.fromhex("0fc7f0")),  # rdrand eax
    _Probe("rdseed", bytes.fromhex("0fc7f8")),  # rdseed eax
    _Probe("aes", bytes.fromhex("660f38dcc0"), CR4_OSFXSR),  # aesenc xmm0, xmm0
    _Probe("pclmulqdq", bytes.fromhex("660f3a44c000"), CR4_OSFXSR),  # pclmullqlqdq xmm0, xmm0
    _Probe("sha_ni", bytes.fromhex("0f38c9c0"), CR4_OSFXSR),  # sha1msg1 xmm0, xmm0
    _Probe("rdpid", bytes.fromhex("f30fc7f8")),  # rdpid rax
    _Probe("fsgsbase", bytes.fromhex("f3480faec0"), CR4_FSGSBASE),  # rdfsbase rax
    _Probe("erms", bytes.fromhex("f3a4")),  # rep movsb (rcx = 8, rsi -> rdi)
    _Probe("fsrm", bytes.fromhex("f3a4")),  # the same instruction, the short-copy hint
    _Probe("smep", bytes.fromhex("90"), CR4_SMEP),  # supervisor pages only: the bit is accepted
    _Probe("smap", bytes.fromhex("0f01cb0f01ca"), CR4_SMAP),  # stac; clac (every uaccess)
    _Probe("umip", bytes.fromhex("0f0106"), CR4_UMIP),  # sgdt [rsi] (allowed in ring 0)
    _Probe("pku", bytes.fromhex("0f01ee"), CR4_PKE, regs={"rcx": 0}),  # rdpkru
    _Probe("la57", bytes.fromhex("8b06"), CR4_LA57, la57=True),  # mov eax, [rsi] via 5 levels
    # XSAVE-dependent features: only meaningful when xsave itself works (XCR0 via ioctl).
    _Probe("xsaveopt", bytes.fromhex("0fae36"), _XSAVE_CR4, ("xsave",), ("xsave",)),
    _Probe("xsavec", bytes.fromhex("0fc726"), _XSAVE_CR4, ("xsave",), ("xsave",)),
    _Probe("xsaves", bytes.fromhex("0fc72e"), _XSAVE_CR4, ("xsave",), ("xsave",)),
    _Probe("avx", bytes.fromhex("c5fc57c0"), _XSAVE_CR4, ("xsave",), ("xsave",),
           XCR0_X87_SSE_AVX),  # vxorps ymm0, ymm0, ymm0
    _Probe("avx2", bytes.fromhex("c5fdefc0"), _XSAVE_CR4, ("xsave", "avx"), ("avx",),
           XCR0_X87_SSE_AVX),  # vpxor ymm0, ymm0, ymm0
    _Probe("fma", bytes.fromhex("c4e27998c0"), _XSAVE_CR4, ("xsave", "avx"), ("avx",),
           XCR0_X87_SSE_AVX),  # vfmadd132ps xmm0, xmm0, xmm0
    _Probe("f16c", bytes.fromhex("c4e27913c0"), _XSAVE_CR4, ("xsave", "avx"), ("avx",),
           XCR0_X87_SSE_AVX),  # vcvtph2ps xmm0, xmm0
    _Probe("avx512f", bytes.fromhex("62f17d48efc0"), _XSAVE_CR4, ("xsave", "avx"), ("avx",),
           XCR0_AVX512),  # vpxord zmm0, zmm0, zmm0
    # Assists: one-byte instructions the VMM can do itself when the emulator cannot.
    _Probe("int3", bytes.fromhex("cc")),  # works if the emulator delivers #BP to the stub
    _Probe("fwait", bytes.fromhex("9b")),
)

_DEFAULT_REGS = {"rax": 1, "rdx": 0, "rcx": 8, "rbx": 0, "rsi": SCRATCH_ADDR,
                 "rdi": SCRATCH_ADDR + 0x1000}
_MAX_DETAIL = 300  # characters kept per probe detail (and accepted from the cache)


# --- running probes -------------------------------------------------------------------------


def _write_fixed_tables(mem: GuestMemory) -> None:
    """GDT, identity page tables, PML5 for la57, an IDT whose gates report the vector."""
    x86_setup.write_gdt(mem)
    x86_setup.write_identity_page_tables(mem)
    mem.write_u64(PML5_ADDR, layout.PML4_ADDR | PTE_PRESENT_RW)
    gates = []
    for vector in range(EXCEPTION_VECTORS):
        stub = STUBS_ADDR + 8 * vector
        # mov al, vector; out FAULT_PORT, al; hlt
        mem.write_all(stub, bytes([0xB0, vector, 0xE6, FAULT_PORT, OPCODE_HLT]))
        gates.append(struct.pack(
            "<HHBBHII", stub & 0xFFFF, x86_setup.SEL_CODE64, 0, IDT_GATE_INTERRUPT,
            (stub >> 16) & 0xFFFF, stub >> 32, 0,
        ))
    mem.write_all(IDT_ADDR, b"".join(gates))


def _cpuid_with(base: list[CpuidEntry], names: tuple[str, ...]) -> list[CpuidEntry]:
    """`base` with the named feature bits set (the emulator checks guest CPUID for some)."""
    out = []
    for e in base:
        regs = {"eax": e.eax, "ebx": e.ebx, "ecx": e.ecx, "edx": e.edx}
        for name in names:
            bit = FEATURES.get(name)
            if bit is not None and bit.leaf == e.function and bit.subleaf == e.index:
                regs[bit.register] |= 1 << bit.bit
        out.append(CpuidEntry(e.function, e.index, e.flags, **regs))
    return out


def _set_xcr0(vcpu: VcpuFd, value: int) -> None:
    xcrs = _kvm_xcrs()
    xcrs.nr_xcrs = 1
    xcrs.xcrs[0].xcr = 0
    xcrs.xcrs[0].value = value
    # SAFETY: xcrs is a live struct kvm_xcrs of exactly the size encoded in KVM_SET_XCRS
    # (asserted above); the kernel only reads it during the call.
    ioctl(vcpu.fd, KVM_SET_XCRS, xcrs)


def _classify(probe: _Probe, vcpu: VcpuFd) -> tuple[Outcome, str]:
    run = vcpu.kvm_run
    for _ in range(_MAX_RUNS):
        if vcpu.run_once() == 0:
            break
    else:
        return Outcome.NOT_SUPPORTED, "KVM_RUN kept returning EINTR"
    reason = run.exit_reason
    if reason == ExitReason.IO and run.exit.io.direction == KVM_EXIT_IO_OUT:
        port = run.exit.io.port
        if port == DONE_PORT:
            return Outcome.WORKS, "works"
        if port == FAULT_PORT and run.exit.io.size == 1:
            # SAFETY: io_data checks offset + 1 against the kvm_run mapping.
            vector = vcpu.io_data(run.exit.io.data_offset, 1)[0]
            name = VECTOR_NAMES.get(vector, f"vector {vector}")
            if probe.name == "int3" and vector == VECTOR_BP:
                return Outcome.WORKS, "works (#BP delivered by KVM)"
            return Outcome.NOT_SUPPORTED, f"not supported: {name} raised"
    if reason == ExitReason.INTERNAL_ERROR:
        failure = run.exit.emulation_failure
        if failure.suberror == InternalSuberror.EMULATION:
            text = f"not emulable: emulation failure at rip {vcpu.get_regs().rip:#x}"
            size = int(failure.insn_size)
            if failure.flags & KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES and size > 0:
                # SAFETY: a copy out of the kvm_run page, bounded by the 15-byte array.
                text += f", bytes {bytes(failure.insn_bytes[: min(size, MAX_INSN_LEN)]).hex()}"
            return Outcome.NOT_EMULABLE, text
        return Outcome.NOT_SUPPORTED, f"not supported: internal error {failure.suberror}"
    try:
        name = ExitReason(reason).name
    except ValueError:
        name = str(reason)
    if reason == ExitReason.SHUTDOWN:
        return Outcome.NOT_SUPPORTED, "not supported: triple fault"
    return Outcome.NOT_SUPPORTED, f"not supported: unexpected exit {name}"


def _run_probe(
    probe: _Probe, vm: VmFd, kvm: Kvm, mem: GuestMemory, base: list[CpuidEntry], vcpu_id: int
) -> tuple[Outcome, str]:
    mem.fill(CODE_ADDR, layout.PAGE_SIZE, OPCODE_HLT)
    mem.write_all(CODE_ADDR, probe.code + OUT_DONE)
    mem.fill(SCRATCH_ADDR, SCRATCH_SIZE, 0)
    vcpu = VcpuFd(vm.create_vcpu(vcpu_id), kvm.vcpu_mmap_size)
    try:
        vcpu.set_cpuid2(_cpuid_with(base, (probe.name, *probe.cpuid)))
        sregs = vcpu.get_sregs()
        x86_setup.long_mode_sregs(sregs)
        sregs.idt.base = IDT_ADDR
        sregs.idt.limit = EXCEPTION_VECTORS * 16 - 1
        sregs.cr4 |= probe.cr4
        if probe.la57:
            sregs.cr3 = PML5_ADDR
        try:
            vcpu.set_sregs(sregs)
        except KvmError as exc:
            return Outcome.NOT_SUPPORTED, f"not supported: KVM refused CR4 {probe.cr4:#x}: {exc}"
        if probe.xcr0:
            try:
                _set_xcr0(vcpu, probe.xcr0)
            except KvmError as exc:
                return Outcome.NOT_SUPPORTED, f"not supported: XCR0 {probe.xcr0:#x}: {exc}"
        regs = x86_setup.entry_regs(CODE_ADDR, 0, "linux")
        for name, value in {**_DEFAULT_REGS, **probe.regs}.items():
            setattr(regs, name, value)
        regs.rsp = STACK_TOP
        vcpu.set_regs(regs)
        return _classify(probe, vcpu)
    finally:
        vcpu.close()


def _outcome(outcomes: dict[str, tuple[Outcome, str]], name: str) -> Outcome | None:
    return outcomes[name][0] if name in outcomes else None


def probe_emulator(
    kvm: Kvm, *, force: bool = False, host: HostInfo | None = None
) -> EmulatorProbe:
    """Run every probe in one throw-away VM; empty (nothing run) on HARDWARE hosts."""
    host = detect() if host is None else host
    if host.kind is HostKind.HARDWARE and not force:
        return _EMPTY
    start = time.perf_counter()
    outcomes: dict[str, tuple[Outcome, str]] = {}
    with GuestMemory(PROBE_RAM_SIZE, name="isovisor-emulator-probe") as mem:
        vm = VmFd(kvm.create_vm())
        try:
            vm.set_tss_addr(layout.KVM_TSS_ADDR)
            vm.set_identity_map_addr(layout.KVM_IDENTITY_MAP_ADDR)
            mem.register(vm)
            _write_fixed_tables(mem)
            base = kvm.supported_cpuid()
            for vcpu_id, probe in enumerate(PROBES):
                missing = [r for r in probe.requires if _outcome(outcomes, r) is not Outcome.WORKS]
                if missing:
                    outcomes[probe.name] = (Outcome.SKIPPED, f"skipped: needs {', '.join(missing)}")
                    continue
                outcomes[probe.name] = _run_probe(probe, vm, kvm, mem, base, vcpu_id)
        finally:
            vm.close()
    failed = {n for n, (o, _) in outcomes.items() if o is not Outcome.WORKS}
    return EmulatorProbe(
        unemulable=frozenset(with_dependents(failed & FEATURES.keys()) & FEATURES.keys()),
        needs_assists=frozenset(
            n for n in ASSISTS if _outcome(outcomes, n) is Outcome.NOT_EMULABLE
        ),
        details=tuple((n, d[:_MAX_DETAIL]) for n, (_, d) in outcomes.items()),
        elapsed_s=time.perf_counter() - start,
        probed=True,
    )


# --- the per-boot cache ---------------------------------------------------------------------

CACHE_NAME = "emulator-probe.json"
_CACHE_FORMAT = 1
_MAX_CACHE_BYTES = 64 * 1024  # the real file is ~3 KiB; anything bigger is not ours


def cache_key() -> dict[str, str]:
    """Host kernel release + boot id + isovisor version: the probe runs once per host boot."""
    try:
        boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot_id = "unknown"
    return {
        "kernel_release": platform.release(),
        "boot_id": boot_id,
        "isovisor_version": isovisor.__version__,
    }


def _safe_dir(path: Path, mode: int) -> bool:
    """Create `path` if needed; true if it is a real directory only root or we may write."""
    try:
        path.mkdir(mode=mode, parents=False, exist_ok=True)
        st = os.lstat(path)
    except OSError:
        return False
    return (
        stat.S_ISDIR(st.st_mode)
        and st.st_uid in (0, os.geteuid())
        and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
        and os.access(path, os.W_OK | os.X_OK)
    )


def default_cache_path() -> Path | None:
    """/run/isovisor, else $XDG_RUNTIME_DIR/isovisor, else a private temp dir; None if none."""
    candidates = [Path("/run/isovisor")]
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isabs(xdg):
        candidates.append(Path(xdg) / "isovisor")
    candidates.append(Path(tempfile.gettempdir()) / f"isovisor-{os.geteuid()}")
    for directory in candidates:
        if _safe_dir(directory, 0o755 if directory == candidates[0] else 0o700):
            return directory / CACHE_NAME
    return None


def _to_json(result: EmulatorProbe, key: dict[str, str]) -> str:
    return json.dumps({
        "format": _CACHE_FORMAT,
        "key": key,
        "unemulable": sorted(result.unemulable),
        "needs_assists": sorted(result.needs_assists),
        "details": [list(d) for d in result.details],
        "elapsed_s": result.elapsed_s,
    }, indent=1)


def _names_in(value: Any, known: Collection[str]) -> bool:
    return isinstance(value, list) and all(isinstance(n, str) and n in known for n in value)


def _from_json(text: str, key: dict[str, str]) -> EmulatorProbe | None:
    """The cached result if `text` is well-formed, ours and current; None otherwise."""
    try:
        doc: Any = json.loads(text)
    except ValueError:
        return None
    expected = {"format", "key", "unemulable", "needs_assists", "details", "elapsed_s"}
    if not isinstance(doc, dict) or set(doc) != expected:
        return None
    if doc["format"] != _CACHE_FORMAT or doc["key"] != key:
        return None
    names, assists, details = doc["unemulable"], doc["needs_assists"], doc["details"]
    if not _names_in(names, FEATURES.keys()) or not _names_in(assists, ASSISTS):
        return None
    known = FEATURES.keys() | ASSISTS
    if not isinstance(details, list) or not all(
        isinstance(d, list) and len(d) == 2 and d[0] in known
        and isinstance(d[1], str) and len(d[1]) <= _MAX_DETAIL
        for d in details
    ):
        return None
    elapsed = doc["elapsed_s"]
    if not isinstance(elapsed, (int, float)) or isinstance(elapsed, bool) or elapsed < 0:
        return None
    return EmulatorProbe(
        frozenset(names), frozenset(assists), tuple((d[0], d[1]) for d in details),
        float(elapsed), probed=True,
    )


def _read_cache(path: Path) -> str | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_uid not in (0, os.geteuid()):
            return None
        data = f.read(_MAX_CACHE_BYTES + 1)
    if len(data) > _MAX_CACHE_BYTES:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _write_cache(path: Path, text: str) -> None:
    """Atomic replace; a failure to cache is not a failure to probe."""
    with contextlib.suppress(OSError):
        fd, tmp = tempfile.mkstemp(prefix=".probe-", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise


def cached_probe(
    kvm: Kvm, *, path: Path | None = None, host: HostInfo | None = None
) -> EmulatorProbe:
    """probe_emulator, run once per host boot: the result is kept as JSON at `path`."""
    host = detect() if host is None else host
    if host.kind is HostKind.HARDWARE:
        return _EMPTY
    path = default_cache_path() if path is None else path
    key = cache_key()
    if path is not None:
        text = _read_cache(path)
        cached = _from_json(text, key) if text is not None else None
        if cached is not None:
            return cached
    result = probe_emulator(kvm, host=host)
    if path is not None:
        _write_cache(path, _to_json(result, key))
    return result


def describe(result: EmulatorProbe) -> Iterator[str]:
    """Human-readable lines, for logs and `isovisor host info`-style output."""
    yield f"unemulable: {' '.join(sorted(result.unemulable)) or '(none)'}"
    yield f"assists: {' '.join(sorted(result.needs_assists)) or '(none)'}"
    for name, text in result.details:
        yield f"  {name}: {text}"
