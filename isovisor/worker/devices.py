"""A jailed worker's virtio-blk, virtio-net and virtio-vsock devices: how the launch
request describes them, the host side that opens their backends, and the worker side
that hands those backends to the machine builder.

The worker opens no host path, so the host side (the launcher) opens every backend and
passes it as a file descriptor (config.FD_TARGET gives each its fixed number):

- virtio-blk: the image, O_RDWR or O_RDONLY (readonly), O_DIRECT if asked, checked and
  flock'ed exactly as `Disk.open` does it; the lock belongs to the open file, so it
  travels with the fd and holds until the worker's copy is closed.
- virtio-net: /dev/net/tun attached to the TAP with TUNSETIFF (IFF_TAP|IFF_NO_PI|
  IFF_VNET_HDR), the 12-byte header size set and offloads off (`open_tap`): the worker
  lives in an empty network namespace without CAP_NET_ADMIN and could do none of it. At
  run time the device only issues TUNSETOFFLOAD.
- virtio-vsock: the listening socket at <uds>, bound (mode 0600) by the host side, which
  also removes the path when the VM ends, and one end of a SEQPACKET pair to the host
  side's broker, which connects <uds>_<port> for guest-initiated connections
  (vsock_broker.py): the worker may not connect().

The launch config says how each device behaves (read-only, O_DIRECT, serial, MAC, rate
limits, CID), with the image path, TAP name and socket path only to name the device in
messages; `check_devices` validates all of it like any other input.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from isovisor.devices.ratelimit import BucketSpec
from isovisor.devices.tap import Tap, TapError, open_tap
from isovisor.devices.virtio.blk_disk import Disk, DiskError, DiskSpec
from isovisor.devices.virtio.net_spec import NetError, NetSpec, parse_mac
from isovisor.devices.virtio.vsock.listener import bind_listener
from isovisor.devices.virtio.vsock.packet import MAX_GUEST_CID, MIN_GUEST_CID
from isovisor.devices.virtio.vsock.spec import VsockConfigError, VsockSpec, check_spec
from isovisor.vmm.host_backends import HostBackends
from isovisor.worker import protocol
from isovisor.worker.config import FD_TARGET, MAX_DISKS, MAX_NETS
from isovisor.worker.errors import BuildError, ProtocolError
from isovisor.worker.vsock_broker import BrokerConnector, VsockBroker

if TYPE_CHECKING:
    from isovisor.worker.config import WorkerConfig

MAX_TEXT = 4096  # a path or name in the config (paths are at most PATH_MAX anyway)
MAX_RATE = float(1 << 62)  # tokens per second; also keeps a JSON integer convertible

# --- the config's device descriptions ----------------------------------------------------


def _bucket_json(b: BucketSpec | None) -> dict[str, Any] | None:
    if b is None:
        return None
    return {"capacity": b.capacity, "rate": b.refill_per_second, "burst": b.one_time_burst}


def disk_json(spec: DiskSpec) -> dict[str, Any]:
    return {"path": str(spec.path), "readonly": spec.readonly, "direct": spec.direct,
            "serial": spec.serial, "bw": _bucket_json(spec.bandwidth),
            "ops": _bucket_json(spec.ops),
            # the disk key (hex) travels only in this message, never through a file
            "key": spec.key.hex() if spec.key is not None else None}


def net_json(spec: NetSpec, ufo: bool) -> dict[str, Any]:
    return {"tap": spec.tap, "mac": spec.mac, "ufo": ufo,
            "rx_bw": _bucket_json(spec.rx_bandwidth), "rx_ops": _bucket_json(spec.rx_ops),
            "tx_bw": _bucket_json(spec.tx_bandwidth), "tx_ops": _bucket_json(spec.tx_ops)}


def vsock_json(spec: VsockSpec) -> dict[str, Any]:
    return {"cid": spec.cid, "uds": str(spec.uds)}


class _Reader:
    """Typed access to one description; every mistake is a ProtocolError."""

    def __init__(self, what: str, doc: Any, keys: tuple[str, ...]) -> None:
        if not isinstance(doc, dict):
            raise ProtocolError(f"worker config: {what} is not an object")
        if set(doc) != set(keys):
            raise ProtocolError(f"worker config: {what} must have exactly {', '.join(keys)}")
        self.what, self.doc = what, doc

    def text(self, key: str, *, optional: bool = False) -> str | None:
        v = self.doc[key]
        if v is None and optional:
            return None
        if not isinstance(v, str) or not 0 < len(v) <= MAX_TEXT or "\0" in v:
            raise ProtocolError(f"worker config: {self.what}.{key} is not a usable string")
        return v

    def flag(self, key: str) -> bool:
        v = self.doc[key]
        if not isinstance(v, bool):
            raise ProtocolError(f"worker config: {self.what}.{key} is not a boolean")
        return v

    def integer(self, key: str, low: int, high: int) -> int:
        v = self.doc[key]
        if not isinstance(v, int) or isinstance(v, bool) or not low <= v <= high:
            raise ProtocolError(f"worker config: {self.what}.{key} is not in {low}..{high}")
        return v

    def bucket(self, key: str) -> BucketSpec | None:
        v = self.doc[key]
        if v is None:
            return None
        r = _Reader(f"{self.what}.{key}", v, ("capacity", "rate", "burst"))
        rate = v["rate"]
        if not isinstance(rate, int | float) or isinstance(rate, bool) or not (
            0 < rate < MAX_RATE and math.isfinite(rate)
        ):
            raise ProtocolError(f"worker config: {self.what}.{key}.rate is not a positive rate")
        try:
            return BucketSpec(r.integer("capacity", 1, 1 << 62), float(rate),
                              r.integer("burst", 0, 1 << 62))
        except ValueError as exc:
            raise ProtocolError(f"worker config: {self.what}.{key}: {exc}") from None


def disk_from_json(doc: Any, i: int = 0) -> DiskSpec:
    r = _Reader(f"disk {i}", doc, ("path", "readonly", "direct", "serial", "bw", "ops", "key"))
    path = r.text("path")
    assert path is not None
    key_hex = r.text("key", optional=True)
    if key_hex is not None and (len(key_hex) != 128 or key_hex.strip("0123456789abcdef")):
        raise ProtocolError(f"worker config: disk {i}.key is not 64 bytes of lowercase hex")
    try:
        return DiskSpec(Path(path), readonly=r.flag("readonly"), direct=r.flag("direct"),
                        serial=r.text("serial", optional=True), bandwidth=r.bucket("bw"),
                        ops=r.bucket("ops"),
                        key=bytes.fromhex(key_hex) if key_hex is not None else None)
    except ValueError as exc:
        raise ProtocolError(f"worker config: disk {i}: {exc}") from None


def net_from_json(doc: Any, i: int = 0) -> tuple[NetSpec, bool]:
    r = _Reader(f"net {i}", doc, ("tap", "mac", "ufo", "rx_bw", "rx_ops", "tx_bw", "tx_ops"))
    tap, mac = r.text("tap"), r.text("mac", optional=True)
    assert tap is not None
    if mac is not None:
        try:
            parse_mac(mac)
        except NetError as exc:
            raise ProtocolError(f"worker config: net {i}: {exc}") from None
    spec = NetSpec(tap, mac=mac, rx_bandwidth=r.bucket("rx_bw"), rx_ops=r.bucket("rx_ops"),
                   tx_bandwidth=r.bucket("tx_bw"), tx_ops=r.bucket("tx_ops"))
    return spec, r.flag("ufo")


def vsock_from_json(doc: Any) -> VsockSpec:
    r = _Reader("vsock", doc, ("cid", "uds"))
    uds = r.text("uds")
    assert uds is not None
    return VsockSpec(r.integer("cid", MIN_GUEST_CID, MAX_GUEST_CID), Path(uds))


def check_devices(cfg: WorkerConfig) -> None:
    """ProtocolError unless the device descriptions parse and each has its fds (and no
    device fd arrives without its device)."""
    if not isinstance(cfg.disks, list) or len(cfg.disks) > MAX_DISKS:
        raise ProtocolError(f"worker config: disks must be a list of at most {MAX_DISKS}")
    if not isinstance(cfg.nets, list) or len(cfg.nets) > MAX_NETS:
        raise ProtocolError(f"worker config: nets must be a list of at most {MAX_NETS}")
    for i, d in enumerate(cfg.disks):
        disk_from_json(d, i)
    for i, n in enumerate(cfg.nets):
        net_from_json(n, i)
    if cfg.vsock is not None:
        vsock_from_json(cfg.vsock)
    wanted = {*(f"disk{i}" for i in range(len(cfg.disks))),
              *(f"tap{i}" for i in range(len(cfg.nets))),
              *(("vsock_listener", "vsock_broker") if cfg.vsock is not None else ())}
    given = {s for s in cfg.fd_index if s.startswith(("disk", "tap", "vsock_"))}
    if wanted != given:
        raise ProtocolError("worker config: device fds do not match the devices "
                            f"(expected {sorted(wanted)}, got {sorted(given)})")


# --- the host side ------------------------------------------------------------------------


@dataclass
class HostDevices:
    """The backends the host side opened for one VM. `fds` (slot -> fd) go to the worker;
    `sent()` closes the host's copies once they are on their way; `finish()` undoes the
    rest when the VM is gone (or never started): the broker stops, the vsock path goes."""

    disks: list[dict[str, Any]] = field(default_factory=list)
    nets: list[dict[str, Any]] = field(default_factory=list)
    vsock: dict[str, Any] | None = None
    fds: dict[str, int] = field(default_factory=dict)
    broker: VsockBroker | None = None
    _close: list[Callable[[], None]] = field(default_factory=list)
    _finish: list[Callable[[], None]] = field(default_factory=list)

    @classmethod
    def open(cls, disks: tuple[DiskSpec, ...] = (), nets: tuple[NetSpec, ...] = (),
             vsock: VsockSpec | None = None) -> HostDevices:
        """Open everything or nothing: BuildError with the device's one sentence."""
        if len(disks) > MAX_DISKS or len(nets) > MAX_NETS:
            raise BuildError(f"at most {MAX_DISKS} disks and {MAX_NETS} network interfaces")
        out = cls()
        try:
            for i, spec in enumerate(disks):
                try:
                    disk = Disk.open(spec)  # the same checks and lock as an unjailed VM
                except DiskError as exc:
                    raise BuildError(str(exc)) from None
                out._close.append(disk.close)
                out.fds[f"disk{i}"] = disk.fd
                out.disks.append(disk_json(spec))
            for i, net in enumerate(nets):
                try:
                    tap = open_tap(net.tap, netns=net.netns)
                    if net.mac is not None:
                        parse_mac(net.mac)
                except (TapError, NetError) as exc:
                    raise BuildError(str(exc)) from None
                out._close.append(tap.close)
                out.fds[f"tap{i}"] = tap.fd
                out.nets.append(net_json(net, tap.ufo))
            if vsock is not None:
                out._open_vsock(vsock)
        except BaseException:
            out.sent()
            out.finish()
            raise
        return out

    def _open_vsock(self, spec: VsockSpec) -> None:
        try:
            check_spec(spec)
            listener = bind_listener(spec.uds)
        except VsockConfigError as exc:
            raise BuildError(str(exc)) from None
        self._finish.append(listener.close)  # removes the path (if it is still ours)
        self._close.append(listener.sock.close)
        self.fds["vsock_listener"] = listener.sock.fileno()
        ours, theirs = protocol.socketpair()
        self._close.append(theirs.close)
        self.fds["vsock_broker"] = theirs.fileno()
        self.broker = VsockBroker(ours, spec.uds)
        self._finish.insert(0, self.broker.close)
        self.vsock = vsock_json(spec)

    def start(self) -> None:
        """The worker is running: serve its broker requests."""
        if self.broker is not None:
            self.broker.start()

    def sent(self) -> None:
        """Close the host's copies of the fds (the worker holds its own)."""
        for close in self._close:
            with contextlib.suppress(OSError):
                close()
        self._close.clear()

    def finish(self) -> None:
        for done in self._finish:
            with contextlib.suppress(OSError):
                done()
        self._finish.clear()


