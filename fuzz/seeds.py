"""Writes the seed corpora: `python -m fuzz.seeds` (deterministic; the output is checked
in under fuzz/corpus/<harness>/). Seeds reach the deep paths (a driver that completes
device initialisation, well-formed requests) and sit on the bounds the mutation check
weakens (the last sector, the end of RAM, a descriptor loop, a queue size of 3...)."""

from __future__ import annotations

import hashlib
import json
import struct
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from fuzz.data import Writer
from fuzz.rig import BUF, RAM, Desc, ring_seed
from isovisor.devices.virtio import constants as vc

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "fuzz" / "corpus"
W = vc.DESC_F_WRITE
N = vc.DESC_F_NEXT
SEEDS: dict[str, Callable[[], Iterator[bytes]]] = {}


def seeds(fn: Callable[[], Iterator[bytes]]) -> Callable[[], Iterator[bytes]]:
    SEEDS[fn.__name__] = fn
    return fn


def op(w: Writer, write: bool, offset: int, data: bytes = b"", size_index: int = 0) -> Writer:
    """One traffic.run op on the first device (size index into traffic.SIZES)."""
    return w.u8(1 if write else 0).u8(offset).u8(size_index).raw(data)


@seeds
def uart() -> Iterator[bytes]:
    w = Writer()
    op(w, True, 2, b"\x07")  # FIFO on
    op(w, True, 1, b"\x0f")  # all interrupts
    for c in b"hi\n":
        op(w, True, 0, bytes([c]))
    w.u8(7).blob(b"A" * 200)  # host input past the (64-byte) limit
    for reg in (5, 2, 0, 0, 6):
        op(w, False, reg)
    op(w, True, 3, b"\x80")  # DLAB
    op(w, True, 0, b"\x01")
    op(w, False, 1)
    op(w, True, 4, b"\x10")  # loopback
    op(w, True, 0, b"x")
    op(w, False, 0)
    yield w.bytes()
    yield Writer().u8(7).blob(b"B" * 63).u8(7).blob(b"C" * 2).bytes()


@seeds
def i8042() -> Iterator[bytes]:
    w = Writer()
    for cmd in (0xAA, 0x20, 0x60, 0xD1, 0xD4, 0xFE):
        w.u8(9).u8(0).u8(0).raw(bytes([cmd]))  # device 1 (command port), write
        w.u8(0).u8(0).u8(0)  # read data
    yield w.bytes()


@seeds
def rtc() -> Iterator[bytes]:
    w = Writer().u8(1)
    for index in (0x0A, 0x0B, 0x00, 0x04, 0x32, 0x7F, 0x80):
        op(w, True, 0, bytes([index]))
        op(w, False, 1)
        op(w, True, 1, b"\x86")
    yield w.bytes()


def _walk_seed(descs: list[Desc], heads: list[int], blob: bytes = b"", feats: int = 3,
               size_log: int = 8) -> bytes:
    w = Writer().u8(1).u8(feats)  # mode: walk; features: event_idx + indirect
    return ring_seed(w, size_log, descs, heads, blob).bytes()


@seeds
def virtqueue() -> Iterator[bytes]:
    yield _walk_seed([Desc(0, 16, N, 1), Desc(0x100, 512, N, 2), Desc(0x400, 1, W)], [0])
    yield _walk_seed([Desc(0, 16, N, 0)], [0])  # a loop: the hop budget must end it
    table = b"".join(struct.pack("<QIHH", BUF + 0x1000 + 64 * i, 64, N if i < 3 else W, i + 1)
                     for i in range(4))
    yield _walk_seed([Desc(0, len(table), vc.DESC_F_INDIRECT)], [0], table)
    # A buffer running 8 bytes past the end of RAM.
    yield _walk_seed([Desc(RAM - 8, 16, 0, raw_addr=True)], [0])
    yield _walk_seed([Desc(RAM - 16, 16, 0, raw_addr=True)], [0])
    # Setup checks: sizes 3 and 512, and rings ending exactly at / past the end of RAM.
    for size in (3, 512, 256):
        yield Writer().u8(0).u16(size).u64(0x1000).u64(0x4000).u64(0x8000).u8(0).bytes()
    yield Writer().u8(0).u16(256).u64(0).u64(0).u64(0).u8(1).u16(4096).u16(0x1000)\
        .u16(2054).bytes()


