"""A jailed worker's device backends: the launch config's device descriptions (checked
like any input), the host side that opens the backends (isovisor.worker.devices), and
the vsock broker that connects host sockets for the worker (isovisor.worker.vsock_broker).
No KVM needed; the guests driving these devices in a real jailed worker are in
tests/devices/virtio/test_jailed_guests.py."""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from isovisor.devices.ratelimit import BucketSpec
from isovisor.devices.virtio.blk_disk import Disk, DiskSpec
from isovisor.devices.virtio.net_spec import NetSpec
from isovisor.devices.virtio.vsock.spec import VsockSpec
from isovisor.worker import devices, protocol
from isovisor.worker.config import FD_TARGET, FD_VSOCK_BROKER, WorkerConfig
from isovisor.worker.errors import BuildError, ProtocolError
from isovisor.worker.vsock_broker import BrokerConnector, VsockBroker, parse_request
from tests.devices.virtio.blk_helpers import make_image

BUCKET = BucketSpec(100, 1000.0, 5)


def _cfg(**kw: Any) -> dict[str, Any]:
    fd_index = {"control": 0, "kvm": 1, "kernel": 2}
    fd_index.update(kw.pop("fds", {}))
    doc = WorkerConfig(vm_id="v", uid=1000, gid=1000, memory=1 << 25, vcpus=1,
                       fd_index=fd_index).to_json()
    doc.update(kw)
    return doc


# --- the config --------------------------------------------------------------------------


def test_device_descriptions_round_trip() -> None:
    disk = DiskSpec(Path("/img/a.raw"), readonly=True, direct=True, serial="vol-1",
                    bandwidth=BUCKET, ops=None)
    assert devices.disk_from_json(devices.disk_json(disk)) == disk
    net = NetSpec("tap0", mac="02:00:00:00:00:01", rx_bandwidth=BUCKET, tx_ops=BUCKET)
    assert devices.net_from_json(devices.net_json(net, True)) == (net, True)
    vsock = VsockSpec(42, Path("/run/v.sock"))
    assert devices.vsock_from_json(devices.vsock_json(vsock)) == vsock


def test_config_with_devices_is_accepted_with_their_fds() -> None:
    doc = _cfg(disks=[devices.disk_json(DiskSpec(Path("a")))],
               nets=[devices.net_json(NetSpec("t0"), False)],
               vsock=devices.vsock_json(VsockSpec(3, Path("v"))),
               fds={"disk0": 3, "tap0": 4, "vsock_listener": 5, "vsock_broker": 6})
    cfg = WorkerConfig.from_json(doc)
    assert devices.device_fd_targets(cfg) == sorted(
        FD_TARGET[s] for s in ("disk0", "tap0", "vsock_listener", "vsock_broker"))


def _disk(**kw: Any) -> dict[str, Any]:
    return {**devices.disk_json(DiskSpec(Path("a"))), **kw}


def _net(**kw: Any) -> dict[str, Any]:
    return {**devices.net_json(NetSpec("t0"), False), **kw}


@pytest.mark.parametrize("doc", [
    _cfg(disks=[_disk()]),  # no disk0 fd
    _cfg(fds={"disk0": 3}),  # a disk fd without a disk
    _cfg(fds={"tap1": 3}, nets=[_net()]),  # the wrong slot
    _cfg(vsock={"cid": 3, "uds": "v"}, fds={"vsock_listener": 3}),  # no broker fd
    _cfg(disks=[_disk()] * 9, fds={f"disk{i}": i for i in range(9)}),  # too many
    _cfg(disks="a", fds={}),
    _cfg(disks=[_disk(readonly="yes")], fds={"disk0": 3}),
    _cfg(disks=[_disk(path="")], fds={"disk0": 3}),
    _cfg(disks=[_disk(path="a\0b")], fds={"disk0": 3}),
    _cfg(disks=[_disk(serial="x" * 21)], fds={"disk0": 3}),
    _cfg(disks=[_disk(extra=1)], fds={"disk0": 3}),
    _cfg(disks=[_disk(bw={"capacity": 0, "rate": 1.0, "burst": 0})], fds={"disk0": 3}),
    _cfg(disks=[_disk(bw={"capacity": 1, "rate": float("nan"), "burst": 0})],
         fds={"disk0": 3}),
    _cfg(disks=[_disk(ops={"capacity": 1, "rate": True, "burst": 0})], fds={"disk0": 3}),
    _cfg(disks=[_disk(ops=[1, 2, 3])], fds={"disk0": 3}),
    _cfg(nets=[_net(mac="01:00:00:00:00:01")], fds={"tap0": 3}),  # multicast
    _cfg(nets=[_net(ufo=1)], fds={"tap0": 3}),
    _cfg(vsock={"cid": 2, "uds": "v"}, fds={"vsock_listener": 3, "vsock_broker": 4}),
    _cfg(vsock={"cid": 3}, fds={"vsock_listener": 3, "vsock_broker": 4}),
    _cfg(vsock=[3, "v"], fds={"vsock_listener": 3, "vsock_broker": 4}),
])
def test_bad_device_descriptions_are_protocol_errors(doc: dict[str, Any]) -> None:
    with pytest.raises(ProtocolError):
        WorkerConfig.from_json(doc)


