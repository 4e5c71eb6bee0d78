"""NetSpec, MAC addresses, the --net syntax and open_net's errors."""

from __future__ import annotations

import argparse

import pytest

from isovisor.devices.events import SecurityEventLog
from isovisor.devices.ratelimit import BucketSpec
from isovisor.devices.virtio.net_spec import (
    NetError,
    NetSpec,
    format_mac,
    open_net,
    parse_mac,
    parse_net_option,
    random_mac,
)
from tests.devices.virtio.netns import NetNs


def test_parse_mac() -> None:
    assert parse_mac("52:54:00:12:34:56") == bytes.fromhex("525400123456")
    assert parse_mac("02:AB:cd:00:00:01") == bytes.fromhex("02abcd000001")
    for bad in ("52:54:00:12:34", "52-54-00-12-34-56", "525400123456", "52:54:00:12:34:5g",
                "52:54:00:12:34:56:78", "", "52:54:00:12:34:56 "):
        with pytest.raises(NetError, match="six hex pairs"):
            parse_mac(bad)
    with pytest.raises(NetError, match="multicast"):
        parse_mac("01:00:5e:00:00:01")
    with pytest.raises(NetError, match="not a usable"):
        parse_mac("00:00:00:00:00:00")


def test_random_mac_is_unicast_and_locally_administered() -> None:
    macs = {random_mac() for _ in range(200)}
    assert len(macs) > 190
    for mac in macs:
        assert len(mac) == 6 and mac[0] & 0x03 == 0x02
        assert parse_mac(format_mac(mac)) == mac


def test_net_option() -> None:
    assert parse_net_option("tap=tap0") == NetSpec("tap0")
    spec = parse_net_option("tap=tap1,mac=02:00:00:00:00:07,rx-bw=10M,tx-ops=100")
    assert spec.tap == "tap1" and spec.mac == "02:00:00:00:00:07"
    assert spec.rx_bandwidth == BucketSpec(10 << 20, float(10 << 20))
    assert spec.tx_ops == BucketSpec(100, 100.0)
    assert spec.rx_ops is None and spec.tx_bandwidth is None
    assert parse_net_option("tap=t,tx-bw=4096").tx_bandwidth == BucketSpec(4096, 4096.0)
    assert parse_net_option("tap=t,netns=isovisor-net").netns == "isovisor-net"


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("mac=02:00:00:00:00:01", "tap=NAME is required"),
        ("tap=", "tap=NAME is required"),
        ("tap=a,tap=b", "given twice"),
        ("tap=t,speed=10", "not one of"),
        ("tap0", "not one of"),
        ("tap=has/slash", "not a valid interface name"),
        ("tap=sixteen-chars-xx", "not a valid interface name"),
        ("tap=t,mac=ff:ff:ff:ff:ff:ff", "multicast"),
        ("tap=t,rx-bw=fast", "rate like 10M"),
        ("tap=t,rx-ops=10K", "whole number"),
        ("tap=t,tx-bw=0", "positive"),
        ("tap=t,netns=../etc", "namespace name"),
        ("tap=t,netns=", "namespace name"),
    ],
)
def test_net_option_errors(text: str, match: str) -> None:
    with pytest.raises(NetError, match=match):
        parse_net_option(text)


def test_cli_option_type_reports_usage_errors() -> None:
    from isovisor.cli.net_option import net_option

    assert net_option("tap=x").tap == "x"
    with pytest.raises(argparse.ArgumentTypeError, match="tap=NAME"):
        net_option("mac=02:00:00:00:00:01")


def test_open_net_errors_name_the_tap() -> None:
    events = SecurityEventLog()
    with NetNs() as ns:
        with pytest.raises(NetError, match="TAP nosuchtap does not exist"):
            ns.call(lambda: open_net(NetSpec("nosuchtap"), events))
        with pytest.raises(NetError, match="lo exists but is not a TAP"):
            ns.call(lambda: open_net(NetSpec("lo"), events))
        with pytest.raises(NetError, match="six hex pairs"):
            ns.call(lambda: open_net(NetSpec("lo", mac="nope"), events))
        ns.add_tap("isvtap1")
        dev = ns.call(lambda: open_net(NetSpec("isvtap1", rx_ops=BucketSpec(5, 5.0)), events))
        try:
            assert dev.mac[0] & 0x03 == 0x02  # generated
            assert dev.rx_limiter is not None and dev.tx_limiter is None
            with pytest.raises(NetError, match="already in use"):
                ns.call(lambda: open_net(NetSpec("isvtap1"), events))
        finally:
            dev.close()
        dev = ns.call(lambda: open_net(NetSpec("isvtap1", mac="02:00:00:00:00:09"), events))
        assert dev.mac == bytes.fromhex("020000000009")
        dev.close()


def test_open_net_in_another_namespace() -> None:
    """netns=NAME: the TAP is found and attached in /run/netns/NAME while the caller stays
    in its own namespace (how a VM reaches the daemon's tenant networks)."""
    events = SecurityEventLog()
    with NetNs() as ns:
        ns.add_tap("isvtapns")
        with pytest.raises(NetError, match="TAP isvtapns does not exist"):
            open_net(NetSpec("isvtapns"), events)  # not in our own namespace
        dev = open_net(NetSpec("isvtapns", netns=ns.name), events)
        try:
            assert "LOWER_UP" in ns.links().split("isvtapns", 1)[1].splitlines()[0]
        finally:
            dev.close()
        with pytest.raises(NetError, match="network namespace isv-none"):
            open_net(NetSpec("isvtapns", netns="isv-none"), events)
