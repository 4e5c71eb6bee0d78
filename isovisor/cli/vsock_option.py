"""`--vsock cid=N,uds=PATH`: a virtio-vsock device bridged to host Unix sockets.

N is the guest's CID (3 .. 4294967294). PATH is where the VM listens for host-initiated
connections (`CONNECT <port>\\n`); a guest connection to host port P goes to the Unix
socket `PATH_P`. docs/VSOCK.md has the whole protocol. The syntax itself lives with the
device (isovisor.devices.virtio.vsock.spec); the CID and path are checked when the VM is
built.
"""

from __future__ import annotations

import argparse

from isovisor.devices.virtio.vsock.spec import VsockSpec, parse_vsock_option

SYNTAX = "cid=N,uds=PATH"


def vsock_option(text: str) -> VsockSpec:
    """The argparse type of --vsock (ArgumentTypeError with the reason on bad syntax)."""
    try:
        return parse_vsock_option(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
