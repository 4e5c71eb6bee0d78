"""What a VM's vsock device is made from, checked before anything is created.

`VsockSpec(cid, uds)` is what the builder and the CLI (`--vsock cid=N,uds=PATH`) pass
around; `check_spec` turns every problem into one sentence (VsockConfigError).
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from isovisor.devices.virtio.chain import VirtioError
from isovisor.devices.virtio.vsock.packet import MAX_GUEST_CID, MIN_GUEST_CID

# sun_path holds 108 bytes including the terminating NUL.
MAX_UDS_PATH = 107
# The longest suffix a guest-initiated connection adds: "_" and a u32 port in decimal.
PORT_SUFFIX_MAX = len("_4294967295")


class VsockConfigError(VirtioError):
    """The vsock device cannot be created as asked (bad CID, unusable socket path)."""


@dataclass(frozen=True)
class VsockSpec:
    cid: int  # the guest's CID (§5.10.4 guest_cid): 3 .. 2^32 - 2
    uds: Path  # the host-side listening socket; guest connections go to <uds>_<port>


def check_spec(spec: VsockSpec) -> None:
    """Raise VsockConfigError unless `spec` can be opened."""
    if not MIN_GUEST_CID <= spec.cid <= MAX_GUEST_CID:
        raise VsockConfigError(
            f"vsock CID {spec.cid} is reserved or out of range: use {MIN_GUEST_CID}.."
            f"{MAX_GUEST_CID} (0, 1 and 2 are reserved, 2 is the host; §5.10.4)"
        )
    path = os.fsencode(spec.uds)
    if not path or b"\0" in path:
        raise VsockConfigError(f"vsock socket path {str(spec.uds)!r} is empty or has a NUL")
    if len(path) + PORT_SUFFIX_MAX > MAX_UDS_PATH:
        raise VsockConfigError(
            f"vsock socket path {spec.uds} is {len(path)} bytes; with the port suffix "
            f"(<uds>_<port>) it must fit {MAX_UDS_PATH} bytes, so at most "
            f"{MAX_UDS_PATH - PORT_SUFFIX_MAX}"
        )
    parent = spec.uds.parent
    if not parent.is_dir():
        raise VsockConfigError(f"vsock socket directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise VsockConfigError(f"vsock socket directory {parent} is not writable")
    try:
        st = os.lstat(spec.uds)
    except FileNotFoundError:
        return
    kind = "a socket" if stat.S_ISSOCK(st.st_mode) else "not a socket"
    raise VsockConfigError(
        f"vsock socket path {spec.uds} already exists ({kind}): another VM may own it; "
        "remove it if it is stale"
    )


def parse_vsock_option(text: str) -> VsockSpec:
    """`cid=N,uds=PATH` (the CLI's --vsock) -> VsockSpec; ValueError with the reason."""
    fields: dict[str, str] = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if not sep or key not in ("cid", "uds") or key in fields or not value:
            raise ValueError(f"{text!r}: expected cid=N,uds=PATH")
        fields[key] = value
    if set(fields) != {"cid", "uds"}:
        raise ValueError(f"{text!r}: expected cid=N,uds=PATH")
    if not fields["cid"].isdigit():
        raise ValueError(f"{text!r}: cid must be a whole number")
    return VsockSpec(cid=int(fields["cid"]), uds=Path(fields["uds"]))
