"""A client of the management API (the CLI, the demo and the benchmark use it): mutual
TLS with the caller's certificate, errors turned into `ApiError` with the request id."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from isovisor.api.tls import client_context

DEFAULT_TIMEOUT = 30.0


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, request_id: str) -> None:
        super().__init__(f"{code}: {message}" + (f" (request {request_id})" if request_id else ""))
        self.status = status
        self.code = code
        self.message = message
        self.request_id = request_id


class ApiUnreachableError(Exception):
    """No HTTP answer: wrong endpoint, daemon down, or the TLS handshake was refused."""


@dataclass(frozen=True)
class ClientConfig:
    endpoint: str
    ca: Path
    cert: Path
    key: Path


class ApiClient:
    def __init__(self, config: ClientConfig, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.config = config
        try:
            ctx = client_context(config.ca, config.cert, config.key)
        except (OSError, ssl.SSLError) as exc:
            raise ApiUnreachableError(
                f"cannot load the client certificate or CA ({config.cert}, {config.key}, "
                f"{config.ca}): {exc}") from exc
        self.http = httpx.Client(base_url=config.endpoint, verify=ctx, timeout=timeout)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def raw(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.ConnectError as exc:
            raise ApiUnreachableError(
                f"cannot connect to {self.config.endpoint}: {exc}") from exc
        except (httpx.RemoteProtocolError, httpx.ReadError) as exc:
            raise ApiUnreachableError(
                f"{self.config.endpoint} closed the connection: the server refused this "
                "client certificate (revoked, expired or from another CA?)") from exc
        except httpx.TimeoutException as exc:
            raise ApiUnreachableError(f"{self.config.endpoint} did not answer in time") from exc
        if response.status_code >= 400:
            try:
                err = response.json()["error"]
                raise ApiError(response.status_code, err["code"], err["message"],
                               err.get("requestId", ""))
            except (ValueError, KeyError, TypeError):
                raise ApiError(response.status_code, "Error", response.text[:200], "") from None
        return response

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self.raw(method, path, **kwargs)
        if response.status_code == 204 or not response.content:
            return None
        return response.json()

    def get(self, path: str, **kwargs: Any) -> Any:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> Any:
        return self.request("POST", path, **kwargs)

    def put(self, path: str, **kwargs: Any) -> Any:
        return self.request("PUT", path, **kwargs)

    def delete(self, path: str, **kwargs: Any) -> Any:
        return self.request("DELETE", path, **kwargs)

    def list_all(self, path: str, params: dict[str, Any] | None = None) -> list[Any]:
        """Follow nextPageToken to the end."""
        items: list[Any] = []
        query = dict(params or {})
        while True:
            page = self.get(path, params=query)
            items += page["items"]
            token = page.get("nextPageToken")
            if not token:
                return items
            query["pageToken"] = token
