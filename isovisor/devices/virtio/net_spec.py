"""How a VM's network interface is described and built: `NetSpec`, MAC addresses, the
`--net` option syntax and `open_net`, the factory the machine builder calls.

    --net tap=NAME[,mac=MAC][,netns=NS][,rx-bw=RATE][,rx-ops=N][,tx-bw=RATE][,tx-ops=N]

`netns=NS`: the TAP lives in network namespace NS (/run/netns/NS), as the daemon's tenant
networks do (isovisor.host.network); the VMM itself stays where it is.

RATE is bytes per second with an optional K/M/G suffix (binary: 10M = 10 MiB/s); N is
frames per second. Each limit is a token bucket holding one second's worth, refilled at
that rate (rx = towards the guest, tx = from it).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from isovisor.devices.events import SecurityEventSink
from isovisor.devices.ratelimit import BucketSpec, RateLimiter
from isovisor.devices.tap import TapError, check_name, check_netns_name, open_tap
from isovisor.devices.virtio.net import NetBackend, VirtioNet


class NetError(Exception):
    """A network interface cannot be set up (bad option, MAC or TAP): one sentence."""


@dataclass(frozen=True)
class NetSpec:
    tap: str
    mac: str | None = None  # None: a random locally administered address
    rx_bandwidth: BucketSpec | None = None  # bytes/s towards the guest
    rx_ops: BucketSpec | None = None  # frames/s towards the guest
    tx_bandwidth: BucketSpec | None = None  # bytes/s from the guest
    tx_ops: BucketSpec | None = None  # frames/s from the guest
    netns: str | None = None  # the TAP's network namespace (/run/netns/NAME); None: ours


_MAC = re.compile(r"^[0-9a-fA-F]{2}(?::[0-9a-fA-F]{2}){5}$")


def parse_mac(text: str) -> bytes:
    """'52:54:00:12:34:56' -> 6 bytes; multicast and all-zero addresses are refused."""
    if not _MAC.match(text):
        raise NetError(f"MAC {text!r} is not six hex pairs separated by ':'")
    mac = bytes.fromhex(text.replace(":", ""))
    if mac[0] & 1:
        raise NetError(f"MAC {text} is a multicast address (the first octet is odd)")
    if mac == bytes(6):
        raise NetError("MAC 00:00:00:00:00:00 is not a usable address")
    return mac


def random_mac() -> bytes:
    """A random unicast, locally administered MAC (first octet xxxxxx10)."""
    raw = bytearray(os.urandom(6))
    raw[0] = (raw[0] & 0xFC) | 0x02
    return bytes(raw)


def format_mac(mac: bytes) -> str:
    return mac.hex(":")


_RATE = re.compile(r"^(\d+)([KMG]?)$", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def _bucket(key: str, text: str, *, bytes_: bool) -> BucketSpec:
    m = _RATE.match(text.strip())
    if not m or (m.group(2) and not bytes_):
        what = "a rate like 10M (bytes/s)" if bytes_ else "a whole number of frames/s"
        raise NetError(f"--net {key}={text!r}: expected {what}")
    rate = int(m.group(1)) * _UNITS[m.group(2).upper()]
    if rate <= 0:
        raise NetError(f"--net {key}={text}: must be positive")
    return BucketSpec(capacity=rate, refill_per_second=float(rate))


_KEYS = ("tap", "mac", "netns", "rx-bw", "rx-ops", "tx-bw", "tx-ops")


def parse_net_option(text: str) -> NetSpec:
    """The `--net` value (see the module docstring) as a NetSpec; NetError if malformed."""
    fields: dict[str, str] = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or key not in _KEYS:
            raise NetError(f"--net {text!r}: {part!r} is not one of {', '.join(_KEYS)}=VALUE")
        if key in fields:
            raise NetError(f"--net {text!r}: {key} given twice")
        fields[key] = value.strip()
    if not fields.get("tap"):
        raise NetError(f"--net {text!r}: tap=NAME is required")
    try:
        check_name(fields["tap"])
        if "netns" in fields:
            check_netns_name(fields["netns"])
    except TapError as exc:
        raise NetError(str(exc)) from None
    mac = fields.get("mac")
    if mac is not None:
        parse_mac(mac)
    limits = {
        key: _bucket(key, fields[key], bytes_=key.endswith("bw")) if key in fields else None
        for key in ("rx-bw", "rx-ops", "tx-bw", "tx-ops")
    }
    return NetSpec(
        tap=fields["tap"], mac=mac, rx_bandwidth=limits["rx-bw"], rx_ops=limits["rx-ops"],
        tx_bandwidth=limits["tx-bw"], tx_ops=limits["tx-ops"], netns=fields.get("netns"),
    )


def _limiter(bandwidth: BucketSpec | None, ops: BucketSpec | None) -> RateLimiter | None:
    return RateLimiter(bandwidth, ops) if bandwidth or ops else None


def open_net(
    spec: NetSpec,
    events: SecurityEventSink,
    rx_limiter: RateLimiter | None = None,
    tx_limiter: RateLimiter | None = None,
    *,
    backend: NetBackend | None = None,
) -> VirtioNet:
    """A virtio-net device on TAP `spec.tap` (which must exist: the host creates TAPs).
    Limiters given here win over the spec's. NetError with one sentence on failure."""
    mac = parse_mac(spec.mac) if spec.mac is not None else random_mac()
    if backend is None:
        try:
            backend = open_tap(spec.tap, netns=spec.netns)
        except TapError as exc:
            raise NetError(str(exc)) from None
    return VirtioNet(
        events, backend, mac=mac,
        rx_limiter=rx_limiter or _limiter(spec.rx_bandwidth, spec.rx_ops),
        tx_limiter=tx_limiter or _limiter(spec.tx_bandwidth, spec.tx_ops),
    )
