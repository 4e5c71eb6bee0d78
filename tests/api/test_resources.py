"""Resources over the real API: idempotent creates, pagination, quotas racing over
HTTPS, custom roles, VM-scoped assignments, console and metrics."""

from __future__ import annotations

import threading
from pathlib import Path

from isovisor.devices.diskcrypt.xts import SectorCipher
from isovisor.host.runner import default_command
from tests.api.stack import Stack


def _setup_tenant(stack: Stack, name: str, max_vms: int = 100) -> None:
    with stack.client(stack.ids["admin"]) as admin:
        admin.post("/v1/tenants", json={"name": name, "quota": {
            "maxVcpus": 1000, "maxMemoryMiB": 1 << 20, "maxVms": max_vms}}).raise_for_status()
        admin.put(f"/v1/tenants/{name}/images/k", content=b"kernel").raise_for_status()


def test_idempotent_create_replays_and_refuses_a_changed_body(stack: Stack) -> None:
    _setup_tenant(stack, "idem")
    body = {"name": "once", "kernel": "k", "start": False}
    with stack.client(stack.ids["admin"]) as admin:
        first = admin.post("/v1/tenants/idem/vms", json=body, headers={"Idempotency-Key": "k1"})
        again = admin.post("/v1/tenants/idem/vms", json=body, headers={"Idempotency-Key": "k1"})
        changed = admin.post("/v1/tenants/idem/vms", json={**body, "vcpus": 2},
                             headers={"Idempotency-Key": "k1"})
        plain = admin.post("/v1/tenants/idem/vms", json=body)
    assert first.status_code == again.status_code == 201
    assert first.json()["id"] == again.json()["id"]
    assert again.headers["idempotent-replayed"] == "true"
    assert changed.status_code == 400
    assert plain.status_code == 409  # without a key, a second create is a conflict


def test_pagination_over_the_api(stack: Stack) -> None:
    _setup_tenant(stack, "pages")
    with stack.client(stack.ids["admin"]) as admin:
        for i in range(5):
            admin.post("/v1/tenants/pages/vms", json={"name": f"p{i}", "kernel": "k",
                                                      "start": False}).raise_for_status()
        names, token = [], None
        while True:
            params = {"limit": 2, **({"pageToken": token} if token else {})}
            page = admin.get("/v1/tenants/pages/vms", params=params).json()
            names += [v["name"] for v in page["items"]]
            token = page["nextPageToken"]
            if not token:
                break
        bad = admin.get("/v1/tenants/pages/vms", params={"limit": 0})
    assert names == [f"p{i}" for i in range(5)]
    assert bad.status_code == 400


