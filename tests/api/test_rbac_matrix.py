"""The RBAC matrix, generated from the OpenAPI document: every endpoint x every built-in
role x {in scope, out of scope, no certificate, expired certificate, certificate from
another CA, revoked certificate}, against a hand-written table of expected permissions.
Real certificates, a real uvicorn server on loopback, real TLS 1.3.

The expected table below is written out by hand (explicit action sets per role), not
computed by the RBAC engine under test."""

from __future__ import annotations

import datetime as dt
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from isovisor.host.service import HostService
from isovisor.host.vms import VmSpec
from isovisor.security.pki import CertificateAuthority
from isovisor.security.rbac import Scope
from tests.api.stack import Identity, Stack, build_stack

R, W, D = "read", "write", "delete"
VM_OPS = {"vms/start/action", "vms/stop/action", "vms/pause/action", "vms/resume/action",
          "vms/console/action"}
ALL = {
    "tenants/read", "tenants/write", "tenants/delete", "quotas/read", "quotas/write",
    "vms/read", "vms/write", "vms/delete", "vms/metrics/read", *VM_OPS,
    "images/read", "images/write", "images/delete",
    "networks/read", "networks/write", "networks/delete",
    "disks/read", "disks/write", "disks/delete",
    "roleAssignments/read", "roleAssignments/write", "roleAssignments/delete",
    "roleDefinitions/read", "roleDefinitions/write", "roleDefinitions/delete",
    "audit/read", "host/read",
}
READS = {a for a in ALL if a.endswith("/read")}
EXPECTED_ROLE_ACTIONS: dict[str, set[str]] = {
    "Owner": ALL - {"tenants/write", "tenants/delete", "quotas/write", "audit/read",
                    "host/read"},
    "Contributor": ALL - {"tenants/write", "tenants/delete", "quotas/write", "audit/read",
                          "host/read", "roleAssignments/write", "roleAssignments/delete",
                          "roleDefinitions/write", "roleDefinitions/delete"},
    "Reader": READS - {"audit/read", "host/read"},
    "VM Operator": {"tenants/read", "images/read", "vms/read", "vms/metrics/read", *VM_OPS},
    "Auditor": set(READS),
    "Host Admin": set(ALL),
}
TENANT_ROLES = ["Owner", "Contributor", "Reader", "VM Operator", "Auditor"]
BIG = {"maxVcpus": 4096, "maxMemoryMiB": 1 << 24, "maxVms": 100000}


@dataclass
class Target:
    params: dict[str, str]
    body: Any = None
    content: bytes | None = None
    query: dict[str, str] | None = None


_counter = itertools.count()


def _n() -> int:
    return next(_counter)


def _vm(svc: HostService, tenant: str, state: str = "stopped") -> str:
    name = f"vm-{_n()}"
    vm = svc.create_vm(tenant, VmSpec(name=name, kernel="k"), start=state != "stopped",
                       actor="test")
    if state == "paused":
        svc.lifecycle.pause(vm, "test")
    return name


def _cidr() -> str:
    n = _n()
    return f"10.{100 + n // 250}.{n % 250}.0/29"


def _network(svc: HostService, tenant: str) -> str:
    name = f"net-{_n()}"
    svc.networks.create(tenant, name, _cidr())
    return name


def _disk(svc: HostService, tenant: str) -> str:
    name = f"disk-{_n()}"
    svc.disks.create(tenant, name, 1)
    return name


def _assignment(svc: HostService, tenant: str) -> str:
    return svc.access.assign(f"someone-{_n()}", "Reader", Scope.tenant(tenant), "test").id


def _role(svc: HostService, tenant: str) -> str:
    name = f"Custom{_n()}"
    svc.access.create_role(name, "", ["vms/read"], [], Scope.tenant(tenant))
    return name


