"""Request and response bodies (camelCase JSON; unknown fields are refused)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from isovisor.host.models import Image, Quota, RoleAssignment, Tenant, Vm
from isovisor.security.rbac import RoleDefinition

NAME = r"^[a-z0-9][a-z0-9-]{0,62}$"
PRINCIPAL = r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$"


class Model(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True,
                              extra="forbid")


class QuotaBody(Model):
    max_vcpus: int = Field(ge=0, le=4096)
    max_memory_mib: int = Field(ge=0, le=16 << 20, validation_alias="maxMemoryMiB",
                                serialization_alias="maxMemoryMiB")
    max_vms: int = Field(ge=0, le=100_000)

    def to_quota(self) -> Quota:
        return Quota(self.max_vcpus, self.max_memory_mib, self.max_vms)

    @classmethod
    def of(cls, q: Quota) -> QuotaBody:
        return cls(max_vcpus=q.max_vcpus, max_memory_mib=q.max_memory_mib, max_vms=q.max_vms)


class TenantCreate(Model):
    name: str = Field(pattern=NAME)
    description: str = Field(default="", max_length=400)
    quota: QuotaBody | None = None


class TenantOut(Model):
    name: str
    description: str
    quota: QuotaBody
    created_at: str

    @classmethod
    def of(cls, t: Tenant) -> TenantOut:
        return cls(name=t.name, description=t.description, quota=QuotaBody.of(t.quota),
                   created_at=t.created_at)


class QuotaOut(Model):
    quota: QuotaBody
    usage: QuotaBody


class DiskBody(Model):
    image: str | None = Field(default=None, pattern=NAME,
                              description="name of an image of this tenant")
    disk: str | None = Field(default=None, pattern=NAME,
                             description="name of a disk of this tenant (encrypted at rest); "
                             "exactly one of image and disk")
    readonly: bool = Field(default=False, description="read-only; a writable image gets a "
                           "private encrypted copy per VM")


class DiskCreate(Model):
    name: str = Field(pattern=NAME)
    size_mib: int = Field(ge=1, le=1 << 20, validation_alias="sizeMiB",
                          serialization_alias="sizeMiB")


class DiskOut(Model):
    tenant: str
    name: str
    size_mib: int = Field(validation_alias="sizeMiB", serialization_alias="sizeMiB")
    encryption: str = Field(description="always aes-xts-plain64 (AES-XTS-256, 512-byte "
                            "sectors); the key never leaves the host")
    created_at: str


class DiskPage(Model):
    items: list[DiskOut]
    next_page_token: str | None


class NicBody(Model):
    network: str = Field(pattern=NAME, description="name of a network of this tenant")


class NicOut(Model):
    network: str
    mac: str
    ip: str


class NetworkCreate(Model):
    name: str = Field(pattern=NAME)
    cidr: str = Field(max_length=18, description="IPv4 network, /16 to /29, e.g. 10.8.0.0/24")


class NetworkOut(Model):
    tenant: str
    name: str
    cidr: str
    gateway: str = Field(description="the host's address: DHCP server, no routing")
    created_at: str


class NetworkPage(Model):
    items: list[NetworkOut]
    next_page_token: str | None


class VmCreate(Model):
    name: str = Field(pattern=NAME)
    kernel: str = Field(pattern=NAME, description="name of an image of this tenant")
    initrd: str | None = Field(default=None, pattern=NAME)
    cmdline: str = Field(default="", max_length=2048)
    vcpus: int = Field(default=1, ge=1, le=64)
    memory_mib: int = Field(default=256, ge=16, le=65536, validation_alias="memoryMiB",
                            serialization_alias="memoryMiB")
    disks: list[DiskBody] = Field(default_factory=list, max_length=8,
                                  description="virtio-blk disks, vda, vdb, ... in order")
    rng: bool = Field(default=False, description="add a virtio-rng device")
    nics: list[NicBody] = Field(default_factory=list, max_length=4,
                                description="virtio-net NICs, eth0, eth1, ... in order, each on "
                                "a network of this tenant (fixed MAC and IP, DHCP)")
    start: bool = Field(default=True, description="start the VM once created")


class VmOut(Model):
    tenant: str
    name: str
    id: str
    vcpus: int
    memory_mib: int = Field(validation_alias="memoryMiB", serialization_alias="memoryMiB")
    kernel: str
    initrd: str | None
    cmdline: str
    disks: list[DiskBody]
    rng: bool
    nics: list[NicOut] = Field(default_factory=list)
    state: str
    desired_state: str
    last_exit_status: int | None
    last_stop_reason: str | None
    created_at: str
    started_at: str | None

    @classmethod
    def of(cls, v: Vm) -> VmOut:
        return cls(tenant=v.tenant, name=v.name, id=v.id, vcpus=v.vcpus,
                   memory_mib=v.memory_mib, kernel=v.kernel, initrd=v.initrd,
                   cmdline=v.cmdline,
                   disks=[DiskBody(image=d.image, disk=d.disk, readonly=d.readonly)
                          for d in v.disks],
                   rng=v.rng, nics=[NicOut(network=n.network, mac=n.mac, ip=n.ip)
                                    for n in v.nics],
                   state=v.state.value, desired_state=v.desired,
                   last_exit_status=v.last_exit_status, last_stop_reason=v.last_stop_reason,
                   created_at=v.created_at, started_at=v.started_at)


class VmMetricsOut(Model):
    state: str
    cpu_seconds: float
    rss_bytes: int
    console_bytes: int


class ImageOut(Model):
    tenant: str
    name: str
    size: int
    sha256: str
    created_at: str

    @classmethod
    def of(cls, i: Image) -> ImageOut:
        return cls(tenant=i.tenant, name=i.name, size=i.size, sha256=i.sha256,
                   created_at=i.created_at)


class RoleAssignmentCreate(Model):
    principal: str = Field(pattern=PRINCIPAL)
    role: str = Field(min_length=1, max_length=63)
    scope: str = Field(min_length=1, max_length=200)


class RoleAssignmentOut(Model):
    id: str
    principal: str
    role: str
    scope: str
    created_at: str
    created_by: str

    @classmethod
    def of(cls, a: RoleAssignment) -> RoleAssignmentOut:
        return cls(id=a.id, principal=a.principal, role=a.role, scope=a.scope,
                   created_at=a.created_at, created_by=a.created_by)


class RoleDefinitionCreate(Model):
    name: str = Field(min_length=1, max_length=63)
    description: str = Field(default="", max_length=400)
    actions: list[str] = Field(min_length=1, max_length=64)
    not_actions: list[str] = Field(default_factory=list, max_length=64)
    scope: str = Field(min_length=1, max_length=200)


class RoleDefinitionOut(Model):
    name: str
    description: str
    actions: list[str]
    not_actions: list[str]
    scope: str
    builtin: bool

    @classmethod
    def of(cls, r: RoleDefinition) -> RoleDefinitionOut:
        return cls(name=r.name, description=r.description, actions=list(r.actions),
                   not_actions=list(r.not_actions), scope=str(r.scope), builtin=r.builtin)


class WhoAmI(Model):
    principal: str
    certificate_serial: str
    certificate_not_after: str
    client: str
    assignments: list[RoleAssignmentOut]


class HostInfo(Model):
    version: str
    tenants: int
    vms: int
    vms_running: int


class TenantPage(Model):
    items: list[TenantOut]
    next_page_token: str | None


class VmPage(Model):
    items: list[VmOut]
    next_page_token: str | None


class ImagePage(Model):
    items: list[ImageOut]
    next_page_token: str | None


class RoleAssignmentPage(Model):
    items: list[RoleAssignmentOut]
    next_page_token: str | None


class RoleDefinitionList(Model):
    items: list[RoleDefinitionOut]