def test_concurrent_creates_over_https_race_one_quota(stack: Stack) -> None:
    _setup_tenant(stack, "race", max_vms=3)
    statuses: list[int] = []
    lock = threading.Lock()
    barrier = threading.Barrier(8)

    def create(i: int) -> None:
        with stack.client(stack.ids["admin"]) as admin:
            admin.get("/v1/whoami")  # connect first, so the creates really race
            barrier.wait()
            r = admin.post("/v1/tenants/race/vms", json={"name": f"r{i}", "kernel": "k",
                                                         "start": False})
        with lock:
            statuses.append(r.status_code if r.status_code != 409 else
                            (409 if r.json()["error"]["code"] == "QuotaExceeded" else -1))

    threads = [threading.Thread(target=create, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(statuses) == [201] * 3 + [409] * 5
    with stack.client(stack.ids["admin"]) as admin:
        usage = admin.get("/v1/tenants/race/quota").json()["usage"]
    assert usage["maxVms"] == 3


def test_custom_role_and_vm_scoped_assignment(stack: Stack) -> None:
    _setup_tenant(stack, "custom")
    owner, starter = stack.identity("custom-owner"), stack.identity("custom-starter")
    with stack.client(stack.ids["admin"]) as admin:
        admin.post("/v1/roleAssignments", json={"principal": owner.name, "role": "Owner",
                                                "scope": "/tenants/custom"}).raise_for_status()
        for v in ("v1", "v2"):
            admin.post("/v1/tenants/custom/vms",
                       json={"name": v, "kernel": "k", "start": False}).raise_for_status()
    with stack.client(owner) as c:
        role = c.post("/v1/roleDefinitions", json={
            "name": "Starter", "actions": ["vms/read", "vms/start/action"],
            "scope": "/tenants/custom"})
        assert role.status_code == 201, role.text
        builtin_clash = c.post("/v1/roleDefinitions", json={
            "name": "Owner", "actions": ["*"], "scope": "/tenants/custom"})
        assert builtin_clash.status_code == 400
        assigned = c.post("/v1/roleAssignments", json={
            "principal": starter.name, "role": "Starter", "scope": "/tenants/custom/vms/v1"})
        assert assigned.status_code == 201, assigned.text
        root_grab = c.post("/v1/roleAssignments", json={
            "principal": owner.name, "role": "Host Admin", "scope": "/"})
        assert root_grab.status_code == 403
        # no escalation: an Owner lacks quotas/write and audit/read, so it can neither
        # define a role granting them nor assign one that does
        everything = c.post("/v1/roleDefinitions", json={
            "name": "Everything", "actions": ["*"], "scope": "/tenants/custom"})
        assert everything.status_code == 403 and "quotas/write" in everything.text
        auditor = c.post("/v1/roleAssignments", json={
            "principal": owner.name, "role": "Auditor", "scope": "/tenants/custom"})
        assert auditor.status_code == 403 and "audit/read" in auditor.text
    with stack.client(starter) as s:
        assert s.post("/v1/tenants/custom/vms/v1/start").json()["state"] == "running"
        assert s.post("/v1/tenants/custom/vms/v1/stop").status_code == 403
        assert s.get("/v1/tenants/custom/vms/v2").status_code == 404
        assert [v["name"] for v in s.get("/v1/tenants/custom/vms").json()["items"]] == ["v1"]
        assert s.get("/v1/tenants/custom").status_code == 403  # visible, not readable


def test_console_and_metrics(stack: Stack) -> None:
    _setup_tenant(stack, "cons")
    with stack.client(stack.ids["admin"]) as admin:
        admin.post("/v1/tenants/cons/vms", json={"name": "c", "kernel": "k"}).raise_for_status()
        r = admin.get("/v1/tenants/cons/vms/c/console", params={"offset": 0})
        assert r.content == b"inert console\n"
        assert r.headers["x-console-offset"] == str(len(r.content))
        tail = admin.get("/v1/tenants/cons/vms/c/console", params={"offset": len(r.content)})
        assert tail.content == b""
        m = admin.get("/v1/tenants/cons/vms/c/metrics").json()
        assert m["state"] == "running" and m["consoleBytes"] == 14


def test_image_in_use_and_tenant_not_empty(stack: Stack) -> None:
    _setup_tenant(stack, "busy")
    with stack.client(stack.ids["admin"]) as admin:
        admin.post("/v1/tenants/busy/vms", json={"name": "b", "kernel": "k",
                                                 "start": False}).raise_for_status()
        assert admin.delete("/v1/tenants/busy/images/k").status_code == 409
        assert admin.delete("/v1/tenants/busy").status_code == 409
        assert admin.post("/v1/tenants/busy/vms", json={
            "name": "x", "kernel": "missing"}).status_code == 400
        assert admin.delete("/v1/tenants/busy/vms/b").status_code == 204
        assert admin.delete("/v1/tenants/busy/images/k").status_code == 204
        assert admin.delete("/v1/tenants/busy").status_code == 204


def test_vm_disks_and_rng(stack: Stack) -> None:
    _setup_tenant(stack, "disks")
    with stack.client(stack.ids["admin"]) as admin:
        for name in ("base", "data"):
            admin.put(f"/v1/tenants/disks/images/{name}", content=name.encode() * 100)
        vm = admin.post("/v1/tenants/disks/vms", json={
            "name": "d", "kernel": "k", "rng": True,
            "disks": [{"image": "base", "readonly": True}, {"image": "data"}]})
        assert vm.status_code == 201, vm.text
        assert vm.json()["disks"] == [{"image": "base", "disk": None, "readonly": True},
                                      {"image": "data", "disk": None, "readonly": False}]
        launch = stack.service.runner.launches[-1]  # type: ignore[attr-defined]
        (ro_path, ro), (rw_path, rw) = launch.disks
        images = stack.service.images
        assert ro and ro_path == images.path("disks", "base")
        assert not rw and rw_path != images.path("disks", "data")
        # A private copy, encrypted with its own key (issue #9); the shared image is not.
        copy = rw_path.read_bytes()
        assert b"data" not in copy
        assert launch.disk_keys[0] is None and launch.disk_keys[1] is not None
        plain = SectorCipher(launch.disk_keys[1]).decrypt(0, copy)
        assert plain[:400] == b"data" * 100 and not plain[400:].strip(b"\0")
        cmd = default_command(launch, Path("/run/x/console.log"))
        assert f"{ro_path},readonly" in cmd and f"{rw_path},keyfd=0" in cmd and "--rng" in cmd
        assert admin.delete("/v1/tenants/disks/images/data").status_code == 409
        assert admin.delete("/v1/tenants/disks/vms/d").status_code == 204
        assert not rw_path.exists()
        missing = admin.post("/v1/tenants/disks/vms", json={
            "name": "m", "kernel": "k", "disks": [{"image": "nope"}]})
        assert missing.status_code == 400