# (method, OpenAPI path) -> (expected action or None for public, level, prepare)
# level: "root" (checked at /), "tenant" (at /tenants/{t} or below).
Prepare = Callable[[HostService, str], Target]
ENDPOINTS: dict[tuple[str, str], tuple[str | None, str, Prepare]] = {
    ("GET", "/v1/tenants"): ("tenants/read", "root-list", lambda s, t: Target({})),
    ("POST", "/v1/tenants"): ("tenants/write", "root",
                              lambda s, t: Target({}, {"name": f"new-{_n()}"})),
    ("GET", "/v1/tenants/{tenant}"): ("tenants/read", "tenant",
                                      lambda s, t: Target({"tenant": t})),
    ("DELETE", "/v1/tenants/{tenant}"): ("tenants/delete", "tenant-delete",
                                         lambda s, t: Target({"tenant": t})),
    ("GET", "/v1/tenants/{tenant}/quota"): ("quotas/read", "tenant",
                                            lambda s, t: Target({"tenant": t})),
    ("PUT", "/v1/tenants/{tenant}/quota"): ("quotas/write", "tenant",
                                            lambda s, t: Target({"tenant": t}, BIG)),
    ("GET", "/v1/tenants/{tenant}/vms"): ("vms/read", "tenant",
                                          lambda s, t: Target({"tenant": t})),
    ("POST", "/v1/tenants/{tenant}/vms"): (
        "vms/write", "tenant",
        lambda s, t: Target({"tenant": t}, {"name": f"c-{_n()}", "kernel": "k",
                                            "start": False})),
    ("GET", "/v1/tenants/{tenant}/vms/{vm}"): (
        "vms/read", "tenant", lambda s, t: Target({"tenant": t, "vm": "base"})),
    ("DELETE", "/v1/tenants/{tenant}/vms/{vm}"): (
        "vms/delete", "tenant", lambda s, t: Target({"tenant": t, "vm": _vm(s, t)})),
    ("POST", "/v1/tenants/{tenant}/vms/{vm}/start"): (
        "vms/start/action", "tenant", lambda s, t: Target({"tenant": t, "vm": _vm(s, t)})),
    ("POST", "/v1/tenants/{tenant}/vms/{vm}/stop"): (
        "vms/stop/action", "tenant",
        lambda s, t: Target({"tenant": t, "vm": _vm(s, t, "running")})),
    ("POST", "/v1/tenants/{tenant}/vms/{vm}/pause"): (
        "vms/pause/action", "tenant",
        lambda s, t: Target({"tenant": t, "vm": _vm(s, t, "running")})),
    ("POST", "/v1/tenants/{tenant}/vms/{vm}/resume"): (
        "vms/resume/action", "tenant",
        lambda s, t: Target({"tenant": t, "vm": _vm(s, t, "paused")})),
    ("GET", "/v1/tenants/{tenant}/vms/{vm}/metrics"): (
        "vms/metrics/read", "tenant", lambda s, t: Target({"tenant": t, "vm": "base"})),
    ("GET", "/v1/tenants/{tenant}/vms/{vm}/console"): (
        "vms/console/action", "tenant", lambda s, t: Target({"tenant": t, "vm": "base"})),
    ("POST", "/v1/tenants/{tenant}/vms/{vm}/console"): (
        "vms/console/action", "tenant",
        lambda s, t: Target({"tenant": t, "vm": "base"}, content=b"x")),
    ("GET", "/v1/tenants/{tenant}/images"): ("images/read", "tenant",
                                             lambda s, t: Target({"tenant": t})),
    ("PUT", "/v1/tenants/{tenant}/images/{image}"): (
        "images/write", "tenant",
        lambda s, t: Target({"tenant": t, "image": f"i-{_n()}"}, content=b"\x7fELF")),
    ("GET", "/v1/tenants/{tenant}/images/{image}"): (
        "images/read", "tenant", lambda s, t: Target({"tenant": t, "image": "k"})),
    ("DELETE", "/v1/tenants/{tenant}/images/{image}"): (
        "images/delete", "tenant",
        lambda s, t: Target({"tenant": t, "image": _image(s, t)})),
    ("GET", "/v1/tenants/{tenant}/networks"): ("networks/read", "tenant",
                                              lambda s, t: Target({"tenant": t})),
    ("POST", "/v1/tenants/{tenant}/networks"): (
        "networks/write", "tenant",
        lambda s, t: Target({"tenant": t}, {"name": f"n-{_n()}", "cidr": _cidr()})),
    ("GET", "/v1/tenants/{tenant}/networks/{network}"): (
        "networks/read", "tenant", lambda s, t: Target({"tenant": t, "network": "base"})),
    ("DELETE", "/v1/tenants/{tenant}/networks/{network}"): (
        "networks/delete", "tenant",
        lambda s, t: Target({"tenant": t, "network": _network(s, t)})),
    ("GET", "/v1/tenants/{tenant}/disks"): ("disks/read", "tenant",
                                           lambda s, t: Target({"tenant": t})),
    ("POST", "/v1/tenants/{tenant}/disks"): (
        "disks/write", "tenant",
        lambda s, t: Target({"tenant": t}, {"name": f"d-{_n()}", "sizeMiB": 1})),
    ("GET", "/v1/tenants/{tenant}/disks/{disk}"): (
        "disks/read", "tenant", lambda s, t: Target({"tenant": t, "disk": "base"})),
    ("DELETE", "/v1/tenants/{tenant}/disks/{disk}"): (
        "disks/delete", "tenant",
        lambda s, t: Target({"tenant": t, "disk": _disk(s, t)})),
    ("GET", "/v1/roleAssignments"): (
        "roleAssignments/read", "tenant",
        lambda s, t: Target({}, query={"scope": f"/tenants/{t}"})),
    ("POST", "/v1/roleAssignments"): (
        "roleAssignments/write", "tenant",
        lambda s, t: Target({}, {"principal": f"p-{_n()}", "role": "Reader",
                                 "scope": f"/tenants/{t}"})),
    ("GET", "/v1/roleAssignments/{assignment_id}"): (
        "roleAssignments/read", "tenant",
        lambda s, t: Target({"assignment_id": _assignment(s, t)})),
    ("DELETE", "/v1/roleAssignments/{assignment_id}"): (
        "roleAssignments/delete", "tenant",
        lambda s, t: Target({"assignment_id": _assignment(s, t)})),
    ("GET", "/v1/roleDefinitions"): (
        "roleDefinitions/read", "tenant",
        lambda s, t: Target({}, query={"scope": f"/tenants/{t}"})),
    ("POST", "/v1/roleDefinitions"): (
        "roleDefinitions/write", "tenant",
        lambda s, t: Target({}, {"name": f"New{_n()}", "actions": ["vms/read"],
                                 "scope": f"/tenants/{t}"})),
    ("DELETE", "/v1/roleDefinitions/{name}"): (
        "roleDefinitions/delete", "tenant",
        lambda s, t: Target({"name": _role(s, t)}, query={"scope": f"/tenants/{t}"})),
    ("GET", "/v1/whoami"): (None, "root", lambda s, t: Target({})),
    ("GET", "/v1/host"): ("host/read", "root", lambda s, t: Target({})),
    ("GET", "/v1/audit"): ("audit/read", "root", lambda s, t: Target({})),
}
SUCCESS = {"GET": 200, "POST": 200, "PUT": 200, "DELETE": 204}
NO_CONTENT = {("POST", "/v1/tenants/{tenant}/vms/{vm}/console")}
CREATED = {("POST", "/v1/tenants"), ("POST", "/v1/tenants/{tenant}/vms"),
           ("PUT", "/v1/tenants/{tenant}/images/{image}"), ("POST", "/v1/roleAssignments"),
           ("POST", "/v1/tenants/{tenant}/networks"), ("POST", "/v1/tenants/{tenant}/disks"),
           ("POST", "/v1/roleDefinitions")}


