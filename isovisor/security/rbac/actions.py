"""Every action the management API checks. An endpoint names exactly one of these; role
definitions grant them through patterns."""

from __future__ import annotations

from typing import Final

TENANTS_READ: Final = "tenants/read"
TENANTS_WRITE: Final = "tenants/write"
TENANTS_DELETE: Final = "tenants/delete"
QUOTAS_READ: Final = "quotas/read"
QUOTAS_WRITE: Final = "quotas/write"
VMS_READ: Final = "vms/read"
VMS_WRITE: Final = "vms/write"
VMS_DELETE: Final = "vms/delete"
VMS_START: Final = "vms/start/action"
VMS_STOP: Final = "vms/stop/action"
VMS_PAUSE: Final = "vms/pause/action"
VMS_RESUME: Final = "vms/resume/action"
VMS_CONSOLE: Final = "vms/console/action"
VMS_METRICS: Final = "vms/metrics/read"
IMAGES_READ: Final = "images/read"
IMAGES_WRITE: Final = "images/write"
IMAGES_DELETE: Final = "images/delete"
NETWORKS_READ: Final = "networks/read"
NETWORKS_WRITE: Final = "networks/write"
NETWORKS_DELETE: Final = "networks/delete"
DISKS_READ: Final = "disks/read"
DISKS_WRITE: Final = "disks/write"
DISKS_DELETE: Final = "disks/delete"
ROLE_ASSIGNMENTS_READ: Final = "roleAssignments/read"
ROLE_ASSIGNMENTS_WRITE: Final = "roleAssignments/write"
ROLE_ASSIGNMENTS_DELETE: Final = "roleAssignments/delete"
ROLE_DEFINITIONS_READ: Final = "roleDefinitions/read"
ROLE_DEFINITIONS_WRITE: Final = "roleDefinitions/write"
ROLE_DEFINITIONS_DELETE: Final = "roleDefinitions/delete"
AUDIT_READ: Final = "audit/read"
HOST_READ: Final = "host/read"

ALL_ACTIONS: Final[tuple[str, ...]] = (
    TENANTS_READ, TENANTS_WRITE, TENANTS_DELETE, QUOTAS_READ, QUOTAS_WRITE,
    VMS_READ, VMS_WRITE, VMS_DELETE, VMS_START, VMS_STOP, VMS_PAUSE, VMS_RESUME,
    VMS_CONSOLE, VMS_METRICS, IMAGES_READ, IMAGES_WRITE, IMAGES_DELETE,
    NETWORKS_READ, NETWORKS_WRITE, NETWORKS_DELETE, DISKS_READ, DISKS_WRITE, DISKS_DELETE,
    ROLE_ASSIGNMENTS_READ, ROLE_ASSIGNMENTS_WRITE, ROLE_ASSIGNMENTS_DELETE,
    ROLE_DEFINITIONS_READ, ROLE_DEFINITIONS_WRITE, ROLE_DEFINITIONS_DELETE,
    AUDIT_READ, HOST_READ,
)
