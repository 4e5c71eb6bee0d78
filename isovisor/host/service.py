"""The daemon's state and operations, below the API: one object wiring the stores, the
runner and the lifecycle. Authorization happens above this layer (isovisor.api)."""

from __future__ import annotations

import logging
from pathlib import Path

from isovisor.host.access import AccessStore
from isovisor.host.db import Database
from isovisor.host.disks import DiskStore
from isovisor.host.errors import Conflict
from isovisor.host.idempotency import IdempotencyStore
from isovisor.host.images import ImageStore
from isovisor.host.keys.hierarchy import KeyHierarchy
from isovisor.host.keys.master_key import FileMasterKey
from isovisor.host.lifecycle import VmLifecycle
from isovisor.host.models import RoleAssignment, Vm
from isovisor.host.network.plumbing import NetworkPlumbing
from isovisor.host.network.service import NetworkService
from isovisor.host.network.store import NetworkStore
from isovisor.host.runner import SubprocessRunner, VmRunner
from isovisor.host.tenants import TenantStore
from isovisor.host.vms import VmSpec, VmStore
from isovisor.security.rbac import ROOT, Scope

log = logging.getLogger(__name__)
DB_FILE = "isovisord.sqlite3"
MASTER_KEY_FILE = "storage-keys/master.key"  # in a 0700 directory of its own
# Prefix of tenant networks' namespaces: network ID's bridge, TAPs, nftables and dnsmasq
# live in namespace PREFIX-ID.
DEFAULT_NETWORK_NAMESPACE = "isovisor"


class HostService:
    def __init__(self, state_dir: Path, runner: VmRunner | None = None,
                 network_namespace: str = DEFAULT_NETWORK_NAMESPACE) -> None:
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.state_dir = state_dir
        self.db = Database(state_dir / DB_FILE)
        self.tenants = TenantStore(self.db)
        self.images = ImageStore(self.db, state_dir / "images")
        # Encrypted disks (issue #9): keys under the master key in a root-only file (a
        # TPM-sealed MasterKeySource replaces FileMasterKey once issue #7 offers sealing).
        self.disks = DiskStore(self.db, state_dir / "volumes",
                               KeyHierarchy(FileMasterKey(state_dir / MASTER_KEY_FILE)))
        self.vms = VmStore(self.db)
        self.access = AccessStore(self.db)
        self.idempotency = IdempotencyStore(self.db)
        self.runner: VmRunner = runner if runner is not None else SubprocessRunner(
            state_dir / "run")
        self.lifecycle = VmLifecycle(self.vms, self.images, self.runner)
        self.lifecycle.disks = self.disks
        self.networks = NetworkService(NetworkStore(self.db), NetworkPlumbing(
            network_namespace, state_dir / "net"))
        self.lifecycle.net_options = self.networks.net_options
        self._open = False

    def open(self) -> dict[str, str]:
        """Reconcile with the VM processes that survived a restart; watch for exits."""
        self.disks.open()  # the master key, from the source the daemon chose
        self.networks.reconcile()  # bridges, TAPs, rules, dnsmasqs before any VM runs
        report = self.lifecycle.reconcile()
        for vm_id, what in report.items():
            log.info("reconcile: VM %s: %s", vm_id, what)
        self.lifecycle.start_watcher()
        self._open = True
        return report

    def close(self) -> None:
        """Stop watching. Running VMs keep running (a restart re-adopts them)."""
        if self._open:
            self.lifecycle.stop_watcher()
            self._open = False
        self.db.close()

    def bootstrap_admin(self, principal: str) -> RoleAssignment | None:
        """Make `principal` a Host Admin at `/` unless it already is."""
        try:
            return self.access.assign(principal, "Host Admin", ROOT, created_by="bootstrap")
        except Conflict:
            return None

    def create_vm(self, tenant: str, spec: VmSpec, start: bool, actor: str) -> Vm:
        vm = self.vms.create(tenant, spec)
        if vm.nics:
            try:
                self.networks.attach_vm(vm.id)
            except BaseException:
                nics = self.networks.store.nics_of_vm(vm.id)
                self.vms.delete(vm.id)
                self.networks.detach(nics)
                raise
        self.lifecycle.created(vm, actor)
        if start:
            vm = self.lifecycle.start(vm, actor)
        return vm

    def delete_vm(self, vm: Vm, actor: str) -> None:
        nics = self.networks.store.nics_of_vm(vm.id)
        self.lifecycle.delete(vm, actor)
        self.networks.detach(nics)  # the VM's TAPs and rules go with it
        self.access.delete_scope(Scope.vm(vm.tenant, vm.name))

    def delete_tenant(self, name: str) -> None:
        """Its key row goes with it (ON DELETE CASCADE): the tenant key is destroyed."""
        if self.disks.count(name):
            raise Conflict(f"tenant {name!r} still has disks; delete them first")
        self.tenants.delete(name)
        self.disks.checkpoint()
