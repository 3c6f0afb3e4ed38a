"""API routes of the audit log's integrity: verify (with checkpoints from files), the
tamper alarm's acknowledgement, checkpoints (export, make one now) and the
cross-check with the gateways' journals."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

from fastapi import APIRouter, Query

from controller.api_deps import Admin, Viewer
from controller.audit import AuditRecord, VerifyReport
from controller.audit_verify import CheckpointClaim
from controller.checkpoint_keys import CheckpointFile, claims_from, parse_checkpoint_file
from controller.checkpoints import StoredCheckpoint
from controller.errors import Conflict, ControllerError, InputError
from controller.reconcile import ReconcileReport, reconcile
from controller.schemas import AcknowledgeBody, Targets, VerifyBody
from controller.timeparse import parse_when

if TYPE_CHECKING:
    from controller.service import Controller


def audit_router(ctl: Controller) -> APIRouter:
    router = APIRouter(prefix="/v1/audit", tags=["audit"])

    @router.get("/verify", response_model=VerifyReport)
    def verify(p: Viewer) -> VerifyReport:
        """The whole chain, against the head file and the database's own checkpoints."""
        return ctl.verify_audit()

    @router.post("/verify", response_model=VerifyReport)
    def verify_with(body: VerifyBody, p: Viewer) -> VerifyReport:
        """As GET, and against the checkpoints of exported files: each proves that no
        record up to its seq was changed or removed (its signature is checked with the
        public key in the file or the controller's)."""
        claims: list[CheckpointClaim] = []
        for f in body.checkpoint_files:
            try:
                public, checkpoints = parse_checkpoint_file(f.content, f.source)
            except ControllerError as exc:
                ctl.refused(p, "audit.verify", exc)
                raise
            claims += claims_from(checkpoints, source=f.source, file_public=public,
                                  controller_public=ctl.checkpoints.key.public_raw)
        return ctl.verify_audit(claims)

    @router.post("/acknowledge", response_model=AuditRecord)
    def acknowledge(body: AcknowledgeBody, p: Admin) -> AuditRecord:
        """After a tamper alarm: accept the chain as the database holds it now (recorded,
        with what the alarm saw); writes resume."""
        try:
            return ctl.acknowledge_alarm(p, reason=body.reason, ticket=body.ticket)
        except Conflict as exc:
            ctl.refused(p, "audit.acknowledge", exc)
            raise

    @router.get("/checkpoints", response_model=CheckpointFile)
    def checkpoints(p: Viewer, since_seq: Annotated[int, Query(ge=0)] = 0,
                    last: Annotated[int | None, Query(ge=0)] = None) -> CheckpointFile:
        """Every signed checkpoint (or the `last` N), with the public key: the file
        `drawbridge audit checkpoint export` writes."""
        return ctl.checkpoints.export(since_seq=since_seq, last=last)

    @router.post("/checkpoints", response_model=StoredCheckpoint)
    def checkpoint_now(p: Admin) -> StoredCheckpoint:
        """Sign the chain's head now and send it to every gateway."""
        made = ctl.checkpoints.make("asked for")
        if made is None:
            exc = Conflict("nothing to checkpoint: no record since the last checkpoint "
                           "(or a tamper alarm holds the log)")
            ctl.refused(p, "audit.checkpoint", exc)
            raise exc
        return made

    @router.get("/reconcile", response_model=ReconcileReport)
    def reconcile_route(p: Viewer, gateway: Annotated[list[str] | None, Query()] = None,
                        since: str | None = None) -> ReconcileReport:
        """Each gateway's journal against the controller's history: changes the
        controller never ordered, orders that never arrived, differing outcomes,
        checkpoints missing or differing."""
        try:
            targets = Targets(gateways=tuple(gateway)) if gateway else Targets(all=True)
        except ValueError as exc:
            raise InputError(f"gateway: {exc}") from None
        gateways = ctl.select(p, targets, "audit.reconcile")
        start = parse_when(since, ctl.clock()) if since else None
        return reconcile(ctl, gateways, start)

    return router
