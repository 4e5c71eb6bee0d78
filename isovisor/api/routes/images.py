"""/v1/tenants/{tenant}/images: kernels and initrds, uploaded as raw bytes."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from typing import IO

from fastapi import APIRouter, Query, Request, Response
from fastapi.concurrency import run_in_threadpool

from isovisor.api.errors import ERROR_RESPONSES
from isovisor.api.routes.deps import Ctx, Svc
from isovisor.api.schemas import ImageOut, ImagePage
from isovisor.host.errors import PayloadTooLarge
from isovisor.host.images import MAX_IMAGE_BYTES
from isovisor.host.models import check_name
from isovisor.security.rbac import Scope, actions

router = APIRouter(prefix="/v1/tenants/{tenant}/images", tags=["images"],
                   responses=ERROR_RESPONSES)
IMAGE_SCOPE = "/tenants/{tenant}/images/{image}"
_SPOOL = 8 << 20  # uploads up to this size stay in memory


def _x(action: str, scope: str = IMAGE_SCOPE) -> dict[str, object]:
    return {"x-isovisor-action": action, "x-isovisor-scope": scope}


@router.get("", response_model=ImagePage,
            openapi_extra=_x(actions.IMAGES_READ, "/tenants/{tenant}"))
def list_images(tenant: str, ctx: Ctx, svc: Svc, limit: int | None = Query(None, ge=1, le=200),
                page_token: str | None = Query(None, alias="pageToken", max_length=400)
                ) -> ImagePage:
    keep = ctx.authorize_list(actions.IMAGES_READ, Scope.tenant(tenant))
    svc.tenants.get(tenant)
    page = svc.images.page(tenant, limit, page_token, lambda i: keep(Scope.image(tenant, i.name)))
    return ImagePage(items=[ImageOut.of(i) for i in page.items], next_page_token=page.next_token)


def _chunks(f: IO[bytes]) -> Iterator[bytes]:
    f.seek(0)
    while chunk := f.read(1 << 20):
        yield chunk


@router.put(
    "/{image}", status_code=201, response_model=ImageOut,
    openapi_extra={**_x(actions.IMAGES_WRITE, "/tenants/{tenant}"),
                   "requestBody": {"required": True, "content": {
                       "application/octet-stream": {"schema": {"type": "string",
                                                               "format": "binary"}}}}},
)
async def put_image(tenant: str, image: str, request: Request, ctx: Ctx, svc: Svc) -> ImageOut:
    await run_in_threadpool(ctx.authorize, actions.IMAGES_WRITE, Scope.tenant(tenant))
    check_name("image", image)
    await run_in_threadpool(svc.tenants.get, tenant)
    with tempfile.SpooledTemporaryFile(max_size=_SPOOL, dir=str(svc.state_dir)) as spool:
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_IMAGE_BYTES:
                raise PayloadTooLarge(f"images are limited to {MAX_IMAGE_BYTES >> 20} MiB")
            spool.write(chunk)
        stored = await run_in_threadpool(svc.images.put, tenant, image, _chunks(spool))
    return ImageOut.of(stored)


@router.get("/{image}", response_model=ImageOut, openapi_extra=_x(actions.IMAGES_READ))
def get_image(tenant: str, image: str, ctx: Ctx, svc: Svc) -> ImageOut:
    ctx.authorize(actions.IMAGES_READ, Scope.image(tenant, image))
    return ImageOut.of(svc.images.get(tenant, image))


@router.delete("/{image}", status_code=204, openapi_extra=_x(actions.IMAGES_DELETE))
def delete_image(tenant: str, image: str, ctx: Ctx, svc: Svc) -> Response:
    ctx.authorize(actions.IMAGES_DELETE, Scope.image(tenant, image))
    svc.images.delete(tenant, image)
    return Response(status_code=204)