def _device(features: int, target: int, ring: Callable[[Writer], Writer],
            prefix: bytes = b"") -> bytes:
    return ring(Writer().raw(prefix).u64(features).u8(target)).bytes()


@seeds
def virtio_rng() -> Iterator[bytes]:
    yield _device(~0, 0, lambda w: ring_seed(w, 8, [Desc(0, 64, W | N, 1), Desc(64, 4000, W)],
                                             [0], b""))
    yield _device(0, 0, lambda w: ring_seed(w, 4, [Desc(0, 8, 0)], [0, 0], b""))


def _blk_chain(rtype: int, sector: int, data_len: int, data_writable: bool) -> tuple[
        list[Desc], bytes]:
    header = struct.pack("<IIQ", rtype, 0, sector)
    descs = [Desc(0, 16, N, 1)]
    if data_len:
        descs.append(Desc(0x1000, data_len, N | (W if data_writable else 0), 2))
    descs.append(Desc(0x100, 1, W, 0))
    if not data_len:
        descs[0].next = 1
        descs[1] = Desc(0x100, 1, W, 0)
    return descs, header


@seeds
def virtio_blk() -> Iterator[bytes]:
    from fuzz.harnesses.virtio_blk import CAPACITY

    for rtype, sector, n, wr in ((0, 0, 4096, True), (1, CAPACITY - 2, 1024, False),
                                 (1, CAPACITY - 1, 1024, False), (0, CAPACITY, 512, True),
                                 (4, 0, 0, False), (8, 0, 20, True)):
        descs, header = _blk_chain(rtype, sector, n, wr)
        yield _device(~0, 0, lambda w, d=descs, h=header: ring_seed(w, 8, d, [0], h),
                      prefix=b"\x01")
    # The parser directly: descriptors, then limits, then the header.
    for rtype, sector, length in ((1, CAPACITY - 1, 1024), (0, CAPACITY - 2, 1024),
                                  (11, CAPACITY - 8, 16), (1, (1 << 55), 512)):
        w = Writer().u8(0).u8(3)
        for addr, n, writable in ((0, 16, 0), (0x1000, length, 0 if rtype else 1),
                                  (0x100, 1, 1)):
            w.u16(addr).u8(0).u16(n).u8(writable)
        w.u8(0).u8(1).u8(1).raw(struct.pack("<IIQ", rtype, 0, sector))
        w.raw(struct.pack("<QII", CAPACITY - 4, 8, 0))
        yield w.bytes()


@seeds
def virtio_net() -> Iterator[bytes]:
    from isovisor.devices.virtio.net import RX_QUEUE, TX_QUEUE
    from isovisor.devices.virtio.net_header import HEADER_SIZE

    frame = bytes(12) + b"\x08\x00" + bytes(46)
    for n in (60, 8, 14, 0):  # header-only checks: frame lengths around the bounds
        yield Writer().u8(0).u32(0).raw(bytes(HEADER_SIZE)).u8(0).u8(n).bytes()
    tx = [Desc(0, HEADER_SIZE, N, 1), Desc(0x100, len(frame), 0)]
    yield _device(~0, TX_QUEUE, lambda w: ring_seed(w, 8, tx, [0], bytes(HEADER_SIZE)),
                  prefix=Writer().u8(1).u8(0).bytes())
    runt = [Desc(0, HEADER_SIZE, N, 1), Desc(0x100, 8, 0)]  # an 8-byte "frame"
    yield _device(~0, TX_QUEUE, lambda w: ring_seed(w, 8, runt, [0], bytes(HEADER_SIZE)),
                  prefix=Writer().u8(1).u8(0).bytes())
    rx = [Desc(0x1000 * i, 2048, W) for i in range(4)]
    hdr = bytes(HEADER_SIZE)
    pre = Writer().u8(1).u8(2).blob(hdr + frame).blob(hdr + frame * 60).bytes()
    yield _device(~0, RX_QUEUE, lambda w: ring_seed(w, 8, rx, [0, 1, 2, 3], b""), prefix=pre)


