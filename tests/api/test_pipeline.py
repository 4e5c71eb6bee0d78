"""The request pipeline: the audit hook (one record per request, before the answer),
the lifecycle hook, fail-closed authorization, TLS policy, the error shape."""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterator

import httpx
import pytest

from isovisor.api.pipeline import RequestRecord
from isovisor.host.lifecycle import LifecycleEvent
from tests.api.stack import Stack


def test_every_request_is_observed_with_its_decision(stack: Stack) -> None:
    records: list[RequestRecord] = []
    stack.api.add_request_observer(records.append)
    try:
        stranger = stack.identity("stranger")
        with stack.client(stack.ids["admin"]) as admin, stack.client(stranger) as other:
            ok = admin.post("/v1/tenants", json={"name": "obs"})
            denied = other.post("/v1/tenants", json={"name": "obs2"})
            hidden = other.get("/v1/tenants/obs")
    finally:
        stack.api.observers.remove(records.append)
    by_id = {r.request_id: r for r in records}
    a = by_id[ok.headers["x-request-id"]]
    assert (a.principal, a.action, a.scope, a.decision, a.status, a.outcome) == (
        "admin", "tenants/write", "/", "allow", 201, "success")
    assert a.client.startswith("127.0.0.1:") and a.time.endswith("+00:00")
    d = by_id[denied.headers["x-request-id"]]
    assert (d.decision, d.status, d.error_code) == ("deny", 403, "Forbidden")
    h = by_id[hidden.headers["x-request-id"]]
    assert (h.decision, h.status, h.scope) == ("hidden", 404, "/tenants/obs")


def test_a_failing_observer_turns_the_answer_into_500(stack: Stack) -> None:
    def broken(_record: RequestRecord) -> None:
        raise OSError("disk full")

    stack.api.add_request_observer(broken)
    try:
        with stack.client(stack.ids["admin"]) as admin:
            r = admin.get("/v1/tenants")
    finally:
        stack.api.observers.remove(broken)
    assert r.status_code == 500 and r.json()["error"]["code"] == "InternalError"


def test_a_route_that_skips_authorization_fails_closed(stack: Stack) -> None:
    @stack.api.fastapi.get("/v1/rogue")
    def rogue() -> dict[str, str]:
        return {"secret": "x"}

    with stack.client(stack.ids["admin"]) as admin:
        r = admin.get("/v1/rogue")
    assert r.status_code == 500 and "secret" not in r.text


def test_lifecycle_hook_sees_transitions(stack: Stack) -> None:
    events: list[LifecycleEvent] = []
    stack.service.lifecycle.observers.append(events.append)
    try:
        with stack.client(stack.ids["admin"]) as admin:
            admin.post("/v1/tenants", json={"name": "life"})
            admin.put("/v1/tenants/life/images/k", content=b"k")
            admin.post("/v1/tenants/life/vms", json={"name": "v", "kernel": "k"})
            admin.post("/v1/tenants/life/vms/v/stop")
            admin.delete("/v1/tenants/life/vms/v")
    finally:
        stack.service.lifecycle.observers.remove(events.append)
    assert [(e.previous, e.state) for e in events] == [
        (None, "stopped"), ("stopped", "starting"), ("starting", "running"),
        ("running", "stopping"), ("stopping", "stopped"), ("stopped", None)]
    assert events[0].actor == "admin" and events[2].actor == "isovisord"


def test_tls_below_1_3_is_refused(stack: Stack) -> None:
    ident = stack.ids["admin"]
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_verify_locations(stack.ca.cert_path)
    ctx.load_cert_chain(ident.cert, ident.key)
    with pytest.raises(httpx.TransportError), httpx.Client(verify=ctx) as c:
        c.get(f"{stack.url}/v1/whoami")


def test_no_plaintext_http(stack: Stack) -> None:
    with socket.create_connection(("127.0.0.1", stack.server.port), timeout=5) as s:
        s.sendall(b"GET /v1/whoami HTTP/1.1\r\nHost: x\r\n\r\n")
        data = s.recv(4096)
    assert b"HTTP/1.1 200" not in data and b"principal" not in data


def test_error_shape_for_validation_and_unknown_routes(stack: Stack) -> None:
    with stack.client(stack.ids["admin"]) as admin:
        bad = admin.post("/v1/tenants", json={"name": "UPPER", "extra": 1})
        unknown = admin.get("/v1/nothing-here")
    for r, code in ((bad, "InvalidRequest"), (unknown, "NotFound")):
        err = r.json()["error"]
        assert err["code"] == code and err["requestId"] == r.headers["x-request-id"]


def test_openapi_needs_a_certificate_but_no_role(stack: Stack) -> None:
    with stack.client(stack.identity("nobody")) as c:
        doc = c.get("/openapi.json").json()
    assert doc["info"]["title"] == "isovisor"


def test_oversized_json_bodies_are_refused(stack: Stack) -> None:
    with stack.client(stack.ids["admin"]) as admin:
        r = admin.post("/v1/tenants", content=b"{" + b" " * (2 << 20) + b"}",
                       headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "PayloadTooLarge"

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        yield b"{"
        for _ in range(40):
            yield b" " * 65536
        yield b"}"

    with stack.client(stack.ids["admin"]) as admin:
        r = admin.post("/v1/tenants", content=chunks(),
                       headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "PayloadTooLarge"