def _image(svc: HostService, tenant: str) -> str:
    name = f"img-{_n()}"
    svc.images.put(tenant, name, [b"\x7fELF"])
    return name


def expected_status(method: str, path: str, role: str, in_scope: bool) -> int:
    action, level, _ = ENDPOINTS[(method, path)]
    ok = 201 if (method, path) in CREATED else SUCCESS[method]
    ok = 204 if (method, path) in NO_CONTENT else ok
    if action is None:
        return ok
    granted = action in EXPECTED_ROLE_ACTIONS[role]
    if role == "Host Admin":
        return ok if granted else 403
    if level == "root-list":
        return 200  # filtered to what the principal may read (checked separately)
    if level == "root":
        return 403  # the root is visible to every principal; nothing is granted there
    if not in_scope:
        return 404
    return ok if granted else 403


@dataclass
class Matrix:
    stack: Stack
    principals: dict[str, Identity]
    fresh_tenant: Callable[[], str]


@pytest.fixture(scope="module")
def matrix(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Matrix]:
    stack = build_stack(tmp_path_factory.mktemp("matrix"))
    svc = stack.service
    for t in ("a", "b"):
        svc.tenants.create(t)
        svc.tenants.set_quota(t, svc.tenants.get(t).quota.__class__(4096, 1 << 24, 100000))
        svc.images.put(t, "k", [b"\x7fELF"])
        svc.create_vm(t, VmSpec(name="base", kernel="k"), start=True, actor="test")
        svc.networks.create(t, "base", _cidr())
        svc.disks.create(t, "base", 1)
    principals = {}
    for role in TENANT_ROLES:
        name = "p-" + role.lower().replace(" ", "-")
        principals[role] = stack.identity(name)
        svc.access.assign(name, role, Scope.tenant("a"), "test")
    principals["Host Admin"] = stack.identity("root-admin")
    svc.bootstrap_admin("root-admin")

    def fresh_tenant() -> str:
        name = f"e-{_n()}"
        svc.tenants.create(name)
        for role in TENANT_ROLES:
            svc.access.assign(principals[role].name, role, Scope.tenant(name), "test")
        return name

    yield Matrix(stack, principals, fresh_tenant)
    stack.close()


def _request(client: httpx.Client, method: str, path: str, target: Target) -> httpx.Response:
    url = path.format(**target.params)
    return client.request(method, url, json=target.body, content=target.content,
                          params=target.query,
                          headers={"content-type": "application/octet-stream"}
                          if target.content is not None else None)


def _operations(stack: Stack) -> list[tuple[str, str]]:
    doc = stack.api.openapi()
    return [(m.upper(), p) for p, ops in doc["paths"].items() for m in ops]


