"""Tenant networks through isovisord: the API and CLI create, list and delete networks;
two tenants may pick the same CIDR, one tenant's networks may not overlap; a VM names
networks of its own tenant only; its NIC is a TAP on that network's bridge in the
network's own namespace (named after the daemon's `network_namespace` prefix, here a
namespace this test made), reached by the jailed worker through
`isovisor run --net tap=...,netns=...`; deleting the VM and the networks leaves no
namespace, bridge, TAP, nftables table or dnsmasq behind."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from isovisor.api.client import ApiClient, ApiError, ClientConfig
from isovisor.cli.main import main
from isovisor.host.config import DaemonConfig
from isovisor.host.daemon import Daemon
from isovisor.host.network.addressing import nic_table, tap_name
from isovisor.kvm import Kvm
from tests.api.stack import Stack, build_stack
from tests.devices.virtio.netns import NetNs, namespaces_left
from tests.devices.virtio.serial_guests import build_serial_guest, reported

ALIVE = 0x600DF00D


def _client(daemon: Daemon) -> ApiClient:
    assert daemon.admin is not None
    return ApiClient(ClientConfig(daemon.endpoint, daemon.ca.cert_path, daemon.admin.cert,
                                  daemon.admin.key))


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[tuple[Daemon, NetNs]]:
    with NetNs() as ns:
        config = DaemonConfig(state_dir=tmp_path / "state", listen="127.0.0.1:0",
                              bootstrap_admin="admin", network_namespace=ns.name)
        d = Daemon(config)
        d.start()
        try:
            yield d, ns
        finally:
            d.stop()


def _error(call: object) -> ApiError:
    with pytest.raises(ApiError) as info:
        call()  # type: ignore[operator]
    return info.value


def test_networks_and_a_vm_nic_through_the_daemon(
    daemon: tuple[Daemon, NetNs], tmp_path: Path, kvm: Kvm
) -> None:
    if os.geteuid() != 0:
        pytest.skip("LOUD SKIP: tenant networks and the worker jail need root")
    d, ns = daemon
    svc = d.service
    # net_driver: reports the link, sends one test frame (ethertype 0x88B5, not IPv4/ARP:
    # the NIC's rule drops it), reports that the device took it, and resets.
    kernel = build_serial_guest(tmp_path, "net_driver", "NO_REPLY")
    with _client(d) as c:
        for t in ("a", "b"):
            c.post("/v1/tenants", json={"name": t})
            c.put(f"/v1/tenants/{t}/images/k", content=kernel.read_bytes())
        net_a = c.post("/v1/tenants/a/networks", json={"name": "lan", "cidr": "10.61.0.0/24"})
        assert net_a["gateway"] == "10.61.0.1" and net_a["cidr"] == "10.61.0.0/24"
        # Tenant b picks the same range: each network has a namespace of its own.
        net_b = c.post("/v1/tenants/b/networks", json={"name": "blan", "cidr": "10.61.0.0/24"})
        assert net_b["gateway"] == "10.61.0.1" and net_b["cidr"] == "10.61.0.0/24"
        assert [n["name"] for n in c.get("/v1/tenants/a/networks")["items"]] == ["lan"]
        # One tenant's own networks may not overlap (a VM may have NICs on both).
        err = _error(lambda: c.post("/v1/tenants/a/networks",
                                    json={"name": "x", "cidr": "10.61.0.128/25"}))
        assert err.status == 409 and "overlaps 10.61.0.0/24 of this tenant's network 'lan'" \
            in err.message
        for cidr, what in (("10.70.0.1/24", "host bits"), ("10.70.0.0/30", "prefix length"),
                           ("127.0.0.0/16", "reserved"), ("fd00::/64", "IPv4"),
                           ("nonsense", "not a network")):
            err = _error(lambda cidr=cidr: c.post("/v1/tenants/a/networks",
                                                  json={"name": "bad", "cidr": cidr}))
            assert err.status == 400 and what in err.message, (cidr, err.message)
        # Tenant b cannot put a NIC on tenant a's network: a's names mean nothing in b.
        err = _error(lambda: c.post("/v1/tenants/b/vms", json={
            "name": "spy", "kernel": "k", "memoryMiB": 32, "nics": [{"network": "lan"}]}))
        assert err.status == 400 and "network 'lan' not found in tenant 'b'" in err.message
        err = _error(lambda: c.post("/v1/tenants/b/vms", json={
            "name": "spy", "kernel": "k", "memoryMiB": 32,
            "nics": [{"network": "/tenants/a/networks/lan"}]}))
        assert err.status == 400
        assert c.get("/v1/tenants/b/vms")["items"] == []

        vm = c.post("/v1/tenants/a/vms", json={"name": "v", "kernel": "k", "memoryMiB": 32,
                                              "nics": [{"network": "lan"}]})
        (nic,) = vm["nics"]
        assert nic["network"] == "lan" and nic["ip"] == "10.61.0.2"
        assert int(nic["mac"][:2], 16) & 0x03 == 0x02  # unicast, locally administered
        (record,) = svc.networks.store.nics_of_vm(vm["id"])
        tap = tap_name(record.id)
        out, deadline = b"", time.monotonic() + 180
        while b"600df00d" not in out:
            assert time.monotonic() < deadline, out
            out += c.raw("GET", "/v1/tenants/a/vms/v/console",
                         params={"offset": len(out), "wait": 5}).content
        values = reported(out.decode())
        # magic, version, net device, features, FEATURES_OK, link up, TX used id and len
        assert values[0] == 0x74726976 and values[2] == 1 and values[4:8] == [0x0B, 1, 0, 0]
        assert values[-1] == ALIVE
        # The frame left the guest through the worker onto this VM's TAP, where its rule
        # (and nothing else) dropped it.
        plan_a = svc.networks.store.get("a", "lan").plan
        ns_a = NetNs.existing(svc.networks.plumbing.netns(plan_a))
        assert ns_a.name == f"{ns.name}-{plan_a.id}"
        rules = ns_a.run("nft", "list", "table", "netdev", nic_table(record.id)).stdout
        assert f'device "{tap}"' in rules and "ether saddr != " + nic["mac"] in rules
        assert sum(int(x) for x in re.findall(r"counter packets (\d+)", rules)) == 1
        assert f"master {plan_a.bridge}" in ns_a.links()
        assert tap not in ns.links()  # nothing of a network in the prefix's namespace

        err = _error(lambda: c.delete("/v1/tenants/a/networks/lan"))
        assert err.status == 409 and "still has VM NICs" in err.message
        c.delete("/v1/tenants/b/images/k")
        err = _error(lambda: c.delete("/v1/tenants/b"))
        assert err.status == 409 and "networks" in err.message
        c.delete("/v1/tenants/a/vms/v")
        inv = svc.networks.inventory()
        assert tap not in inv.taps and f"netdev {nic_table(record.id)}" not in inv.tables
        assert len(inv.namespaces) == len(inv.bridges) == len(inv.dnsmasq_pids) == 2
        c.delete("/v1/tenants/a/networks/lan")
        c.delete("/v1/tenants/b/networks/blan")
        assert c.get("/v1/tenants/a/networks")["items"] == []
        c.delete("/v1/tenants/b")  # empty now
    inv = svc.networks.inventory()
    assert inv.empty, inv
    assert namespaces_left() == [ns.name]  # the networks' namespaces are gone


def test_network_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                     monkeypatch: pytest.MonkeyPatch) -> None:
    if os.geteuid() != 0:
        pytest.skip("LOUD SKIP: tenant networks need root")
    stack: Stack = build_stack(tmp_path / "stack")
    try:
        monkeypatch.setenv("ISOVISOR_CONFIG", str(stack.cli_admin_config(tmp_path / "cli")))
        stack.service.tenants.create("t")
        capsys.readouterr()
        assert main(["network", "create", "lan", "--cidr", "10.63.0.0/24", "-t", "t"]) == 0
        out = capsys.readouterr().out
        assert out.split()[:4] == ["NAME", "CIDR", "GATEWAY", "CREATED"]
        assert "10.63.0.0/24" in out and "10.63.0.1" in out
        assert main(["network", "list", "-t", "t", "-o", "json"]) == 0
        assert [n["name"] for n in json.loads(capsys.readouterr().out)] == ["lan"]
        assert main(["network", "create", "bad", "--cidr", "10.63.0.0/33", "-t", "t"]) == 1
        assert "CIDR" in capsys.readouterr().err
        assert main(["network", "delete", "lan", "-t", "t"]) == 0
        assert "deleted" in capsys.readouterr().out
        assert stack.service.networks.inventory().empty
    finally:
        stack.close()


def test_a_restart_rebuilds_what_the_records_say(tmp_path: Path) -> None:
    """The host lost its network objects (a reboot that took a network's namespace, an
    operator's `ip link del`), and a namespace no record knows is left from a crash: the
    next HostService.open() rebuilds namespaces, bridges, TAPs, rules and dnsmasqs from
    the records and deletes the stray namespace."""
    if os.geteuid() != 0:
        pytest.skip("LOUD SKIP: tenant networks need root")
    from isovisor.host.service import HostService
    from isovisor.host.vms import VmSpec
    from tests.api.stack import InertRunner

    with NetNs() as ns:
        state = tmp_path / "state"
        svc = HostService(state, runner=InertRunner(tmp_path / "run"),  # type: ignore[arg-type]
                          network_namespace=ns.name)
        svc.open()
        for t in ("a", "b"):
            svc.tenants.create(t)
        for t in ("a", "b"):
            svc.images.put(t, "k", [b"\x7fELF"])
        net = svc.networks.create("a", "lan", "10.64.0.0/24")
        net_b = svc.networks.create("b", "lan", "10.64.0.0/24")  # the same range
        vm = svc.create_vm("a", VmSpec(name="v", kernel="k", nics=("lan",)), False, "t")
        vm_b = svc.create_vm("b", VmSpec(name="v", kernel="k", nics=("lan",)), False, "t")
        # The same address in both tenants; each TAP opened in its own network's namespace.
        assert vm.nics[0].ip == vm_b.nics[0].ip == "10.64.0.2"
        assert vm.nics[0].mac != vm_b.nics[0].mac
        (opt_a,), (opt_b,) = (svc.networks.net_options(v.id) for v in (vm, vm_b))
        assert opt_a.endswith(f",netns={ns.name}-{net.id}")
        assert opt_b.endswith(f",netns={ns.name}-{net_b.id}")
        before = svc.networks.inventory()
        plumbing = svc.networks.plumbing
        assert sorted(before.namespaces) == sorted(plumbing.netns(n.plan) for n in (net, net_b))
        svc.close()
        # a's namespace gone with its dnsmasq (a reboot); b's bridge and rules deleted.
        for pid in before.dnsmasq_pids:
            os.kill(pid, 9)
        subprocess.run(["ip", "netns", "del", plumbing.netns(net.plan)], check=True)
        ns_b = NetNs.existing(plumbing.netns(net_b.plan))
        ns_b.run("ip", "link", "del", net_b.plan.bridge)
        ns_b.run("nft", "flush", "ruleset")
        # A namespace of this prefix no record names (a crash mid-create), with a bridge.
        stray = f"{ns.name}-0badcafe"
        subprocess.run(["ip", "netns", "add", stray], check=True)
        subprocess.run(["ip", "-n", stray, "link", "add", "isvb-0badcafe", "type", "bridge"],
                       check=True)
        lost = svc.networks.inventory()
        assert sorted(lost.namespaces) == sorted([plumbing.netns(net_b.plan), stray])
        assert (lost.bridges, lost.taps, lost.tables) == (
            ("isvb-0badcafe",), (tap_name(vm_b.nics[0].id),), ())  # b's TAP, detached
        again = HostService(state, runner=InertRunner(tmp_path / "run"),  # type: ignore[arg-type]
                            network_namespace=ns.name)
        try:
            again.open()
            after = again.networks.inventory()
            assert (sorted(after.namespaces), sorted(after.bridges), sorted(after.taps),
                    sorted(after.tables)) == (sorted(before.namespaces), sorted(before.bridges),
                                              sorted(before.taps), sorted(before.tables))
            assert len(before.taps) == 2 and len(before.tables) == 4
            assert len(after.dnsmasq_pids) == 2
            assert stray not in namespaces_left()
            ns_a = NetNs.existing(plumbing.netns(net.plan))
            assert f"master {net.plan.bridge}" in ns_a.links()
            assert "ip saddr " + vm.nics[0].ip + " accept" in ns_a.run(
                "nft", "list", "table", "netdev", nic_table(vm.nics[0].id)).stdout
            assert "inet 10.64.0.1/24" in ns_b.run("ip", "-o", "addr", "show",
                                                    net_b.plan.bridge).stdout
            assert f"master {net_b.plan.bridge}" in ns_b.links()  # b's TAP back on it
        finally:
            again.close()


def test_network_namespace_setting(tmp_path: Path) -> None:
    from isovisor.host.config import ConfigError

    toml = tmp_path / "isovisord.toml"
    assert DaemonConfig().network_namespace == "isovisor"
    toml.write_text('network_namespace = "tenants-1"\n')
    assert DaemonConfig.load(toml).network_namespace == "tenants-1"
    assert DaemonConfig.load(toml, network_namespace="x").network_namespace == "x"
    toml.write_text(f'network_namespace = "{"n" * 55}"\n')  # + "-ID": 64, the most
    assert DaemonConfig.load(toml).network_namespace == "n" * 55
    for bad in ('"../etc"', '""', "3", '"a b"', f'"{"n" * 56}"'):
        toml.write_text(f"network_namespace = {bad}\n")
        with pytest.raises(ConfigError, match="network_namespace"):
            DaemonConfig.load(toml)