# --- the worker side ----------------------------------------------------------------------


def worker_devices(cfg: WorkerConfig) -> tuple[tuple[DiskSpec, ...], tuple[NetSpec, ...],
                                               VsockSpec | None, HostBackends]:
    """The device specs and the backends the host side passed, at their fixed fds."""
    disks = tuple(disk_from_json(d, i) for i, d in enumerate(cfg.disks))
    taps: list[Tap] = []
    nets: list[NetSpec] = []
    for i, doc in enumerate(cfg.nets):
        spec, ufo = net_from_json(doc, i)
        nets.append(spec)
        taps.append(Tap(spec.tap, FD_TARGET[f"tap{i}"], ufo=ufo))
    vsock = vsock_from_json(cfg.vsock) if cfg.vsock is not None else None
    listener = connector = None
    if vsock is not None:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, 0,
                                 fileno=FD_TARGET["vsock_listener"])
        connector = BrokerConnector(socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET, 0,
                                                  fileno=FD_TARGET["vsock_broker"]))
    backends = HostBackends(
        disk_fds=tuple(FD_TARGET[f"disk{i}"] for i in range(len(disks))),
        taps=tuple(taps), vsock_listener=listener, vsock_connector=connector,
    )
    return disks, tuple(nets), vsock, backends


def device_fd_targets(cfg: WorkerConfig) -> list[int]:
    """The fixed fd numbers of this worker's device backends."""
    return sorted(FD_TARGET[s] for s in cfg.fd_index
                  if s.startswith(("disk", "tap", "vsock_")))


def disk_sizes(cfg: WorkerConfig) -> list[int]:
    """Sizes of the disk images (for RLIMIT_FSIZE: writes anywhere inside them must work)."""
    sizes = []
    for i in range(len(cfg.disks)):
        with contextlib.suppress(OSError):
            sizes.append(os.lseek(FD_TARGET[f"disk{i}"], 0, os.SEEK_END))
    return sizes
