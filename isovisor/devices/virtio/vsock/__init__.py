"""virtio-vsock (virtio 1.2 §5.10) bridged to host Unix sockets, Firecracker's hybrid style.

Layers inside the package (arrows point down): device -> muxer -> connection, listener ->
packet, poller, spec. docs/VSOCK.md describes the host side for users.
"""

from isovisor.devices.virtio.vsock.device import VirtioVsock, open_vsock
from isovisor.devices.virtio.vsock.packet import Header, HostilePacket, Op, Packet, Unroutable
from isovisor.devices.virtio.vsock.spec import VsockConfigError, VsockSpec, parse_vsock_option

__all__ = [
    "Header",
    "HostilePacket",
    "Op",
    "Packet",
    "Unroutable",
    "VirtioVsock",
    "VsockConfigError",
    "VsockSpec",
    "open_vsock",
    "parse_vsock_option",
]
