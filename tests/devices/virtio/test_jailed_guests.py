"""The virtio-blk, virtio-net and virtio-vsock guest drivers (guests/*_driver.asm: the ones
test_blk_guest.py, test_net_guest.py and test_vsock_guest.py run in a bare VM) driving
their devices in a jailed worker, through `isovisor run` without --no-jail.

The host side opens the image (O_RDWR or O_RDONLY, locked), attaches the TAP, binds the
vsock socket and connects `<uds>_P` when the guest asks; the worker, in its namespaces,
as its own uid, with no capabilities and under its seccomp filters, does the I/O on the
fds it was handed. Built with -DSERIAL, a driver reports its values on COM1 (8 hex digits
a line) and resets the machine when done, so `isovisor run` ends with "guest reset"."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from isovisor.devices.virtio import constants as c
from isovisor.devices.virtio.blk import F_BLK_SIZE, F_FLUSH
from isovisor.devices.virtio.net_header import F_MAC, F_MRG_RXBUF, F_STATUS
from isovisor.vmm.stop import StopReason
from tests.conftest import NO_KVM_REASON, REPO, kvm_usable
from tests.devices.virtio.blk_helpers import make_image, sector_bytes
from tests.devices.virtio.net_helpers import MAC, TapPeer
from tests.devices.virtio.netns import NetNs, eth_frame
from tests.devices.virtio.serial_guests import build_serial_guest as build
from tests.devices.virtio.serial_guests import reported
from tests.devices.virtio.test_vsock_guest import PongServer

pytestmark = pytest.mark.kvm

ALIVE = 0x600DF00D
TAP = "isvtap0"
HOST_MAC = bytes.fromhex("02000000fe01")


@pytest.fixture(autouse=True)
def _jail_possible() -> None:
    why = kvm_usable()
    if why is not None:
        pytest.skip(f"{NO_KVM_REASON}: {why}")
    if os.geteuid() != 0:
        pytest.skip("LOUD SKIP: the worker jail needs root (cgroups, uid switch)")


def run_jailed(elf: Path, *options: str, netns: NetNs | None = None,
               timeout: float = 120) -> tuple[list[int], subprocess.CompletedProcess[str]]:
    """`isovisor run` (jailed: the default) on `elf`, in `netns` if given; the values the
    guest reported."""
    argv = [sys.executable, "-m", "isovisor.cli.main", "run", "--kernel", str(elf),
            "--memory", "32M", "--timeout", str(timeout), *options]
    r = subprocess.run(
        netns.nsenter_argv(*argv) if netns is not None else argv,
        cwd=REPO, capture_output=True, text=True, timeout=timeout + 60,
        stdin=subprocess.DEVNULL,
    )
    assert "--no-jail" not in r.stderr and "Traceback" not in r.stderr, r.stderr
    return reported(r.stdout), r


def ended_cleanly(r: subprocess.CompletedProcess[str], values: list[int]) -> None:
    """The driver finished (ALIVE) and reset the machine: no seccomp kill, no timeout."""
    assert values and values[-1] == ALIVE, ([hex(v) for v in values], r.stderr)
    assert r.returncode == StopReason.GUEST_RESET.exit_status, r.stderr
    assert "guest reset" in r.stderr and "seccomp" not in r.stderr, r.stderr


# --- virtio-blk ------------------------------------------------------------------------------


def _pattern() -> bytes:
    return b"".join(((i * 0x01000193 + 7) & 0xFFFFFFFF).to_bytes(4, "little")
                    for i in range(256))


def test_blk_guest_writes_flushes_reads_back_in_a_jailed_worker(tmp_path: Path) -> None:
    image = make_image(tmp_path / "disk.img", 64)
    vals, r = run_jailed(build(tmp_path, "blk_driver"), "--disk", f"{image},serial=isovisor-test")
    ended_cleanly(r, vals)
    assert vals[:3] == [c.MMIO_MAGIC, 2, c.DEVICE_ID_BLOCK]
    assert vals[3] & (F_FLUSH | F_BLK_SIZE) == F_FLUSH | F_BLK_SIZE
    assert vals[4:7] == [0x0B, 64, 256]
    # (status, used len) of OUT 1024 bytes, FLUSH, IN 1024 bytes, GET_ID 20 bytes
    assert vals[7:15] == [0, 1, 0, 1, 0, 1025, 0, 21], [hex(v) for v in vals]
    assert vals[15] == 0  # what was read back is what was written
    assert vals[16] == int.from_bytes(b"isov", "little")  # the serial from the config
    data = image.read_bytes()
    assert data[512:1536] == _pattern()  # pwritev + fdatasync from inside the jail
    assert data[:512] == sector_bytes(0) and data[1536:2048] == sector_bytes(3)


def test_blk_readonly_disk_is_opened_read_only_for_the_worker(tmp_path: Path) -> None:
    image = make_image(tmp_path / "disk.img", 64)
    before = image.read_bytes()
    vals, r = run_jailed(build(tmp_path, "blk_driver"), "--disk", f"{image},readonly")
    ended_cleanly(r, vals)
    assert vals[7] == 1  # the OUT: VIRTIO_BLK_S_IOERR
    assert vals[9] == 0 and vals[11] == 0  # FLUSH and IN still work
    assert vals[15] != 0  # so the data read back is the image's, not the pattern
    assert image.read_bytes() == before



# --- virtio-net ------------------------------------------------------------------------------


@pytest.fixture
def netns() -> Iterator[NetNs]:
    with NetNs() as ns:
        ns.add_tap(TAP)
        yield ns


def _echo_once(ns: NetNs, peer: TapPeer, seen: list[bytes]) -> None:
    """Answer the guest's first test frame with "isovisor-pong" to its source address,
    once the TAP can carry frames (the worker's host side attached it moments ago)."""
    try:
        frame = peer.recv_from_guest(120)
        ns.wait_carrier(TAP)
    except (TimeoutError, OSError, AssertionError):
        return
    seen.append(frame)
    peer.sock.send(eth_frame(frame[6:12], HOST_MAC, b"isovisor-pong"))


def test_net_guest_round_trip_through_a_tap_in_a_jailed_worker(
    tmp_path: Path, netns: NetNs
) -> None:
    """The CLI (the worker's host side) runs in the test's network namespace, where the
    TAP is; nsenter switches only that namespace (`ip netns exec` would also remount
    /sys, hiding the cgroup hierarchies the launcher needs). The worker itself has an
    empty network namespace of its own: it only has the TAP fd."""
    if shutil.which("nsenter") is None:
        pytest.fail("nsenter (util-linux) is missing")
    peer = TapPeer(netns, TAP)
    seen: list[bytes] = []
    responder = threading.Thread(target=_echo_once, args=(netns, peer, seen), daemon=True)
    responder.start()
    try:
        vals, r = run_jailed(build(tmp_path, "net_driver"), "--net",
                             f"tap={TAP},mac={MAC.hex(':')}", netns=netns)
    finally:
        peer.close()
    ended_cleanly(r, vals)
    assert vals[:3] == [c.MMIO_MAGIC, 2, c.DEVICE_ID_NET]
    assert vals[3] & (F_MAC | F_MRG_RXBUF | F_STATUS) == F_MAC | F_MRG_RXBUF | F_STATUS
    assert vals[4:] == [
        0x0B,  # FEATURES_OK accepted
        1,  # VIRTIO_NET_S_LINK_UP
        0,  # transmit used id
        0,  # transmit used len: the device writes nothing
        12 + 60,  # receive used len: header + the 60-byte reply
        1,  # num_buffers
        0xB588,  # ethertype 0x88B5 as stored
        1,  # payload "isovisor-pong"
        c.INT_USED_BUFFER,
        ALIVE,
    ], [hex(v) for v in vals]
    responder.join(5)
    (frame,) = seen
    assert frame[:6] == b"\xff" * 6 and frame[6:12] == MAC  # writev on the TAP, jailed
    assert frame[14:27] == b"isovisor-ping"



# --- virtio-vsock ----------------------------------------------------------------------------


def test_vsock_guest_round_trip_to_a_host_unix_socket_from_a_jailed_worker(
    tmp_path: Path,
) -> None:
    """The guest's connection to host port 5000 is made by the host side's broker (the
    worker may not connect()) and handed to the worker, which then moves the bytes."""
    uds = tmp_path / "v.sock"
    server = PongServer(tmp_path / "v.sock_5000")
    try:
        vals, r = run_jailed(build(tmp_path, "vsock_driver", "PORT=5000"), "--vsock",
                             f"cid=3,uds={uds}")
        server.thread.join(10)
    finally:
        server.close()
    ended_cleanly(r, vals)
    assert vals == [
        19,  # DeviceID (§5.10.1)
        3,  # guest_cid from the config space
        0x0B,  # FEATURES_OK accepted
        0x0002_0001,  # RESPONSE: the host service accepted
        0x0005_0001,  # RW
        4,
        int.from_bytes(b"pong", "little"),
        0x0003_0001,  # RST after our SHUTDOWN(RCV|SEND)
        ALIVE,
    ], [hex(v) for v in vals]
    assert server.error is None
    assert server.got == b"ping" and server.eof  # the guest's shutdown reached the host
    assert not uds.exists()  # the host side removed the listening socket


def test_vsock_guest_connection_to_a_missing_service_is_refused(tmp_path: Path) -> None:
    """No socket at <uds>_5000: the broker's connect fails and the guest gets RST."""
    vals, r = run_jailed(build(tmp_path, "vsock_driver", "PORT=5000"), "--vsock",
                         f"cid=3,uds={tmp_path / 'v.sock'}")
    assert vals[:4] == [19, 3, 0x0B, 0x0003_0001], [hex(v) for v in vals]  # RST
    assert "seccomp" not in r.stderr, r.stderr
