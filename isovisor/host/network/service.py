"""Tenant networks as the daemon uses them: the records (NetworkStore) and the host
objects (NetworkPlumbing) kept in step. A network's bridge, guard rules and dnsmasq exist
from its creation to its deletion; a NIC's TAP and rules from its VM's creation to its
VM's deletion (a stopped VM keeps its address, MAC and TAP); dnsmasq always knows exactly
the NICs on its network. `reconcile` replays everything after a daemon restart (or a
reboot that deleted the namespaces) and deletes the namespaces of networks no record
knows (a crash between building and recording, or deleting and forgetting): one daemon
per `network_namespace` prefix."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable

from isovisor.host.errors import Conflict
from isovisor.host.network.addressing import tap_name
from isovisor.host.network.plumbing import Inventory, NetworkPlumbing
from isovisor.host.network.store import Network, NetworkStore, Nic

log = logging.getLogger(__name__)


class NetworkService:
    def __init__(self, store: NetworkStore, plumbing: NetworkPlumbing) -> None:
        self.store = store
        self.plumbing = plumbing
        self._lock = threading.Lock()  # one host change at a time (dnsmasq restarts)

    @property
    def netns_prefix(self) -> str:
        return self.plumbing.netns_prefix

    def create(self, tenant: str, name: str, cidr: str) -> Network:
        network = self.store.create(tenant, name, cidr)
        try:
            with self._lock:
                self.plumbing.ensure_network(network.plan, [])
        except BaseException:
            with self._lock:
                self.plumbing.remove_network(network.plan)
            self.store.delete(network)
            raise
        return network

    def delete(self, network: Network) -> None:
        if self.store.nics_of_network(network.id):
            raise Conflict(f"network {network.name!r} still has VM NICs; delete those VMs "
                           "first")
        with self._lock:
            self.plumbing.remove_network(network.plan)
            try:
                self.store.delete(network)
            except Conflict:  # a VM took a NIC on it meanwhile: put the network back
                self._ensure_network(network)
                raise

    def _ensure_network(self, network: Network) -> None:
        nics = self.store.nics_of_network(network.id)
        self.plumbing.ensure_network(network.plan, [n.plan for n in nics])
        for nic in nics:
            self.plumbing.ensure_nic(nic.plan)

    def attach_vm(self, vm_id: str) -> list[Nic]:
        """Build the TAPs and rules of a new VM's NICs; tell each dnsmasq about them."""
        nics = self.store.nics_of_vm(vm_id)
        with self._lock:
            for nic in nics:
                self.plumbing.ensure_nic(nic.plan)
            self._refresh({nic.network.id: nic.network for nic in nics}.values())
        return nics

    def detach(self, nics: list[Nic]) -> None:
        """Remove the TAPs and rules of NICs whose records are gone (a deleted VM)."""
        with self._lock:
            for nic in nics:
                self.plumbing.remove_nic(nic.plan)
            self._refresh({nic.network.id: nic.network for nic in nics}.values())

    def _refresh(self, networks: Iterable[Network]) -> None:
        for network in networks:
            nics = self.store.nics_of_network(network.id)
            self.plumbing.refresh_dhcp(network.plan, [n.plan for n in nics])

    def net_options(self, vm_id: str) -> tuple[str, ...]:
        """`isovisor run --net` values for a VM's NICs (each TAP in its network's
        namespace)."""
        return tuple(f"tap={tap_name(n.id)},mac={n.mac},"
                     f"netns={self.plumbing.netns(n.network.plan)}"
                     for n in self.store.nics_of_vm(vm_id))

    def reconcile(self) -> None:
        """Make the host match the records: every network and NIC rebuilt (idempotent),
        every namespace of this prefix that no network record names deleted."""
        networks = self.store.all()
        known = {n.id for n in networks}
        with self._lock:
            for orphan in self.plumbing.network_ids():
                if orphan not in known:
                    log.warning("deleting the namespace of unknown network %s", orphan)
                    try:
                        self.plumbing.remove_namespace(orphan)
                    except Exception:
                        log.exception("cannot delete the namespace of network %s", orphan)
            for network in networks:
                try:
                    self._ensure_network(network)
                except Exception:
                    log.exception("cannot rebuild network %s/%s", network.tenant, network.name)

    def inventory(self) -> Inventory:
        return self.plumbing.inventory()
