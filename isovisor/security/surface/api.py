"""Inventory entries of the management API, read off the FastAPI app object: one per
(method, path), with the RBAC action and scope the route declares (`x-isovisor-action`,
`x-isovisor-scope`: the route table the pipeline and the RBAC matrix test enforce), the
request model and the parameters a client controls."""

from __future__ import annotations

import types
from typing import Any, cast

from isovisor.security.surface.astscan import qualname
from isovisor.security.surface.model import CLIENT_API, Entry, details

# What a route without an RBAC action requires.
AUTHENTICATED = "authenticated"
MISSING = "MISSING"  # a route that declares no action at all (a CI test fails on it)


def build_app() -> Any:
    """The FastAPI app as the daemon builds it (the host service is never called here)."""
    from isovisor.api.app import create_app

    stub = types.SimpleNamespace(access=None, state_dir=None)
    return create_app(cast(Any, stub), None).fastapi


def _operation(doc: dict[str, Any], path: str, method: str) -> dict[str, Any]:
    op: dict[str, Any] = doc.get("paths", {}).get(path, {}).get(method.lower(), {})
    return op


def _params(op: dict[str, Any]) -> dict[str, list[str]] | None:
    out: dict[str, list[str]] = {}
    for p in op.get("parameters", []):
        out.setdefault(str(p["in"]), []).append(str(p["name"]))
    return {k: sorted(v) for k, v in sorted(out.items())} or None


def _body(op: dict[str, Any]) -> str | None:
    content: dict[str, Any] = op.get("requestBody", {}).get("content", {})
    refs = sorted({str(c.get("schema", {}).get("$ref", "")).rsplit("/", 1)[-1]
                   for c in content.values()} - {""})
    if refs:
        return ", ".join(refs)
    if content:
        return "raw: " + ", ".join(sorted(content))
    return None


def api_entries(app: Any | None = None) -> list[Entry]:
    """One entry per (method, path) the app routes, in or out of the OpenAPI document."""
    from fastapi.routing import APIRoute, iter_route_contexts

    app = app if app is not None else build_app()
    doc = app.openapi()
    out = []
    for rc in iter_route_contexts(app.routes):
        path = str(rc.path_format or rc.path)
        extra = getattr(rc.original_route, "openapi_extra", None) or {}
        if "x-isovisor-action" in extra:
            action = extra["x-isovisor-action"] or AUTHENTICATED
        else:  # FastAPI's own routes (the OpenAPI document) need a certificate, no action
            action = MISSING if isinstance(rc.original_route, APIRoute) else AUTHENTICATED
        for method in sorted(rc.methods or ()):
            if method == "HEAD":
                continue
            op = _operation(doc, path, method)
            out.append(Entry(
                id=f"api:{method} {path}", boundary=CLIENT_API, source=qualname(rc.endpoint),
                details=details(
                    action=action, scope=extra.get("x-isovisor-scope"),
                    body=_body(op), params=_params(op),
                    documented=bool(op),
                ),
            ))
    return out