# --- the host side opening the backends --------------------------------------------------


def _flags(fd: int) -> int:
    return fcntl.fcntl(fd, fcntl.F_GETFL)


def test_host_side_opens_disks_as_their_specs_say_and_holds_the_lock(tmp_path: Path) -> None:
    a, b = make_image(tmp_path / "a.img", 8), make_image(tmp_path / "b.img", 8)
    opened = devices.HostDevices.open((DiskSpec(a), DiskSpec(b, readonly=True)))
    try:
        assert _flags(opened.fds["disk0"]) & os.O_ACCMODE == os.O_RDWR
        assert _flags(opened.fds["disk1"]) & os.O_ACCMODE == os.O_RDONLY
        assert not _flags(opened.fds["disk1"]) & os.O_NONBLOCK
        assert [d["path"] for d in opened.disks] == [str(a), str(b)]
        worker_copy = os.dup(opened.fds["disk0"])  # what the worker ends up holding
        opened.sent()
        with pytest.raises(Exception, match="in use by another VM"):
            Disk.open(DiskSpec(a))  # the lock travelled with the open file
        Disk.from_fd(worker_copy, DiskSpec(a)).close()  # the worker's checks pass too
        Disk.open(DiskSpec(a)).close()  # and its close releases the lock
    finally:
        opened.sent()
        opened.finish()


def test_host_side_asks_for_o_direct(tmp_path: Path) -> None:
    img = make_image(Path(os.environ.get("TMPDIR", "/var/tmp")) / f"isv-{os.getpid()}.img", 8)
    try:
        try:
            opened = devices.HostDevices.open((DiskSpec(img, direct=True),))
        except BuildError as exc:
            if "does not support O_DIRECT" in str(exc):
                pytest.skip(f"LOUD SKIP: {exc}")
            raise
        try:
            assert _flags(opened.fds["disk0"]) & os.O_DIRECT
        finally:
            opened.sent()
            opened.finish()
    finally:
        img.unlink()


def test_a_failed_open_names_the_device_and_leaves_nothing_open(tmp_path: Path) -> None:
    a = make_image(tmp_path / "a.img", 8)
    uds = tmp_path / "v.sock"
    with pytest.raises(BuildError, match=f"disk {tmp_path / 'missing.img'} does not exist"):
        devices.HostDevices.open((DiskSpec(a), DiskSpec(tmp_path / "missing.img")),
                                 vsock=VsockSpec(3, uds))
    Disk.open(DiskSpec(a)).close()  # the first disk's lock is gone
    assert not uds.exists()
    with pytest.raises(BuildError, match="reserved"):
        devices.HostDevices.open(vsock=VsockSpec(2, uds))
    assert not uds.exists()


def test_host_side_binds_the_vsock_socket_and_removes_it_when_done(tmp_path: Path) -> None:
    uds = tmp_path / "v.sock"
    opened = devices.HostDevices.open(vsock=VsockSpec(3, uds))
    try:
        st = os.stat(uds)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
        assert set(opened.fds) == {"vsock_listener", "vsock_broker"}
        listener = os.dup(opened.fds["vsock_listener"])
        opened.sent()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(str(uds))  # the worker's copy listens
        os.close(listener)
    finally:
        opened.finish()
    assert not uds.exists()


