"""API routes of restore plans: start one (stored, driven by the controller), read their
state, and approve, pause, resume or abort them. Every route needs an admin, except
reading (viewer)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

from fastapi import APIRouter, Query

from controller.api_deps import Admin, Viewer
from controller.plan_service import PlanStatus
from controller.schemas import PlanControlBody, PlanStartBody

if TYPE_CHECKING:
    from controller.service import Controller


def plans_router(ctl: Controller) -> APIRouter:
    router = APIRouter(prefix="/v1/plans", tags=["plans"])

    @router.post("", response_model=PlanStatus, status_code=201)
    def start(body: PlanStartBody, p: Admin) -> PlanStatus:
        """Store the plan and start it; the controller's scheduler drives it from here
        (follow it with GET /v1/plans/{plan_id})."""
        return ctl.plans.start(p, body.targets, body.plan, reason=body.reason,
                               ticket=body.ticket, start=body.from_stage,
                               through=body.through_stage)

    @router.get("", response_model=list[PlanStatus])
    def list_plans(p: Viewer,
                   limit: Annotated[int, Query(ge=1, le=1000)] = 20) -> list[PlanStatus]:
        """The most recent plans, newest first."""
        return ctl.plans.list(limit=limit)

    @router.get("/{plan_id}", response_model=PlanStatus)
    def get(plan_id: str, p: Viewer) -> PlanStatus:
        return ctl.plans.get(plan_id)

    @router.post("/{plan_id}/approve", response_model=PlanStatus)
    def approve(plan_id: str, body: PlanControlBody, p: Admin) -> PlanStatus:
        """Pass the gate of the stage that awaits approval (an admin other than the one
        who started the plan)."""
        return ctl.plans.approve(p, plan_id, reason=body.reason)

    @router.post("/{plan_id}/pause", response_model=PlanStatus)
    def pause(plan_id: str, body: PlanControlBody, p: Admin) -> PlanStatus:
        """No further step starts until resumed (a step under way finishes)."""
        return ctl.plans.pause(p, plan_id, reason=body.reason)

    @router.post("/{plan_id}/resume", response_model=PlanStatus)
    def resume(plan_id: str, body: PlanControlBody, p: Admin) -> PlanStatus:
        """A paused plan carries on; a failed one tries its failed stage again."""
        return ctl.plans.resume(p, plan_id, reason=body.reason)

    @router.post("/{plan_id}/abort", response_model=PlanStatus)
    def abort(plan_id: str, body: PlanControlBody, p: Admin) -> PlanStatus:
        """Return the plan's gateways to the state they had when it started."""
        return ctl.plans.abort(p, plan_id, reason=body.reason)

    return router
