"""Device backends a VM's host side opened for it (the jailed worker opens no host path).

`Machine(spec, kvm, backends=...)` uses these instead of opening what the spec names:
one image fd per `VmSpec.disks` entry (opened as that DiskSpec says: read-only, O_DIRECT),
one Tap per `VmSpec.nets` entry (attached with TUNSETIFF and its virtio-net header size
set), and for `VmSpec.vsock` the Unix socket already bound and listening at its `uds`
plus the connector that makes guest-initiated connections. The spec still says how each
device behaves (MAC, rate limits, read-only, serial, CID) and names it in messages.
The machine owns the backends from then on and closes them at teardown.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

from isovisor.devices.tap import Tap
from isovisor.devices.virtio.vsock.muxer import Connector


@dataclass(frozen=True)
class HostBackends:
    disk_fds: tuple[int, ...] = ()
    taps: tuple[Tap, ...] = ()
    vsock_listener: socket.socket | None = None
    vsock_connector: Connector | None = None
