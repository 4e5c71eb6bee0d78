"""The request pipeline: every API request passes through `RequestPipeline` (pure ASGI).

1. A request id is assigned (returned as `X-Request-Id` and in every error body).
2. The identity is the verified client certificate put into the scope by the TLS
   protocol (tls.PEER_KEY); no identity, or a certificate revoked since the connection
   opened, ends the request with 401.
3. The route authorizes through `RequestContext.authorize(action, scope)`; the decision
   is recorded on the context.
4. Before the first byte of the response leaves, every `RequestObserver` receives one
   `RequestRecord` (principal, action, scope, decision, outcome, request id, client,
   time). This is the audit hook: an observer that raises turns the response into a 500
   (the action is then not acknowledged as a success).
5. Fail closed: a route that answers 2xx/3xx without having called `authorize` (or
   `authenticated_only`) is a bug; the pipeline replaces its answer with a 500.
6. Before any of that (before authentication, the body and the route), every
   `RequestGuard` sees a `RequestStart`. This is the audit log's pre-check: a guard that
   raises refuses the request with 503 `AuditUnavailable` and the route never runs, so
   once the log cannot record, no action happens unrecorded (the audit guard also
   writes an intent record for every mutating request, so a log that breaks silently
   fails on that write, before the action).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import anyio.to_thread

from isovisor.api.tls import PEER_KEY, PeerCertificate
from isovisor.host.access import AccessStore
from isovisor.host.errors import (
    AuditUnavailable,
    Forbidden,
    HostError,
    NotFound,
    PayloadTooLarge,
    Unauthenticated,
)
from isovisor.security.pki import RevocationList
from isovisor.security.rbac import Authorizer, Decision, Scope

log = logging.getLogger(__name__)

CONTEXT_KEY = "isovisor.context"
# JSON bodies are small; only image uploads (streamed to disk, capped by the image store)
# may be larger. A bigger body is refused before the application parses it.
MAX_BODY = 1 << 20
_KIND = {"tenants": "tenant", "vms": "VM", "images": "image"}


@dataclass(frozen=True)
class RequestRecord:
    """What the audit log records about one request."""

    request_id: str
    time: str  # when the request arrived, UTC ISO 8601
    client: str  # "host:port"
    principal: str | None  # certificate common name; None when unauthenticated
    certificate_serial: str | None  # hex
    method: str
    path: str
    action: str | None  # the RBAC action the route checked (None: none checked)
    scope: str | None
    decision: str | None  # "allow", "deny" (403), "hidden" (404), None: not reached
    status: int  # HTTP status of the answer
    outcome: str  # "success" (status < 400) or "failure"
    error_code: str | None
    duration_ms: float


RequestObserver = Callable[[RequestRecord], None]


@dataclass(frozen=True)
class RequestStart:
    """What is known of a request before it is authenticated or run (for guards)."""

    request_id: str
    time: str
    client: str
    principal: str | None  # the presented certificate's name, not yet checked for revocation
    certificate_serial: str | None
    method: str
    path: str


# Raises to refuse the request before it runs (answered 503 AuditUnavailable). Guards run
# on the event loop: they must not block (the audit guard writes one line, no fsync).
RequestGuard = Callable[[RequestStart], None]


def hidden_error(authorizer: Authorizer, scope: Scope) -> NotFound:
    """The 404 a principal gets for a scope it may not see: worded exactly as if the
    first invisible resource on the path did not exist."""
    for depth in range(1, len(scope.parts) + 1):
        prefix = Scope(scope.parts[:depth])
        if not authorizer.can_see(prefix):
            collection, name = scope.parts[depth - 1]
            return NotFound(f"{_KIND.get(collection, collection)} {name!r} not found")
    return NotFound("not found")


@dataclass
class RequestContext:
    request_id: str
    started: float
    time: str
    client: str
    method: str
    path: str
    access: AccessStore
    peer: PeerCertificate | None = None
    action: str | None = None
    scope: Scope | None = None
    decision: Decision | None = None
    public: bool = False
    error_code: str | None = None
    _authorizer: Authorizer | None = field(default=None, repr=False)

    @property
    def principal(self) -> str:
        if self.peer is None:
            raise Unauthenticated("a verified client certificate is required")
        return self.peer.name

    @property
    def authorizer(self) -> Authorizer:
        if self._authorizer is None:
            self._authorizer = self.access.authorizer(self.principal)
        return self._authorizer

    def _record(self, action: str, scope: Scope, decision: Decision) -> None:
        self.action, self.scope, self.decision = action, scope, decision

    def decide(self, action: str, scope: Scope) -> Decision:
        """The decision, recorded for the audit hook; raises nothing."""
        decision = self.authorizer.decide(action, scope)
        self._record(action, scope, decision)
        return decision

    def authorize(self, action: str, scope: Scope) -> None:
        """Allow, or raise 403 (visible) / 404 (hidden)."""
        decision = self.decide(action, scope)
        if decision is Decision.HIDDEN:
            raise hidden_error(self.authorizer, scope)
        if decision is Decision.DENY:
            raise Forbidden(f"{self.principal!r} may not {action} at {scope}")

    def authorize_list(self, action: str, scope: Scope) -> Callable[[Scope], bool]:
        """For list endpoints: a filter over item scopes. All items when the action is
        granted at `scope`; those it is granted on when only granted below; else 403/404."""
        authz = self.authorizer
        if authz.allows(action, scope):
            self._record(action, scope, Decision.ALLOW)
            return lambda _item: True
        if authz.allows_anywhere_below(action, scope):
            self._record(action, scope, Decision.ALLOW)
            return lambda item: authz.allows(action, item)
        if not scope.parts:
            # The root always exists: a principal with nothing granted lists nothing.
            self._record(action, scope, Decision.DENY)
            return lambda _item: False
        self.authorize(action, scope)  # raises with the right status
        raise AssertionError("unreachable")

    def authenticated_only(self) -> None:
        """Routes that any authenticated principal may call (whoami, the OpenAPI doc)."""
        _ = self.principal
        self.public = True


def _content_length(scope: dict[str, Any]) -> int:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return 0
    return 0


def error_body(code: str, message: str, request_id: str) -> bytes:
    return json.dumps({"error": {"code": code, "message": message,
                                 "requestId": request_id}}).encode()


class RequestPipeline:
    """ASGI middleware wrapping the FastAPI app."""

    def __init__(self, app: Any, access: AccessStore, revocations: RevocationList | None,
                 observers: list[RequestObserver], public_paths: frozenset[str],
                 guards: list[RequestGuard] | None = None) -> None:
        self.app = app
        self.access = access
        self.revocations = revocations
        self.observers = observers
        self.guards: list[RequestGuard] = guards if guards is not None else []
        self.public_paths = public_paths
        self._seen: set[tuple[str, int]] = set()
        self._in_flight = 0  # HTTP requests between arrival and their last byte

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        self._in_flight += 1
        try:
            await self._handle(scope, receive, send)
        finally:
            self._in_flight -= 1

    async def _handle(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        client = scope.get("client")
        ctx = RequestContext(
            request_id=uuid.uuid4().hex, started=time.monotonic(),
            time=dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds"),
            client=f"{client[0]}:{client[1]}" if client else "unknown",
            method=scope["method"], path=scope["path"], access=self.access,
            peer=scope.get("state", {}).get(PEER_KEY),
        )
        scope[CONTEXT_KEY] = ctx
        if scope["path"] in self.public_paths and ctx.peer is not None:
            ctx.public = True
        refusal = self._guard(ctx)
        if refusal is not None:  # nothing can be recorded: answer without observers
            await self._send_error(send, refusal.status, refusal.code, refusal.message,
                                   ctx.request_id)
            return
        failure = await self._authenticate(ctx)
        if failure is not None:
            await self._answer_error(ctx, send, failure)
            return
        started = False
        limit = None if scope["method"] == "PUT" and "/images/" in scope["path"] else MAX_BODY
        received = 0
        too_large = limit is not None and _content_length(scope) > limit
        if too_large:
            await self._answer_error(ctx, send, PayloadTooLarge(
                f"request bodies are limited to {MAX_BODY} bytes"))
            return

        async def guarded_receive() -> dict[str, Any]:
            nonlocal received, too_large
            message: dict[str, Any] = await receive()
            if limit is not None and message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    too_large = True  # the app may swallow this; guarded_send will not
                    raise _TooLargeError()
            return message

        async def guarded_send(message: dict[str, Any]) -> None:
            nonlocal started
            if message["type"] == "http.response.start" and not started:
                if too_large:
                    raise _TooLargeError()
                started = True
                status = int(message["status"])
                if status < 400 and ctx.action is None and not ctx.public:
                    log.error("%s %s answered %d without an authorization check",
                              ctx.method, ctx.path, status)
                    raise _UnauthorizedError()
                await self._observe(ctx, status)
                message = dict(message)
                message["headers"] = [*message.get("headers", []),
                                      (b"x-request-id", ctx.request_id.encode())]
            await send(message)

        try:
            await self.app(scope, guarded_receive, guarded_send)
        except _TooLargeError:
            if not started:
                await self._answer_error(ctx, send, PayloadTooLarge(
                    f"request bodies are limited to {MAX_BODY} bytes"))
        except _UnauthorizedError:
            await self._answer_error(ctx, send, HostError(
                "the server failed to authorize this request"), observe=True)
        except _ObserverFailedError:
            await self._send_error(send, 500, "InternalError",
                                   "the request could not be recorded", ctx.request_id)
        except Exception:
            # The app's own 500 handler has answered (and the observers heard of it)
            # unless the failure came before the response started.
            log.exception("request %s failed", ctx.request_id)
            if not started:
                await self._answer_error(ctx, send, HostError("internal error"))

    def _guard(self, ctx: RequestContext) -> HostError | None:
        if not self.guards:
            return None
        start = RequestStart(
            request_id=ctx.request_id, time=ctx.time, client=ctx.client,
            principal=ctx.peer.name if ctx.peer else None,
            certificate_serial=f"{ctx.peer.serial:x}" if ctx.peer else None,
            method=ctx.method, path=ctx.path)
        for guard in self.guards:
            try:
                guard(start)
            except Exception as exc:  # any failure of a guard refuses (fail closed)
                log.error("request %s %s %s refused before it ran: %s", ctx.request_id,
                          ctx.method, ctx.path, exc)
                return AuditUnavailable(
                    f"the request was refused before it ran: the audit log cannot record "
                    f"it ({exc})")
        return None

    async def _authenticate(self, ctx: RequestContext) -> HostError | None:
        if ctx.peer is None:
            return Unauthenticated("a verified client certificate is required")
        if self.revocations is not None and self.revocations.is_revoked(ctx.peer.serial):
            return Unauthenticated(f"the client certificate {ctx.peer.serial:x} is revoked")
        key = (ctx.peer.name, ctx.peer.serial)
        if key not in self._seen:
            await anyio.to_thread.run_sync(self.access.note_principal, *key)
            self._seen.add(key)
        return None

    async def _observe(self, ctx: RequestContext, status: int) -> None:
        if not self.observers:
            return
        record = RequestRecord(
            request_id=ctx.request_id, time=ctx.time, client=ctx.client,
            principal=ctx.peer.name if ctx.peer else None,
            certificate_serial=f"{ctx.peer.serial:x}" if ctx.peer else None,
            method=ctx.method, path=ctx.path, action=ctx.action,
            scope=str(ctx.scope) if ctx.scope is not None else None,
            decision=ctx.decision.value if ctx.decision is not None else None,
            status=status, outcome="success" if status < 400 else "failure",
            error_code=ctx.error_code,
            duration_ms=round((time.monotonic() - ctx.started) * 1000, 3),
        )

        def run() -> None:
            for observer in self.observers:
                observer(record)

        try:
            # Observers block (the audit hook waits for its fsync). With other requests
            # in flight they run in a worker thread, so the loop serves those meanwhile
            # (and their records share the fsync); alone, they run here: the loop has
            # nothing else to do, and a thread hop costs more than it saves (docs/AUDIT.md
            # "Cost").
            if self._in_flight == 1:
                run()
            else:
                await anyio.to_thread.run_sync(run)
        except Exception as exc:
            log.exception("request observer failed for %s", ctx.request_id)
            raise _ObserverFailedError() from exc

    async def _answer_error(self, ctx: RequestContext, send: Any, err: HostError,
                            observe: bool = True) -> None:
        ctx.error_code = err.code
        if observe:
            try:
                await self._observe(ctx, err.status)
            except _ObserverFailedError:
                await self._send_error(send, 500, "InternalError",
                                       "the request could not be recorded", ctx.request_id)
                return
        await self._send_error(send, err.status, err.code, err.message, ctx.request_id)

    @staticmethod
    async def _send_error(send: Any, status: int, code: str, message: str,
                          request_id: str) -> None:
        body = error_body(code, message, request_id)
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()),
                                (b"x-request-id", request_id.encode())]})
        await send({"type": "http.response.body", "body": body})


class _UnauthorizedError(Exception):
    pass


class _ObserverFailedError(Exception):
    pass


class _TooLargeError(Exception):
    pass
