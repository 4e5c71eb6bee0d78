"""/v1/tenants/{tenant}/vms: create, list, get, delete, start, stop, pause, resume,
console, metrics."""

from __future__ import annotations

import asyncio
import time

from fastapi import APIRouter, Query, Request, Response
from fastapi.concurrency import run_in_threadpool

from isovisor.api.errors import ERROR_RESPONSES
from isovisor.api.routes.deps import Ctx, IdempotencyKey, Svc, idempotent_create
from isovisor.api.schemas import VmCreate, VmMetricsOut, VmOut, VmPage
from isovisor.host.errors import PayloadTooLarge
from isovisor.host.lifecycle import VmLifecycle
from isovisor.host.models import ACTIVE_STATES, Disk, Vm
from isovisor.host.service import HostService
from isovisor.host.vms import VmSpec
from isovisor.security.rbac import Scope, actions

router = APIRouter(prefix="/v1/tenants/{tenant}/vms", tags=["vms"], responses=ERROR_RESPONSES)
VM_SCOPE = "/tenants/{tenant}/vms/{vm}"
CONSOLE_CHUNK = 64 << 10  # bytes per console read
CONSOLE_MAX_WAIT = 30.0  # seconds a console read may wait for output
CONSOLE_INPUT_MAX = 4096  # bytes of console input per request (a pasted line or two)


def _x(action: str, scope: str = VM_SCOPE) -> dict[str, object]:
    return {"x-isovisor-action": action, "x-isovisor-scope": scope}


@router.get("", response_model=VmPage,
            openapi_extra=_x(actions.VMS_READ, "/tenants/{tenant}"))
def list_vms(tenant: str, ctx: Ctx, svc: Svc, limit: int | None = Query(None, ge=1, le=200),
             page_token: str | None = Query(None, alias="pageToken", max_length=400)) -> VmPage:
    keep = ctx.authorize_list(actions.VMS_READ, Scope.tenant(tenant))
    svc.tenants.get(tenant)
    page = svc.vms.page(tenant, limit, page_token, lambda v: keep(Scope.vm(tenant, v.name)))
    return VmPage(items=[VmOut.of(v) for v in page.items], next_page_token=page.next_token)


@router.post("", status_code=201, response_model=VmOut,
             openapi_extra=_x(actions.VMS_WRITE, "/tenants/{tenant}"))
def create_vm(tenant: str, body: VmCreate, ctx: Ctx, svc: Svc,
              idempotency_key: IdempotencyKey = None) -> Response:
    ctx.authorize(actions.VMS_WRITE, Scope.tenant(tenant))
    spec = VmSpec(name=body.name, kernel=body.kernel, vcpus=body.vcpus,
                  memory_mib=body.memory_mib, initrd=body.initrd, cmdline=body.cmdline,
                  disks=tuple(Disk(d.image, d.readonly, d.disk) for d in body.disks),
                  rng=body.rng,
                  nics=tuple(n.network for n in body.nics))
    return idempotent_create(ctx, svc, idempotency_key, body, lambda: VmOut.of(
        svc.create_vm(tenant, spec, body.start, ctx.principal)))


def _vm(svc: HostService, ctx: Ctx, tenant: str, vm: str, action: str) -> Vm:
    ctx.authorize(action, Scope.vm(tenant, vm))
    return svc.vms.get(tenant, vm)


@router.get("/{vm}", response_model=VmOut, openapi_extra=_x(actions.VMS_READ))
def get_vm(tenant: str, vm: str, ctx: Ctx, svc: Svc) -> VmOut:
    return VmOut.of(_vm(svc, ctx, tenant, vm, actions.VMS_READ))


@router.delete("/{vm}", status_code=204, openapi_extra=_x(actions.VMS_DELETE))
def delete_vm(tenant: str, vm: str, ctx: Ctx, svc: Svc) -> Response:
    svc.delete_vm(_vm(svc, ctx, tenant, vm, actions.VMS_DELETE), ctx.principal)
    return Response(status_code=204)


