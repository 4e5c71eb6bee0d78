"""The management API as an ASGI app: FastAPI routes inside the request pipeline."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI

from isovisor import __version__
from isovisor.api import errors
from isovisor.api.pipeline import RequestGuard, RequestObserver, RequestPipeline
from isovisor.api.routes import access, audit, disks, host, images, networks, tenants, vms
from isovisor.host.service import HostService
from isovisor.security.pki import RevocationList

OPENAPI_PATH = "/openapi.json"
DESCRIPTION = """The isovisor management API. Served only over TLS 1.3 with a client
certificate issued by the host CA; the certificate's common name is the principal.
Every operation names the RBAC action it checks (`x-isovisor-action`) and the scope it
checks it at (`x-isovisor-scope`). Resources the caller may not see answer 404."""


@dataclass
class Api:
    fastapi: FastAPI
    asgi: RequestPipeline
    observers: list[RequestObserver] = field(default_factory=list)
    guards: list[RequestGuard] = field(default_factory=list)

    def add_request_observer(self, observer: RequestObserver) -> None:
        self.observers.append(observer)

    def add_request_guard(self, guard: RequestGuard) -> None:
        """Runs before each request; raising refuses it with 503 (the audit pre-check)."""
        self.guards.append(guard)

    def openapi(self) -> dict[str, Any]:
        return self.fastapi.openapi()


def create_app(service: HostService, revocations: RevocationList | None) -> Api:
    app = FastAPI(title="isovisor", version=__version__, description=DESCRIPTION,
                  docs_url=None, redoc_url=None, openapi_url=OPENAPI_PATH,
                  redirect_slashes=False)  # a trailing slash is a 404, not a redirect (F-001)
    app.state.service = service
    errors.install(app)
    for module in (tenants, vms, images, networks, disks, access, host, audit):
        app.include_router(module.router)
    observers: list[RequestObserver] = []
    guards: list[RequestGuard] = []
    pipeline = RequestPipeline(app, service.access, revocations, observers,
                               public_paths=frozenset({OPENAPI_PATH}), guards=guards)
    return Api(app, pipeline, observers, guards)
