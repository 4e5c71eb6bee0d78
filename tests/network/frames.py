"""Ethernet frames for the network tests: IPv4/UDP and ARP, built byte by byte (the same
bytes the nasm guests send), and a parser of what a receiver saw."""

from __future__ import annotations

import ipaddress
import struct

BROADCAST = b"\xff" * 6
ETH_IP, ETH_ARP = 0x0800, 0x0806
TEST_PORT = 4000  # UDP port of the test datagrams


def mac_bytes(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", ""))


def ip_bytes(ip: str) -> bytes:
    return ipaddress.IPv4Address(ip).packed


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def udp_frame(dst_mac: bytes, src_mac: bytes, src_ip: str, dst_ip: str, payload: bytes,
              sport: int = TEST_PORT, dport: int = TEST_PORT) -> bytes:
    """Ethernet + IPv4 + UDP (UDP checksum 0: none), padded to 60 bytes."""
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0x4000, 64, 17, 0,
                      ip_bytes(src_ip), ip_bytes(dst_ip))
    hdr = hdr[:10] + struct.pack("!H", _checksum(hdr)) + hdr[12:]
    frame = dst_mac + src_mac + struct.pack("!H", ETH_IP) + hdr + udp
    return frame.ljust(60, b"\0")


def arp_frame(src_mac: bytes, sender_mac: bytes, sender_ip: str, target_ip: str,
              dst_mac: bytes = BROADCAST, op: int = 1) -> bytes:
    """An ARP request (op 1) or reply (op 2); Ethernet source and ARP sender may differ."""
    body = struct.pack("!HHBBH6s4s6s4s", 1, ETH_IP, 6, 4, op, sender_mac, ip_bytes(sender_ip),
                       b"\0" * 6 if op == 1 else dst_mac, ip_bytes(target_ip))
    return (dst_mac + src_mac + struct.pack("!H", ETH_ARP) + body).ljust(60, b"\0")


def payload_of(frame: bytes) -> bytes | None:
    """The UDP payload of a test datagram (to TEST_PORT), or None."""
    if len(frame) < 42 or frame[12:14] != struct.pack("!H", ETH_IP) or frame[23] != 17:
        return None
    ihl = (frame[14] & 0x0F) * 4
    udp = frame[14 + ihl:]
    dport, length = struct.unpack("!2xHH", udp[:6])
    if dport != TEST_PORT:
        return None
    return udp[8:length]


def arp_sender(frame: bytes) -> tuple[bytes, str] | None:
    """(sender MAC, sender IP) of an ARP frame, or None."""
    if len(frame) < 42 or frame[12:14] != struct.pack("!H", ETH_ARP):
        return None
    return frame[22:28], str(ipaddress.IPv4Address(frame[28:32]))


DHCP_MAGIC = b"\x63\x82\x53\x63"


def dhcp_discover(mac: bytes, xid: int = 0x15F0_0001) -> bytes:
    """A DHCPDISCOVER broadcast from 0.0.0.0:68 with client hardware address `mac`."""
    bootp = struct.pack("!BBBBIHH4s4s4s4s16s64s128s", 1, 1, 6, 0, xid, 0, 0x8000, bytes(4),
                        bytes(4), bytes(4), bytes(4), mac.ljust(16, b"\0"), b"", b"")
    options = DHCP_MAGIC + bytes([53, 1, 1, 255])
    return udp_frame(BROADCAST, mac, "0.0.0.0", "255.255.255.255", bootp + options,
                     sport=68, dport=67)


def dhcp_reply(frame: bytes) -> tuple[int, str, str] | None:
    """(message type, your address, server identifier) of a DHCP reply, or None."""
    if len(frame) < 42 or frame[12:14] != struct.pack("!H", ETH_IP) or frame[23] != 17:
        return None
    ihl = (frame[14] & 0x0F) * 4
    udp = frame[14 + ihl:]
    if struct.unpack("!H", udp[2:4])[0] != 68:
        return None
    bootp = udp[8:]
    yiaddr = str(ipaddress.IPv4Address(bootp[16:20]))
    opts = bootp[240:]
    kind, server = 0, ""
    i = 0
    while i < len(opts) and opts[i] != 255:
        if opts[i] == 0:
            i += 1
            continue
        code, length = opts[i], opts[i + 1]
        value = opts[i + 2:i + 2 + length]
        if code == 53:
            kind = value[0]
        elif code == 54:
            server = str(ipaddress.IPv4Address(value))
        i += 2 + length
    return kind, yiaddr, server


def norm(frame: bytes) -> bytes:
    """`frame` without Ethernet padding (the bridge trims IPv4 frames to their IP length)."""
    if frame[12:14] == struct.pack("!H", ETH_IP) and len(frame) >= 18:
        return frame[:14 + struct.unpack("!H", frame[16:18])[0]]
    if frame[12:14] == struct.pack("!H", ETH_ARP):
        return frame[:42]
    return frame
