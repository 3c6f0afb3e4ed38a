"""API routes of the inventory and the users: list, add, update and remove gateways,
create and list tokens. Reading the gateways needs a viewer; every change, and
the tokens, an admin."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import APIRouter

from controller.api_deps import Admin, Viewer
from controller.auth import Role, TokenInfo
from controller.errors import ControllerError
from controller.schemas import (
    GatewayAddBody,
    GatewayRemoveBody,
    GatewayUpdateBody,
    GatewayView,
    TokenCreateBody,
    TokenCreated,
)

if TYPE_CHECKING:
    from controller.service import Controller


def inventory_router(ctl: Controller) -> APIRouter:
    router = APIRouter()

    # -- inventory -------------------------------------------------------------------------

    @router.get("/v1/gateways", response_model=list[GatewayView], tags=["inventory"])
    def list_gateways(p: Viewer) -> list[GatewayView]:
        return ctl.views()

    @router.post("/v1/gateways", response_model=GatewayView, status_code=201, tags=["inventory"])
    def add_gateway(body: GatewayAddBody, p: Admin) -> GatewayView:
        gw = ctl.add_gateway(p, name=body.name, address=body.address, user=body.user,
                             key_path=body.key_path, host_key=body.host_key,
                             trust_on_first_use=body.trust_on_first_use, groups=body.groups,
                             reason=body.reason, ticket=body.ticket)
        return next(v for v in ctl.views() if v.name == gw.name)

    @router.patch("/v1/gateways/{name}", response_model=GatewayView, tags=["inventory"])
    def update_gateway(name: str, body: GatewayUpdateBody, p: Admin) -> GatewayView:
        ctl.update_gateway(p, name, reason=body.reason, ticket=body.ticket,
                           address=body.address, user=body.user, key_path=body.key_path,
                           host_key=body.host_key, trust_on_first_use=body.trust_on_first_use)
        return next(v for v in ctl.views() if v.name == name)

    @router.delete("/v1/gateways/{name}", tags=["inventory"])
    def remove_gateway(name: str, body: GatewayRemoveBody, p: Admin) -> dict[str, str]:
        ctl.remove_gateway(p, name, reason=body.reason, ticket=body.ticket)
        return {"removed": name}

    # -- users -----------------------------------------------------------------------------

    @router.post("/v1/tokens", response_model=TokenCreated, status_code=201, tags=["users"])
    def create_token(body: TokenCreateBody, p: Admin) -> TokenCreated:
        try:
            token = ctl.create_token(user=body.user, role=Role.parse(body.role),
                                     created_by=p.user, reason=body.reason,
                                     ticket=body.ticket, description=body.description)
        except ControllerError as exc:
            ctl.refused(p, "token.create", exc)
            raise
        return TokenCreated(token=token, user=body.user, role=body.role)

    @router.get("/v1/tokens", response_model=list[TokenInfo], tags=["users"])
    def list_tokens(p: Admin) -> list[TokenInfo]:
        return ctl.tokens.list()

    return router
