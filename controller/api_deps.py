"""What every API route needs: who is calling (set by the gate middleware) and the role
check (audited when refused); the caller's address."""

from __future__ import annotations

from collections.abc import Callable, MutableMapping
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import Depends, Request

from controller.auth import Principal, Role
from controller.errors import Unauthorized

if TYPE_CHECKING:
    from controller.service import Controller


def client_address(scope: MutableMapping[str, Any]) -> str:
    """The peer's address as the server saw it (behind a reverse proxy: the proxy's;
    forwarded headers are not trusted, anyone can send them)."""
    client = scope.get("client")
    return str(client[0]) if client else "unknown"


def principal_of(request: Request) -> Principal:
    principal = getattr(request.state, "principal", None)
    if not isinstance(principal, Principal):  # only if the middleware is not installed
        raise Unauthorized("not authenticated")
    return principal


# What a request does, in the words of a refusal ("adding a gateway needs the admin role").
REQUEST_NAMES = {
    ("POST", "isolate"): "isolating gateways", ("POST", "restore"): "restoring gateways",
    ("POST", "allow"): "changing exceptions", ("POST", "probe"): "running probes",
    ("POST", "gateways"): "adding a gateway", ("DELETE", "gateways"): "removing a gateway",
    ("PATCH", "gateways"): "changing a gateway",
    ("POST", "tokens"): "creating an API token", ("GET", "tokens"): "listing API tokens",
    ("POST", "plans"): "driving a restore plan", ("POST", "audit"): "changing the audit log",
}


def request_name(method: str, path: str) -> str:
    section = path.removeprefix("/v1/").split("/")[0]
    return REQUEST_NAMES.get((method, section), f"{method} {path}")


def needs(role: Role) -> Callable[[Request], Principal]:
    def check(request: Request) -> Principal:
        principal = principal_of(request)
        ctl: Controller = request.app.state.controller
        path = request.url.path
        what = request_name(request.method, path)
        ctl.require(principal, role, what, request=f"{request.method} {path}")
        return principal
    return check


Viewer = Annotated[Principal, Depends(needs(Role.viewer))]
Operator = Annotated[Principal, Depends(needs(Role.operator))]
Admin = Annotated[Principal, Depends(needs(Role.admin))]