def test_table_covers_every_openapi_operation(matrix: Matrix) -> None:
    ops = _operations(matrix.stack)
    assert sorted(ops) == sorted(ENDPOINTS), "an endpoint is missing from the expected table"
    doc = matrix.stack.api.openapi()
    for (method, path), (action, _level, _prep) in ENDPOINTS.items():
        assert doc["paths"][path][method.lower()].get("x-isovisor-action") == action


def test_matrix_roles_in_and_out_of_scope(matrix: Matrix) -> None:
    stack, svc = matrix.stack, matrix.stack.service
    unexpected: list[str] = []
    checked = 0
    for role, ident in matrix.principals.items():
        with stack.client(ident) as client:
            for (method, path) in _operations(stack):
                scopes = [True] if role == "Host Admin" else [True, False]
                for in_scope in scopes:
                    if ENDPOINTS[(method, path)][1] == "tenant-delete":
                        # an empty tenant of its own, where the role is held (or not)
                        tenant = matrix.fresh_tenant() if in_scope else "b"
                        if not in_scope:
                            tenant = f"e-{_n()}"
                            svc.tenants.create(tenant)
                    else:
                        tenant = "a" if in_scope else "b"
                    target = ENDPOINTS[(method, path)][2](svc, tenant)
                    r = _request(client, method, path, target)
                    want = expected_status(method, path, role, in_scope)
                    checked += 1
                    if r.status_code != want:
                        unexpected.append(f"{role} {'in' if in_scope else 'out'} {method} "
                                          f"{path}: {r.status_code} (want {want}) {r.text[:160]}")
                    if r.status_code >= 400:
                        err = r.json()["error"]
                        assert err["requestId"] == r.headers["x-request-id"]
    assert not unexpected, "\n".join(unexpected)
    assert checked == len(ENDPOINTS) * (2 * len(TENANT_ROLES) + 1)


def test_root_lists_show_only_the_principals_tenants(matrix: Matrix) -> None:
    for role in TENANT_ROLES:
        with matrix.stack.client(matrix.principals[role]) as client:
            names = {t["name"] for t in client.get("/v1/tenants").json()["items"]}
        assert "a" in names and "b" not in names, role


def test_hidden_and_missing_answer_identically(matrix: Matrix) -> None:
    with matrix.stack.client(matrix.principals["Owner"]) as client:
        hidden = client.get("/v1/tenants/b/vms/base").json()["error"]
        missing = client.get("/v1/tenants/zz/vms/base").json()["error"]
        hidden_vm = client.get("/v1/tenants/a/vms/nope").json()["error"]
    assert hidden["message"] == "tenant 'b' not found"
    assert missing["message"] == "tenant 'zz' not found"
    assert hidden["code"] == missing["code"] == hidden_vm["code"] == "NotFound"


def _bad_identities(stack: Stack, tmp: Path) -> dict[str, Identity | None]:
    """Each as the most privileged principal's name: the certificate is what fails."""
    expired = stack.identity("root-admin", not_before=dt.datetime.now(dt.UTC)
                             - dt.timedelta(days=3), validity=dt.timedelta(days=1))
    other_ca = CertificateAuthority.init(tmp / "other-ca")
    foreign = stack.identity("root-admin", ca=other_ca)
    revoked = stack.identity("root-admin")
    stack.ca.revoke(str(revoked.serial))
    return {"no certificate": None, "expired": expired, "another CA": foreign,
            "revoked": revoked}


def _state_counts(svc: HostService) -> tuple[int, ...]:
    conn = svc.db.conn
    return tuple(conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]
                 for t in ("tenants", "vms", "images", "role_assignments", "role_definitions"))


def test_matrix_bad_certificates(matrix: Matrix, tmp_path: Path) -> None:
    stack, svc = matrix.stack, matrix.stack.service
    events: list[str] = []
    stack.server.context.on_handshake_failure = events.append
    bad = _bad_identities(stack, tmp_path)
    # fixtures the bad requests would touch, prepared up front
    targets = {(m, p): ENDPOINTS[(m, p)][2](svc, "a") for m, p in _operations(stack)}
    before = _state_counts(svc)
    allowed: list[str] = []
    for label, ident in bad.items():
        with stack.client(ident) as client:
            for (method, path), target in targets.items():
                try:
                    r = _request(client, method, path, target)
                except httpx.TransportError:
                    continue  # refused in the TLS handshake: the expected outcome
                if r.status_code != 401:
                    allowed.append(f"{label} {method} {path}: {r.status_code}")
    assert not allowed, "\n".join(allowed)
    assert _state_counts(svc) == before
    assert len(events) >= 3 * len(targets)  # no cert, expired, other CA: in the handshake
    assert any("expired" in e for e in events)