@seeds
def virtio_vsock() -> Iterator[bytes]:
    from isovisor.devices.virtio.vsock.packet import HDR_SIZE, Op

    def hdr(op: int, length: int = 0, flags: int = 0) -> bytes:
        return struct.pack("<QQIIIHHIII", 3, 2, 1024, 5000, length, 1, op, flags, 65536, 0)

    assert len(hdr(1)) == HDR_SIZE
    yield Writer().u8(0).u32(0).raw(hdr(int(Op.REQUEST))).bytes()
    yield Writer().u8(0).u32(100).raw(hdr(int(Op.RW), 100)).bytes()
    yield Writer().u8(0).u32(50).raw(hdr(int(Op.RW), 100)).bytes()  # len past the buffers
    tx = [Desc(0, HDR_SIZE + 16, 0)]
    for o in (Op.REQUEST, Op.RW, Op.SHUTDOWN, Op.RST, Op.CREDIT_REQUEST):
        yield _device(~0, 1, lambda w, o=o: ring_seed(w, 8, tx, [0],
                                                       hdr(int(o), 16 if o is Op.RW else 0)),
                      prefix=b"\x01")


@seeds
def virtio_mmio() -> Iterator[bytes]:
    from isovisor.security.surface.guest import transport_registers

    names = list(transport_registers())
    r = {n: i for i, n in enumerate(names)}
    values = (0, 1, 2, 3, 4, 7, 0xB, 0xF, 0x40, 0x80, 0xFF, 256, 0xFFFF_FFFF)

    def wv(w: Writer, reg: str, value: int) -> None:
        raw = bytes([1, values.index(value), 1, 0]) if value in values and value & 1 else \
            (value % 0x100_0000).to_bytes(4, "little")
        w.u8(1).u8(r[reg]).u8(2).raw(raw)  # write, 4 bytes (SIZES[2])

    def rd(w: Writer, reg: str) -> None:
        w.u8(0).u8(r[reg]).u8(2)

    for transport in range(5):
        w = Writer().u8(transport)
        for reg in ("magic_value", "version", "device_id", "device_features"):
            rd(w, reg)
        wv(w, "status", 1)
        wv(w, "status", 3)
        wv(w, "driver_features_sel", 1)
        wv(w, "driver_features", 1)
        wv(w, "status", 0xB)
        rd(w, "status")
        wv(w, "queue_sel", 0)
        rd(w, "queue_num_max")
        wv(w, "queue_num", 256)
        wv(w, "queue_desc_low", 0x10_0000)
        wv(w, "queue_driver_low", 0x11_0000)
        wv(w, "queue_device_low", 0x12_0000)
        wv(w, "queue_ready", 1)
        wv(w, "status", 0xF)
        wv(w, "queue_notify", 0)
        rd(w, "interrupt_status")
        rd(w, "config_generation")
        w.u8(0).u8(0xD0).u8(0).u8(0).u8(0xD0).u8(2)  # config reads (byte, then word)
        wv(w, "status", 0)
        yield w.bytes()


@seeds
def vcpu_loop() -> Iterator[bytes]:
    w = Writer()
    for c in b"ok\n":  # out 0x3f8 (COM1 is the 4th port range: 0x60, 0x64, 0x70, 0x3f8)
        w.u8(0).u8(1).u8(0).u8(1).u8(3).u8(0).u8(0)
        del c
    w.u8(0).u8(0).u8(0).u8(1).u8(3).u8(5).u8(0)  # in LSR
    w.u8(0).u8(1).u8(0).u8(1).u8(3).u8(0).u8(0xC0).u16(15)  # rep outs, 16 bytes
    w.u8(3).u8(1).u8(0).u16(0).u8(2).u8(0).raw(bytes(8))  # MMIO read: virtio magic
    w.u8(3).u8(1).u8(0).u16(0x70).u8(2).u8(1).raw(b"\x01" + bytes(7))  # status write
    w.u8(6).u8(7).u8(8).u8(9).u8(10).u8(11)
    yield w.bytes()
    yield Writer().u8(9).u8(1).bytes()  # system event: reset
    yield Writer().u8(8).raw(bytes(40)).bytes()  # internal error