# --- the vsock broker --------------------------------------------------------------------


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[tuple[BrokerConnector, VsockBroker, Path]]:
    ours, theirs = protocol.socketpair()
    b = VsockBroker(ours, tmp_path / "v.sock")
    b.start()
    conn = BrokerConnector(theirs, timeout=5)
    yield conn, b, tmp_path / "v.sock"
    b.close()
    conn.close()


def _server(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.listen(4)
    return s


def test_broker_connects_uds_port_for_the_worker(
    broker: tuple[BrokerConnector, VsockBroker, Path]
) -> None:
    conn, b, uds = broker
    with _server(Path(f"{uds}_5000")) as server:
        sock = conn(5000)
        assert sock is not None
        with sock:
            peer, _ = server.accept()
            with peer:
                assert sock.gettimeout() == 0.0  # non-blocking, as the device expects
                peer.sendall(b"pong")
                time.sleep(0.05)
                assert sock.recv(16) == b"pong"
                sock.send(b"ping")
                assert peer.recv(16) == b"ping"
    assert conn(5001) is None  # no service there: the guest gets RST
    assert (b.connected, b.refused, b.malformed) == (1, 1, 0)


def test_broker_drops_malformed_requests_and_carries_on(
    broker: tuple[BrokerConnector, VsockBroker, Path]
) -> None:
    conn, b, uds = broker
    protocol.send(conn.sock, "vsock-connect", {"seq": 1, "port": -1})
    protocol.send(conn.sock, "vsock-connect", {"seq": 1, "port": 1 << 32})
    protocol.send(conn.sock, "ping")
    with open(os.devnull, "rb") as f:  # a request may not carry fds
        protocol.send(conn.sock, "vsock-connect", {"seq": 1, "port": 7}, [f.fileno()])
    conn.sock.send(b"\xff not json")
    with _server(Path(f"{uds}_7")):
        sock = conn(7)
        assert sock is not None
        sock.close()
    assert b.malformed == 5 and b.connected == 1


def test_connector_discards_late_answers(tmp_path: Path) -> None:
    """An answer to a request that timed out is not taken for the next one."""
    ours, theirs = protocol.socketpair()
    conn = BrokerConnector(theirs, timeout=0.2)
    try:
        assert conn(1) is None  # nobody answers: timed out
        assert parse_request(protocol.recv(ours)) == (1, 1)  # type: ignore[arg-type]
        a, b = socket.socketpair()
        protocol.send(ours, protocol.OP_VSOCK_CONNECTED, {"seq": 1, "ok": True}, [a.fileno()])

        def answer() -> None:
            msg = protocol.recv(ours)
            assert msg is not None and parse_request(msg) == (2, 2)
            protocol.send(ours, protocol.OP_VSOCK_CONNECTED, {"seq": 2, "ok": False,
                                                              "errno": errno.ENOENT})

        t = threading.Thread(target=answer)
        t.start()
        assert conn(2) is None  # the seq-1 socket was not taken for request 2
        t.join()
        a.close()
        b.close()
        ours.close()
        assert conn(3) is None  # the host side is gone
    finally:
        conn.close()


def test_parse_request_rejects_anything_else() -> None:
    ok = protocol.Message(protocol.OP_VSOCK_CONNECT, {"seq": 4, "port": 0xFFFF_FFFF})
    assert parse_request(ok) == (4, 0xFFFF_FFFF)
    for bad in (protocol.Message("ping", {"seq": 1, "port": 1}),
                protocol.Message(protocol.OP_VSOCK_CONNECT, {"seq": "1", "port": 1}),
                protocol.Message(protocol.OP_VSOCK_CONNECT, {"seq": 1, "port": True}),
                protocol.Message(protocol.OP_VSOCK_CONNECT, {"seq": -1, "port": 1}),
                protocol.Message(protocol.OP_VSOCK_CONNECT, {"seq": 1})):
        with pytest.raises(ProtocolError):
            parse_request(bad)


def test_the_broker_fd_number_is_what_the_filters_name() -> None:
    assert FD_TARGET["vsock_broker"] == FD_VSOCK_BROKER
