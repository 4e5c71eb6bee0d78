"""`--net tap=NAME[,mac=MAC][,rx-bw=RATE][,rx-ops=N][,tx-bw=RATE][,tx-ops=N]`.

The TAP must exist (`ip tuntap add dev NAME mode tap`); MAC defaults to a random locally
administered address. Rate limits per direction (rx = to the guest, tx = from it):
`*-bw` in bytes per second (10M, 512K, or plain bytes), `*-ops` in frames per second.
The syntax itself lives with the device (isovisor.devices.virtio.net_spec).
"""

from __future__ import annotations

import argparse

from isovisor.devices.virtio.net_spec import NetError, NetSpec, parse_net_option

SYNTAX = "tap=NAME[,mac=MAC][,rx-bw=RATE][,rx-ops=N][,tx-bw=RATE][,tx-ops=N]"


def net_option(text: str) -> NetSpec:
    """The argparse type of --net (ArgumentTypeError with the reason on bad syntax)."""
    try:
        return parse_net_option(text)
    except NetError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