@seeds
def assists() -> Iterator[bytes]:
    from isovisor.kvm import constants as kc

    for opcode in (0xCC, 0x9B, 0x90):
        ef = struct.pack("<IIQB", int(kc.InternalSuberror.EMULATION), 0,
                         kc.KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES, 1)
        ef += bytes([opcode]) + bytes(14)
        regs = struct.pack("<18Q", *([0] * 16 + [0x100000, 2]))
        yield Writer().u8(0).raw(ef).u8(1).raw(regs).raw(bytes(312)).u64(0x11).raw(bytes(64))\
            .u16(0).u8(1).u32(0).raw(bytes(32)).u8(3).bytes()


@seeds
def boot_loader() -> Iterator[bytes]:
    sys.path.insert(0, str(ROOT))
    from tests.vmm.test_boot_fuzz import SEEDS as IMAGES

    for _name, image in sorted(IMAGES.items()):
        for protocol in (0, 2, 3):
            yield Writer().u8(protocol).blob(b"console=ttyS0").u8(0).blob(b"initrd!")\
                .u8(1).raw(image).bytes()
        if image[:4] == b"\x7fELF":  # cut inside the program header table
            phoff = int.from_bytes(image[0x20:0x28] if image[4] == 2 else image[0x1C:0x20],
                                   "little")
            yield Writer().u8(0).blob(b"").u8(1).u8(0).raw(image[:phoff + 8]).bytes()


@seeds
def acpi() -> Iterator[bytes]:
    for vcpus, n in ((1, 1), (2, 5), (64, 8), (255, 9)):
        w = Writer().u8(1).u8(vcpus).u8(n)
        for i in range(n):
            w.u8(1).u8(i).u8(1).u8(16 + i)
        yield w.bytes()


@seeds
def api_requests() -> Iterator[bytes]:
    from fuzz.harnesses import api_requests as h

    h.setup()
    ops = h._state["ops"]
    for i, (_path, method, _op) in enumerate(ops):
        w = Writer().u8(i).u8(0)
        w.raw(bytes([0, 0, 0, 2]))  # path params: "a", then "base" (NAMES)
        w.u8(0).u8(0)  # query from parameters: none
        w.u8(0)  # no idempotency key
        if method in h.METHODS_WRITE:
            w.u8(1).u8(3).raw(bytes([0, 0, 1, 1, 4, 10]))
        w.u8(i % 3)  # admin, owner-a, nobody in turn
        yield w.bytes()


@seeds
def api_models() -> Iterator[bytes]:
    from fuzz.harnesses import api_models as harness

    harness.setup()
    index = {m.__name__: i for i, m in enumerate(harness._models)}
    bodies = [("QuotaBody", b'{"maxVcpus":4,"maxMemoryMiB":1024,"maxVms":2}'),
              ("RoleAssignmentCreate",
               b'{"principal":"alice","role":"Owner","scope":"/tenants/a"}'),
              ("RoleDefinitionCreate",
               b'{"name":"ops","actions":["vms/*"],"scope":"/tenants/a"}'),
              ("TenantCreate", b'{"name":"a","description":"x"}'),
              ("VmCreate", b'{"name":"v","kernel":"k","vcpus":2,"memoryMiB":64,"cmdline":"c",'
                           b'"nics":[{"network":"lan"}]}'),
              ("NetworkCreate", b'{"name":"lan","cidr":"10.8.0.0/24"}')]
    for model, b in bodies:
        yield Writer().u8(index[model]).u8(0).raw(b).bytes()


@seeds
def pki() -> Iterator[bytes]:
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    from isovisor.security.pki import CertificateAuthority

    with tempfile.TemporaryDirectory() as tmp:
        ca = CertificateAuthority.init(Path(tmp) / "ca")
        issued = ca.issue("alice")
        cert = x509.load_pem_x509_certificate(issued.cert_pem)
        yield Writer().u8(1).raw(cert.public_bytes(Encoding.DER)).bytes()
        ca.revoke("alice")
        yield Writer().u8(0).raw(ca.crl_path.read_bytes()).bytes()