def _operation(name: str, action: str, method: str) -> None:
    def operate(tenant: str, vm: str, ctx: Ctx, svc: Svc) -> VmOut:
        record = _vm(svc, ctx, tenant, vm, action)
        do = getattr(VmLifecycle, method)
        return VmOut.of(do(svc.lifecycle, record, ctx.principal))

    operate.__name__ = f"{name}_vm"
    router.add_api_route(f"/{{vm}}/{name}", operate, methods=["POST"], response_model=VmOut,
                         openapi_extra=_x(action), summary=f"{name.capitalize()} a VM")


_operation("start", actions.VMS_START, "start")
_operation("stop", actions.VMS_STOP, "stop")
_operation("pause", actions.VMS_PAUSE, "pause")
_operation("resume", actions.VMS_RESUME, "resume")


@router.get("/{vm}/metrics", response_model=VmMetricsOut, openapi_extra=_x(actions.VMS_METRICS))
def vm_metrics(tenant: str, vm: str, ctx: Ctx, svc: Svc) -> VmMetricsOut:
    record = _vm(svc, ctx, tenant, vm, actions.VMS_METRICS)
    m = svc.lifecycle.metrics(record)
    return VmMetricsOut(state=record.state.value, cpu_seconds=m.cpu_seconds,
                        rss_bytes=m.rss_bytes, console_bytes=m.console_bytes)


@router.get(
    "/{vm}/console", openapi_extra=_x(actions.VMS_CONSOLE),
    response_class=Response,
    responses={200: {"content": {"application/octet-stream": {}},
                     "description": "serial output from `offset`; X-Console-Offset is where "
                     "the next read starts, X-Vm-State the VM's state"}},
)
async def vm_console(tenant: str, vm: str, ctx: Ctx, svc: Svc,
                     offset: int = Query(0, ge=0, le=1 << 50),
                     wait: float = Query(0.0, ge=0.0, le=CONSOLE_MAX_WAIT,
                                         description="seconds to wait for new output")
                     ) -> Response:
    record = await run_in_threadpool(_vm, svc, ctx, tenant, vm, actions.VMS_CONSOLE)
    deadline = time.monotonic() + wait
    while True:
        data = await run_in_threadpool(_read_console, svc, record, offset)
        if data or time.monotonic() >= deadline:
            break
        record = await run_in_threadpool(svc.vms.get, tenant, vm)
        if record.state not in ACTIVE_STATES:
            break
        await asyncio.sleep(0.1)
    return Response(content=data, media_type="application/octet-stream",
                    headers={"X-Console-Offset": str(offset + len(data)),
                             "X-Vm-State": record.state.value})


@router.post(
    "/{vm}/console", status_code=204, openapi_extra={
        **_x(actions.VMS_CONSOLE),
        "requestBody": {"required": True, "content": {"application/octet-stream": {
            "schema": {"type": "string", "format": "binary"}}}}},
    summary="Type into the VM's serial console",
)
async def vm_console_input(tenant: str, vm: str, request: Request, ctx: Ctx, svc: Svc
                           ) -> Response:
    record = await run_in_threadpool(_vm, svc, ctx, tenant, vm, actions.VMS_CONSOLE)
    data = b""
    async for chunk in request.stream():
        data += chunk
        if len(data) > CONSOLE_INPUT_MAX:
            raise PayloadTooLarge(f"console input is limited to {CONSOLE_INPUT_MAX} bytes "
                                  "per request")
    if data:
        await run_in_threadpool(svc.lifecycle.send_console, record, data)
    return Response(status_code=204)


def _read_console(svc: HostService, record: Vm, offset: int) -> bytes:
    path = svc.lifecycle.console_path(record)
    if path is None:
        return b""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read(CONSOLE_CHUNK)
    except OSError:
        return b""
