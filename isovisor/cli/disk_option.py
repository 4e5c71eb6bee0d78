"""`--disk PATH[,readonly][,direct][,serial=ID][,bw=RATE][,iops=N][,bw-burst=SIZE][,iops-burst=N]
[,keyfile=FILE|keyfd=N]`.

PATH comes first; a comma inside it is written twice (`a,,b.img` is the file `a,b.img`),
as QEMU does. Flags and `key=value` options follow in any order, each at most once:

- `readonly` (or `ro`): the guest sees VIRTIO_BLK_F_RO and every write fails; the image is
  opened O_RDONLY.
- `direct`: O_DIRECT (no host page cache).
- `serial=ID`: what VIRTIO_BLK_T_GET_ID returns (at most 20 ASCII characters).
- `bw=RATE`: data bytes per second (IN and OUT), e.g. `10M`, `512K`, `1G`, or plain bytes;
  `iops=N`: requests per second. Each bucket holds a tenth of a second's worth (at least
  one request's worth is always let through, leaving the bucket in debt);
  `bw-burst=SIZE` / `iops-burst=N` add a one-time allowance on top, spent first.
- `keyfile=FILE`: the image is encrypted at rest with AES-XTS-256 (512-byte sectors,
  plain64 tweak: dm-crypt's aes-xts-plain64) under the 64-byte key held in FILE (exactly
  64 bytes); `keyfd=N`: the next 64 bytes read from the open descriptor N (the daemon
  hands keys to `isovisor run` through a pipe, so no key is ever written to a file).
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

from isovisor.devices.ratelimit import BucketSpec
from isovisor.devices.virtio.blk_disk import DiskSpec

SYNTAX = "PATH[,readonly][,direct][,serial=ID][,bw=RATE][,iops=N][,keyfile=FILE|keyfd=N]"
_BYTES = re.compile(r"^(\d+)([KMGT]?)(?:i?B)?$", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_FLAGS = {"readonly": "readonly", "ro": "readonly", "direct": "direct"}
_KEYS = ("serial", "bw", "iops", "bw-burst", "iops-burst", "keyfile", "keyfd")
KEY_BYTES = 64  # AES-XTS-256: two 256-bit keys
BUCKET_SECONDS = 0.1  # a bucket holds this long's worth of tokens


def _split(text: str) -> list[str]:
    """Split on single commas; a doubled comma is a literal one."""
    parts, cur, i = [], [], 0
    while i < len(text):
        if text[i] == ",":
            if text[i + 1 : i + 2] == ",":
                cur.append(",")
                i += 2
                continue
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(text[i])
        i += 1
    parts.append("".join(cur))
    return parts


def _bytes(key: str, value: str) -> int:
    m = _BYTES.match(value.strip())
    if not m or int(m.group(1)) == 0:
        raise argparse.ArgumentTypeError(
            f"--disk {key}={value!r}: expected a positive size like 10M, 512K or 65536"
        )
    return int(m.group(1)) * _UNITS[m.group(2).upper()]


def _count(key: str, value: str) -> int:
    if not value.isdigit() or int(value) == 0:
        raise argparse.ArgumentTypeError(f"--disk {key}={value!r}: expected a positive integer")
    return int(value)


def _bucket(rate: int | None, burst: int | None, what: str) -> BucketSpec | None:
    if rate is None:
        if burst is not None:
            raise argparse.ArgumentTypeError(f"--disk {what}-burst needs {what}=")
        return None
    capacity = max(1, int(rate * BUCKET_SECONDS))
    return BucketSpec(capacity, float(rate), burst or 0)


def _read_key(text: str, values: dict[str, str]) -> bytes | None:
    """The disk key from keyfile= or keyfd= (ArgumentTypeError naming the problem)."""
    if "keyfile" in values and "keyfd" in values:
        raise argparse.ArgumentTypeError(f"--disk {text!r}: keyfile= and keyfd= exclude "
                                         "each other")
    if "keyfile" in values:
        try:
            with open(values["keyfile"], "rb") as f:
                key = f.read(KEY_BYTES + 1)
        except OSError as exc:
            raise argparse.ArgumentTypeError(
                f"--disk keyfile={values['keyfile']!r}: {exc.strerror}") from None
        if len(key) != KEY_BYTES:
            size = f"more than {KEY_BYTES}" if len(key) > KEY_BYTES else str(len(key))
            raise argparse.ArgumentTypeError(
                f"--disk keyfile={values['keyfile']!r}: a key file holds exactly "
                f"{KEY_BYTES} bytes, this one {size}")
        return key
    if "keyfd" in values:
        fd = _count("keyfd", values["keyfd"]) if values["keyfd"] != "0" else 0
        key = b""
        try:
            while len(key) < KEY_BYTES:
                chunk = os.read(fd, KEY_BYTES - len(key))
                if not chunk:
                    break
                key += chunk
        except OSError as exc:
            raise argparse.ArgumentTypeError(f"--disk keyfd={fd}: {exc.strerror}") from None
        if len(key) != KEY_BYTES:
            raise argparse.ArgumentTypeError(
                f"--disk keyfd={fd}: expected {KEY_BYTES} key bytes, got {len(key)}")
        return key
    return None


def parse_disk_option(text: str) -> DiskSpec:
    """The argparse type of --disk (ArgumentTypeError with the reason on bad syntax)."""
    path, *opts = _split(text)
    if not path:
        raise argparse.ArgumentTypeError(f"--disk {text!r}: expected {SYNTAX}")
    flags: dict[str, bool] = {}
    values: dict[str, str] = {}
    for opt in opts:
        key, eq, value = opt.partition("=")
        key = key.strip().lower()
        if not eq and key in _FLAGS:
            name = _FLAGS[key]
            if name in flags:
                raise argparse.ArgumentTypeError(f"--disk {text!r}: {key} given twice")
            flags[name] = True
        elif eq and key in _KEYS:
            if key in values:
                raise argparse.ArgumentTypeError(f"--disk {text!r}: {key}= given twice")
            values[key] = value
        else:
            raise argparse.ArgumentTypeError(
                f"--disk {text!r}: unknown option {opt!r} (expected readonly, direct, "
                f"serial=, bw=, iops=, bw-burst=, iops-burst=, keyfile=, keyfd=)"
            )
    bw = _bytes("bw", values["bw"]) if "bw" in values else None
    iops = _count("iops", values["iops"]) if "iops" in values else None
    bw_burst = _bytes("bw-burst", values["bw-burst"]) if "bw-burst" in values else None
    iops_burst = _count("iops-burst", values["iops-burst"]) if "iops-burst" in values else None
    try:
        return DiskSpec(
            Path(path),
            readonly=flags.get("readonly", False),
            direct=flags.get("direct", False),
            serial=values.get("serial"),
            bandwidth=_bucket(bw, bw_burst, "bw"),
            ops=_bucket(iops, iops_burst, "iops"),
            key=_read_key(text, values),
        )
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