@seeds
def audit_log() -> Iterator[bytes]:
    from isovisor.security.audit.hooks import HostAudit

    with tempfile.TemporaryDirectory() as tmp:
        audit = HostAudit(Path(tmp))
        audit.close()
        for seg in sorted(Path(tmp).rglob("audit-*.log")):
            raw = seg.read_bytes()
            yield Writer().u8(0).raw(raw).bytes()
            for line in raw.splitlines()[:2]:
                yield Writer().u8(1).raw(line).bytes()


@seeds
def runner_state() -> Iterator[bytes]:
    handle = json.dumps({"pid": 1, "start_ticks": 2, "run_dir": "/x"}).encode()
    yield Writer().blob(b'{"returncode": 0}').blob(b"123").blob(b"122").u32(1 << 31)\
        .raw(handle).bytes()
    yield Writer().blob(b'{"returncode": -9}').blob(b"x").blob(b"").u32(0).raw(b"{}").bytes()


@seeds
def event_channel() -> Iterator[bytes]:
    from isovisor.security.audit import event_channel as ec

    good = ec.encode_line("virtio-needs-reset", "virtio-rng@0xd0000000", "loop", 1.5e9)
    yield Writer().blob(good * 3).u8(0).raw(good).bytes()
    yield Writer().blob(good + b'{"v":1}\n' + good[:40]).u8(0).raw(good[40:]).bytes()
    yield Writer().blob(b"x" * (ec.MAX_LINE_BYTES + 10) + b"\n" + good).u8(1).bytes()
    yield Writer().blob(good.replace(b"1500000000", b"NaN")).u8(1).raw(b"\xff\n").bytes()


@seeds
def vsock_host() -> Iterator[bytes]:
    yield Writer().blob(b"CONNECT 1234\n").bytes()
    yield Writer().blob(b"CONN").u8(0).blob(b"ECT 4294967295\n").bytes()
    yield Writer().blob(b"CONNECT 4294967296\n").bytes()
    yield Writer().blob(b"CONNECT " + b"9" * 40).bytes()


@seeds
def worker_protocol() -> Iterator[bytes]:
    from isovisor.worker import protocol

    cfg = {"vm_id": "v", "uid": 1000, "gid": 1000, "memory": 1 << 24, "vcpus": 1,
           "fd_index": {"control": 0, "kvm": 1, "kernel": 2}, "test_hook": "probe"}
    yield Writer().u8(2).raw(protocol.encode(protocol.OP_LAUNCH, cfg)).bytes()
    yield Writer().u8(1).raw(protocol.encode(protocol.OP_READY, {"pid": 5})).bytes()
    for action in (b"probe", b"read-vm-memory:12", b"execve", b"read-vm-memory:"):
        yield Writer().u8(0).raw(action).bytes()


@seeds
def tenant_networks() -> Iterator[bytes]:
    # step: op, tenant (0 a, 1 b), flag 1 + NAMES index; op 0: flag 1 + CIDRS index;
    # op 2: NIC count, then NAMES indexes (lan = 0, dmz = 1)
    lan_a = Writer().u8(0).u8(0).u8(1).u8(0).u8(1).u8(0)  # a: lan 10.0.0.0/24
    vm_a = Writer().u8(2).u8(0).u8(1).u8(0).u8(2).u8(0).u8(0)  # a: VM with 2 NICs on lan
    overlap_b = Writer().u8(0).u8(1).u8(1).u8(0).u8(1).u8(2)  # b: lan 10.0.0.128/25
    spy_b = Writer().u8(2).u8(1).u8(1).u8(0).u8(1).u8(0)  # b: VM naming "lan" (a's)
    busy = Writer().u8(1).u8(0).u8(1).u8(0)  # a: delete lan while a VM has a NIC on it
    gone = Writer().u8(3).u8(0).u8(1).u8(0)  # a: delete the VM, then lan
    yield Writer().u8(1).raw(lan_a.bytes()).bytes()
    yield Writer().u8(5).raw(lan_a.bytes() + vm_a.bytes() + overlap_b.bytes()
                              + spy_b.bytes() + busy.bytes()).bytes()
    yield Writer().u8(4).raw(lan_a.bytes() + vm_a.bytes() + gone.bytes()
                              + busy.bytes()).bytes()
    small = Writer().u8(0).u8(0).u8(1).u8(1).u8(1).u8(3)  # a: dmz 10.0.1.0/29: 5 NICs
    four = Writer().u8(2).u8(0).u8(1).u8(0).u8(4).u8(1).u8(1).u8(1).u8(1)  # 4 NICs on dmz
    yield Writer().u8(3).raw(small.bytes() + four.bytes() * 2).bytes()  # the 2nd: full


