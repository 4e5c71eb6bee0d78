"""Property-based fuzzing of the API, driven by its OpenAPI document (hypothesis; bounded
in examples and time). Requests are built from each operation's parameters and body
schema, valid or deliberately broken, and sent over real mutual TLS as a Host Admin and
as the Owner of tenant `a`. Invariants:

- no 5xx, ever;
- every answer carries X-Request-Id; every error is the one JSON error shape;
- the Owner of `a` never gets a 2xx under tenant `b`, and never sees tenant b's VM id.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from isovisor.host.vms import VmSpec
from isovisor.security.rbac import Scope
from tests.api.stack import Stack, build_stack

NAMES = st.sampled_from(["a", "b", "base", "k", "zz", "", "A", "..", "a-b", "x" * 70])
TEXT = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)),
               max_size=30)
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70),
                    st.floats(allow_nan=False, allow_infinity=False), TEXT)
JSON = st.recursive(SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(TEXT, inner, max_size=4)), max_leaves=10)


def _resolve(doc: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        schema = doc["components"]["schemas"][name]
    return schema


def value_for(doc: dict[str, Any], schema: dict[str, Any], depth: int = 0
              ) -> st.SearchStrategy[Any]:
    """Mostly well-typed values (with edge cases), sometimes anything at all."""
    schema = _resolve(doc, schema)
    if "anyOf" in schema:
        return st.one_of(*[value_for(doc, s, depth) for s in schema["anyOf"]])
    kind = schema.get("type")
    typed: st.SearchStrategy[Any]
    if kind == "integer":
        typed = st.one_of(st.integers(-5, 5000), st.integers(-(2**64), 2**64))
    elif kind == "number":
        typed = st.floats(allow_nan=False, allow_infinity=False)
    elif kind == "boolean":
        typed = st.booleans()
    elif kind == "string":
        typed = st.one_of(NAMES, TEXT, st.sampled_from(["/", "/tenants/a", "/tenants/b",
                                                        "/tenants/a/vms/base", "vms/*", "*"]))
    elif kind == "array" and depth < 3:
        typed = st.lists(value_for(doc, schema.get("items", {}), depth + 1), max_size=3)
    elif kind == "object" and depth < 3:
        props = schema.get("properties", {})
        typed = st.fixed_dictionaries(
            {}, optional={k: value_for(doc, v, depth + 1) for k, v in props.items()})
    else:
        typed = JSON
    return st.one_of(typed, typed, typed, JSON)


def requests(doc: dict[str, Any]) -> st.SearchStrategy[tuple[str, str, dict[str, Any]]]:
    """Requests for the operations of `doc` (a closure: the document stays out of reprs)."""

    @st.composite
    def build(draw: st.DrawFn) -> tuple[str, str, dict[str, Any]]:
        return _draw_request(draw, doc)

    return build()


def _draw_request(draw: st.DrawFn, doc: dict[str, Any]) -> tuple[str, str, dict[str, Any]]:
    ops = sorted((m.upper(), p, op) for p, item in doc["paths"].items()
                 for m, op in item.items())
    method, path, op = draw(st.sampled_from([(m, p, op) for m, p, op in ops]))
    url = path
    query: dict[str, Any] = {}
    headers: dict[str, str] = {}
    for param in op.get("parameters", []):
        where, name = param["in"], param["name"]
        if where == "path":
            value = draw(st.one_of(NAMES, TEXT))
            url = url.replace("{" + name + "}", quote(value, safe="") or "x")
        elif draw(st.booleans()):
            v = draw(value_for(doc, param.get("schema", {})))
            if where == "query" and v is not None:
                query[name] = json.dumps(v) if isinstance(v, dict | list) else str(v)
            elif where == "header" and isinstance(v, str) and v.isascii() and v.isprintable():
                headers[name] = v
    kwargs: dict[str, Any] = {"params": query, "headers": headers}
    body = op.get("requestBody")
    if body is not None:
        content = body.get("content", {})
        if "application/json" in content:
            kwargs["json"] = draw(value_for(doc, content["application/json"]["schema"]))
        else:
            kwargs["content"] = draw(st.binary(max_size=64))
    return method, url, kwargs


@pytest.fixture(scope="module")
def fuzz_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, str]]:
    stack = build_stack(tmp_path_factory.mktemp("fuzz"))
    svc = stack.service
    for t in ("a", "b"):
        svc.tenants.create(t)
        svc.images.put(t, "k", [b"kernel"])
        svc.create_vm(t, VmSpec(name="base", kernel="k"), start=True, actor="test")
    secret = svc.vms.get("b", "base").id
    stack.identity("admin")
    svc.bootstrap_admin("admin")
    stack.identity("owner-a")
    svc.access.assign("owner-a", "Owner", Scope.tenant("a"), "test")
    yield stack, secret
    stack.close()


def _check(r: httpx.Response, principal: str, url: str, secret: str) -> None:
    assert r.status_code < 500, f"{r.status_code} {r.text[:300]}"
    assert "x-request-id" in r.headers
    if r.status_code >= 400:
        err = r.json()["error"]
        assert set(err) == {"code", "message", "requestId"}
        assert err["requestId"] == r.headers["x-request-id"]
    if principal == "owner-a":
        assert secret not in r.text
        if url.startswith("/v1/tenants/b/") or url == "/v1/tenants/b":
            assert r.status_code >= 400, f"owner of a reached {url}: {r.status_code}"


def test_fuzz_the_api_from_its_openapi_document(fuzz_stack: tuple[Stack, str]) -> None:
    stack, secret = fuzz_stack
    doc = stack.api.openapi()
    clients = {name: stack.client(stack.ids[name]) for name in ("admin", "owner-a")}

    @settings(max_examples=120, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(req=requests(doc), principal=st.sampled_from(sorted(clients)))
    def run(req: tuple[str, str, dict[str, Any]], principal: str) -> None:
        method, url, kwargs = req
        r = clients[principal].request(method, url, **kwargs)
        _check(r, principal, url, secret)

    try:
        run()
    finally:
        for c in clients.values():
            c.close()
