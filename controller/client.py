"""The engineer CLI's HTTP client: httpx, typed, errors translated at the boundary."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx

DEFAULT_URL = "http://127.0.0.1:8630"
NDJSON = "application/x-ndjson"


class ClientError(Exception):
    """`status` is the HTTP status (0: the controller was not reached)."""

    def __init__(self, message: str, *, status: int = 0, code: str = "unreachable") -> None:
        super().__init__(message)
        self.status = status
        self.code = code


def _raise_for(resp: httpx.Response) -> None:
    if resp.status_code < 400:
        return
    try:
        body = resp.json()
        error = body.get("error") or {}
        message = error.get("message") or str(body)
        code = error.get("code") or "http_error"
    except (ValueError, AttributeError):
        message, code = resp.text[:500] or resp.reason_phrase, "http_error"
    raise ClientError(message, status=resp.status_code, code=code)


class ApiClient:
    def __init__(self, url: str, token: str | None, *, timeout: float = 600.0) -> None:
        self.url = url.rstrip("/")
        headers = {"User-Agent": "drawbridge-cli/1"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self._http = httpx.Client(base_url=self.url, headers=headers,
                                  timeout=httpx.Timeout(timeout, connect=10.0))

    def close(self) -> None:
        self._http.close()

    def _send(self, method: str, path: str, *, params: dict[str, Any] | None = None,
              body: Any = None) -> Any:
        try:
            resp = self._http.request(method, path, params=params, json=body)
        except httpx.TransportError as exc:
            raise ClientError(f"cannot reach the controller at {self.url}: {exc}") from None
        _raise_for(resp)
        return resp.json()

    def get_bytes(self, path: str, **params: Any) -> bytes:
        """A GET whose answer is a file (a report), not JSON."""
        clean = {k: v for k, v in params.items() if v is not None}
        try:
            resp = self._http.get(path, params=clean)
        except httpx.TransportError as exc:
            raise ClientError(f"cannot reach the controller at {self.url}: {exc}") from None
        _raise_for(resp)
        return resp.content

    def get(self, path: str, **params: Any) -> Any:
        clean = {k: v for k, v in params.items() if v is not None}
        return self._send("GET", path, params=clean)

    def post(self, path: str, body: Any) -> Any:
        return self._send("POST", path, body=body)

    def delete(self, path: str, body: Any) -> Any:
        return self._send("DELETE", path, body=body)

    def patch(self, path: str, body: Any) -> Any:
        return self._send("PATCH", path, body=body)

    def stream(self, path: str, body: Any) -> Iterator[dict[str, Any]]:
        """POST a command and yield its NDJSON events as they arrive."""
        try:
            with self._http.stream("POST", path, json=body, headers={"Accept": NDJSON}) as resp:
                if resp.status_code >= 400:
                    resp.read()
                    _raise_for(resp)
                for line in resp.iter_lines():
                    if line.strip():
                        yield json.loads(line)
        except httpx.TransportError as exc:
            raise ClientError(f"lost the controller at {self.url} during the command: {exc}; "
                              "it keeps running there: see 'drawbridge history'") from None