@seeds
def tenant_disks() -> Iterator[bytes]:
    # step: op, tenant (0 a, 1 b), flag 1 + NAMES index (0 data, 1 logs); op 0: flag 0 +
    # u16 size in MiB; op 2: disk count, then per disk flag 1 + NAMES index (a named disk)
    mk_a = Writer().u8(0).u8(0).u8(1).u8(0).u8(0).u16(1)  # a: disk data, 1 MiB
    mk_b = Writer().u8(0).u8(1).u8(1).u8(0).u8(0).u16(2)  # b: disk data, 2 MiB
    vm_a = Writer().u8(2).u8(0).u8(1).u8(0).u8(1).u8(1).u8(0)  # a: VM on a's data
    spy_b = Writer().u8(2).u8(1).u8(1).u8(0).u8(1).u8(1).u8(1)  # b: VM naming logs (a's?)
    del_a = Writer().u8(1).u8(0).u8(1).u8(0)  # a: delete data (refused while attached)
    vm_gone = Writer().u8(3).u8(0).u8(1).u8(0)  # a: delete the VM
    yield Writer().u8(2).raw(mk_a.bytes() + mk_b.bytes()).bytes()
    yield Writer().u8(6).raw(mk_a.bytes() + vm_a.bytes() + spy_b.bytes() + del_a.bytes()
                              + vm_gone.bytes() + del_a.bytes()).bytes()
    yield Writer().u8(4).raw(mk_a.bytes() + mk_b.bytes() + del_a.bytes()
                              + mk_a.bytes()).bytes()  # shred, then a new disk, same name


@seeds
def diskcrypt() -> Iterator[bytes]:
    from fuzz.harnesses.diskcrypt import CAPACITY

    # mode 0, the cipher's calls: sector (flag 1: u64), length, same-size output (flag),
    # encrypt (flag), 64 bytes of data
    for sector, n, encrypt in ((0, 4096, 1), ((1 << 64) - 2, 1024, 0), ((1 << 64) - 1, 1024, 1),
                               (7, 1000, 1)):
        yield (Writer().u8(0).u8(1).u64(sector).u16(n).u8(1).u8(encrypt)
               .raw(bytes(range(64))).bytes())
    yield Writer().u8(0).u8(0).u16(3).u16(1024).u8(0).u16(512).u8(0).bytes()  # 1024 -> 512
    # mode 1, a disk read: sectors - 1, first sector, cut count, cuts
    yield Writer().u8(1).u8(15).u16(CAPACITY - 16).u8(2).u16(700).u16(3000).bytes()
    yield Writer().u8(1).u8(0).u16(CAPACITY - 1).u8(0).bytes()  # the last sector
    # mode 2, the device: the virtio_blk seeds' rings over the encrypted image
    for rtype, sector, n, wr in ((0, 0, 4096, True), (1, CAPACITY - 2, 1024, False),
                                 (0, CAPACITY - 1, 512, True), (0, CAPACITY, 512, True),
                                 (5, 0, 16, False)):
        descs, header = _blk_chain(rtype, sector, n, wr)
        yield _device(~0, 0, lambda w, d=descs, h=header: ring_seed(w, 8, d, [0], h),
                      prefix=b"\x02")


def main() -> int:
    names = sys.argv[1:] or sorted(SEEDS)
    for name in names:
        out = CORPUS / name
        out.mkdir(parents=True, exist_ok=True)
        for old in out.glob("seed-*"):
            old.unlink()
        count = 0
        for data in SEEDS[name]():
            (out / f"seed-{hashlib.sha1(data).hexdigest()[:12]}").write_bytes(data)
            count += 1
        print(f"{name}: {count} seeds")
    return 0


if __name__ == "__main__":
    sys.exit(main())
